"""The web page and the HTTP API, through Flask's test client and a real headless browser."""

import io
import os
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
    return models / "logreg.joblib"


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
    assert 0 < body["unknown_threshold"] < 1


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


def test_bad_requests_get_clear_errors_and_the_server_keeps_answering(client, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    none = client.post("/api/predict", data={}, content_type="multipart/form-data")
    assert none.status_code == 400 and "no file" in none.get_json()["error"]
    text = client.post(
        "/api/predict",
        data=upload((io.BytesIO(b"hello, not a photo"), "../../etc/passwd")),
        content_type="multipart/form-data",
    )
    assert text.status_code == 400
    assert text.get_json()["error"] == "../../etc/passwd: not an image (unrecognised file content)"
    empty = client.post("/api/predict", data=upload((io.BytesIO(b""), "empty.jpg")), content_type="multipart/form-data")
    assert empty.status_code == 400 and "empty file" in empty.get_json()["error"]
    big = client.post(
        "/api/predict", data=upload((io.BytesIO(os.urandom(3 * 2**20)), "huge.jpg")), content_type="multipart/form-data"
    )
    assert big.status_code == 413 and "larger than the 2 MB limit" in big.get_json()["error"]
    assert list(tmp_path.iterdir()) == []  # nothing the client sent was written
    again = client.post("/api/predict", data=upload((photos["cat"], "cat.jpg")), content_type="multipart/form-data")
    assert again.status_code == 200 and again.get_json()["predictions"][0]["label"] == "cats"


def test_page_shows_each_image_with_its_labels(client, photos):
    assert b'<input type="file" name="file"' in client.get("/").data
    response = client.post(
        "/",
        data=upload((photos["dog"], "<b>dog</b>.jpg"), (io.BytesIO(b"junk"), "junk.jpg")),
        content_type="multipart/form-data",
    )
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'data-label="dogs"' in html and "data:image/jpeg;base64," in html
    assert "&lt;b&gt;dog&lt;/b&gt;.jpg" in html and "<b>dog</b>" not in html  # names are escaped
    assert "skipped: not an image" in html


# --- a real server and a real browser ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(model):
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
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"ptl serve exited:\n{process.stdout.read()}")
            time.sleep(0.3)
    else:
        process.kill()
        pytest.fail("ptl serve did not answer within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_served_by_waitress(server):
    import urllib.request

    with urllib.request.urlopen(f"{server}/health") as response:
        assert response.headers["Server"] == "waitress"


def test_headless_browser_uploads_a_photo_and_sees_its_label(server, photos):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(
            "Chromium and its driver are not installed (make test installs Debian's chromium and "
            "chromium-driver where apt-get can)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(server)
        assert "Classify images" in browser.page_source
        browser.find_element(By.NAME, "file").send_keys(str(photos["cat"]))
        browser.find_element(By.TAG_NAME, "button").click()
        label = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, ".label"))
        assert label.text == "cats"
        assert browser.find_element(By.CSS_SELECTOR, ".result img").get_attribute("src").startswith("data:image/jpeg")
    finally:
        browser.quit()
