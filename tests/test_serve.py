"""The web page and the HTTP API, through Flask's test client and a real headless browser."""

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.serve import create_app


@pytest.fixture(scope="module")
def model(pipeline_run, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("serve_models")
    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(models), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    return models / "logreg.skops"


@pytest.fixture(scope="module")
def client(model):
    app = create_app(Predictor(Bundle.load(model)), max_upload_bytes=2 * 2**20)
    return app.test_client()


@pytest.fixture(scope="module")
def photos(cats_dogs):
    """Validation photos of the small model (95% of which are inside its known range), and a flower."""
    return {
        "cat": sorted((cats_dogs / "validation" / "cats").glob("*.jpg"))[0],
        "dog": sorted((cats_dogs / "validation" / "dogs").glob("*.jpg"))[0],
        "flower": sorted(shared("flowers", "sunflower").glob("*.jpg"))[0],
    }


def upload(*items):
    return {
        "file": [(io.BytesIO(Path(p).read_bytes()) if isinstance(p, (str, Path)) else p, name) for p, name in items]
    }


def test_health_names_classes_and_backbone(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["classes"] == ["cats", "dogs"] and body["backbone"] == "efficientnet_lite0"
    assert 0 < body["unknown_threshold"] < 1 and body["unknown_calibration"] == "95% of the validation photos"


def test_api_predicts_each_uploaded_photo(client, photos):
    response = client.post(
        "/api/predict",
        data=upload((photos["cat"], "a.jpg"), (photos["dog"], "b.jpg")),
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    predictions = response.get_json()["predictions"]
    assert [p["label"] for p in predictions] == ["cats", "dogs"]
    assert [p["filename"] for p in predictions] == ["a.jpg", "b.jpg"]
    assert all(0.5 < p["probability"] <= 1 and len(p["top"]) == 2 for p in predictions)


def test_api_answers_unknown_for_a_flower(client, photos):
    response = client.post(
        "/api/predict", data=upload((photos["flower"], "sunflower.jpg")), content_type="multipart/form-data"
    )
    [prediction] = response.get_json()["predictions"]
    assert prediction["label"] == "unknown" and prediction["unknown"] is True
    assert prediction["top"][0]["label"] in ("cats", "dogs") and prediction["probability"] > 0
    threshold = client.get("/health").get_json()["unknown_threshold"]
    assert prediction["familiarity"] < threshold  # why it is unknown
    assert prediction["similarity"] == prediction["familiarity"]  # the field's former name, kept for old clients


def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(client, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    none = client.post("/api/predict", data={}, content_type="multipart/form-data")
    assert none.status_code == 400 and "no file" in none.get_json()["error"]
    text = client.post(
        "/api/predict",
        data=upload((io.BytesIO(b"hello, not a photo"), "../../etc/passwd")),
        content_type="multipart/form-data",
    )
    [skipped] = text.get_json()["predictions"]  # a well-formed request: each file gets its own answer
    assert text.status_code == 200 and skipped["filename"] == "../../etc/passwd"
    assert skipped["error"] == "not an image (unrecognised file content)" and skipped["label"] is None
    empty = client.post("/api/predict", data=upload((io.BytesIO(b""), "empty.jpg")), content_type="multipart/form-data")
    assert empty.status_code == 200 and "empty file" in empty.get_json()["predictions"][0]["error"]
    big = client.post(
        "/api/predict", data=upload((io.BytesIO(os.urandom(3 * 2**20)), "huge.jpg")), content_type="multipart/form-data"
    )
    assert big.status_code == 413 and "larger than the 2 MB limit" in big.get_json()["error"]
    assert list(tmp_path.iterdir()) == []  # nothing the client sent was written
    again = client.post("/api/predict", data=upload((photos["cat"], "cat.jpg")), content_type="multipart/form-data")
    assert again.status_code == 200 and again.get_json()["predictions"][0]["label"] == "cats"


def test_page_shows_each_image_with_its_labels(client, photos):
    page = client.get("/").get_data(as_text=True)
    assert '<form id="upload" method="post" enctype="multipart/form-data">' in page  # works without JavaScript
    assert 'type="file" id="file" name="file" accept="image/*" multiple' in page
    response = client.post(
        "/",
        data=upload((photos["dog"], "<b>dog</b>.jpg"), (io.BytesIO(b"junk"), "junk.jpg"), (photos["flower"], "f.jpg")),
        content_type="multipart/form-data",
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'data-label="dogs"' in html and "data:image/jpeg;base64," in html
    assert "&lt;b&gt;dog&lt;/b&gt;.jpg" in html and "<b>dog</b>" not in html  # names are escaped
    assert "skipped: not an image" in html
    # one probability bar per class, as wide as the probability; the flower's "unknown" is explained
    widths = [float(w) for w in re.findall(r'class="fill" style="width: ([0-9.]+)%"', html)]
    values = [float(v) for v in re.findall(r'<span class="value">([0-9.]+)</span>', html)]
    assert len(widths) == len(values) == 4 and widths == pytest.approx([100 * v for v in values], abs=0.06)
    assert 'data-label="unknown"' in html
    # the default detector's score, named
    assert "None of the classes fits: its lowest rank among the validation photos (mahalanobis and energy) is" in html


# --- a real server and a real browser ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def serving(model):
    """``ptl serve`` in its own process, started before the module's first test, so that its start
    (importing TensorFlow, building the backbone) overlaps the in-process tests instead of following them;
    :func:`server` waits for it. Yields ``(process, url)``."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pyimagesearch_tl.cli import main; main()",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield process, f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(serving):
    """The URL of the ``ptl serve`` process once it answers ``/health`` (within 120 s of the wait)."""
    import urllib.request

    process, url = serving
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"ptl serve exited:\n{process.stdout.read()}")
            time.sleep(0.3)
    process.kill()
    pytest.fail("ptl serve did not answer within 120 s")


def test_served_by_waitress(server):
    import urllib.request

    with urllib.request.urlopen(f"{server}/health") as response:
        assert response.headers["Server"] == "waitress"


ARTIFACTS = Path(__file__).resolve().parents[1] / "output" / "test-artifacts"


def _browser(javascript: bool = True):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        message = "Chromium and its driver are not installed (make test installs Debian's chromium and chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,1300",
    ):
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    return webdriver.Chrome(service=Service(driver), options=options)


def _bars_match_values(card) -> None:
    from selenium.webdriver.common.by import By

    for row in card.find_elements(By.CSS_SELECTOR, ".bars li"):
        value = float(row.find_element(By.CSS_SELECTOR, ".value").text)
        width = row.find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("width")
        track = row.find_element(By.CSS_SELECTOR, ".track").value_of_css_property("width")
        assert float(width[:-2]) / float(track[:-2]) == pytest.approx(value, abs=0.01)


def test_the_page_in_chromium_previews_classifies_each_photo_and_explains_unknown(server, photos):
    """Choose two photos: previews at once, then a label and probability bars each; the flower is
    "unknown" with the reason. Then a photo dropped on the page, and the keyboard path."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server)
        assert "Classify images" in browser.page_source
        keyboard = ActionChains(browser)
        keyboard.send_keys(Keys.TAB).perform()
        assert browser.switch_to.active_element.get_attribute("id") == "file"  # the first stop of the keyboard
        keyboard.send_keys(Keys.TAB).perform()
        assert browser.switch_to.active_element.text == "Classify"

        browser.find_element(By.ID, "file").send_keys(f"{photos['cat']}\n{photos['flower']}")
        previews = browser.find_elements(By.CSS_SELECTOR, "#results .result img")
        assert [p.get_attribute("src")[:5] for p in previews] == ["blob:", "blob:"]  # shown before any answer
        WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .label")) == 2)
        cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [c.find_element(By.CSS_SELECTOR, ".name").text for c in cards] == [
            photos["cat"].name,
            photos["flower"].name,
        ]
        cat, flower = cards
        assert cat.find_element(By.CSS_SELECTOR, ".label").text == "cats"
        assert flower.find_element(By.CSS_SELECTOR, ".label").text == "unknown"
        assert "None of the classes fits" in flower.find_element(By.CSS_SELECTOR, ".why").text
        _bars_match_values(cat)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "serve_page.png"
        assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        dropped = base64.b64encode(photos["dog"].read_bytes()).decode()
        browser.execute_script(
            """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));""",
            dropped,
        )
        WebDriverWait(browser, 60).until(
            lambda b: [e.text for e in b.find_elements(By.CSS_SELECTOR, "#results .label")] == ["dogs"]
        )
        assert browser.find_element(By.CSS_SELECTOR, "#results .name").text == "dropped.jpg"
    finally:
        browser.quit()


def test_the_page_without_javascript_posts_the_form_and_the_server_draws_the_results(server, photos):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser(javascript=False)
    try:
        browser.get(server)
        browser.find_element(By.ID, "file").send_keys(f"{photos['cat']}\n{photos['dog']}")
        assert browser.find_elements(By.CSS_SELECTOR, "#results .result") == []  # no script: no previews
        browser.find_element(By.TAG_NAME, "button").click()
        labels = WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .label"))
        assert [label.text for label in labels] == ["cats", "dogs"]
        for card in browser.find_elements(By.CSS_SELECTOR, "#results .result"):
            assert card.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/jpeg")
            _bars_match_values(card)
    finally:
        browser.quit()
