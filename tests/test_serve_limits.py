"""The web app under hostile or heavy input (issue 23): per-file answers, one 413 message per limit,
security headers, no local path in /health, each upload decoded once, and the pixel budget holding
under concurrent requests of large PNGs on the real waitress server."""

import base64
import contextlib
import io
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PTL
from PIL import Image

from pyimagesearch_tl.bundle import BUNDLE_SUFFIX, Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.serve import SECURITY_HEADERS, create_app


def _train(features: Path, output: Path) -> Path:
    result = CliRunner().invoke(cli, ["train", "--features", str(features), "--output", str(output), "--cv", "2"])
    assert result.exit_code == 0, result.output
    return output / f"logreg{BUNDLE_SUFFIX}"


@pytest.fixture(scope="module")
def model(pipeline_run, tmp_path_factory) -> Path:
    return _train(pipeline_run["features"], tmp_path_factory.mktemp("limits_models"))


@pytest.fixture(scope="module")
def predictor(model) -> Predictor:
    return Predictor(Bundle.load(model))


@pytest.fixture(scope="module")
def photos(pipeline_run) -> list[Path]:
    return sorted((pipeline_run["dataset"] / "validation").rglob("*.jpg"))[:3]


def form(*items) -> dict:
    """Flask test client form data: ``(bytes or path, file name)`` items in the field ``file``."""
    return {"file": [(io.BytesIO(p.read_bytes() if isinstance(p, Path) else p), name) for p, name in items]}


def png(width: int, height: int) -> bytes:
    """A PNG of one colour: a few KB that decode to ``width * height`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_file_gets_its_own_answer_in_the_api_and_the_page(predictor, photos):
    client = create_app(predictor).test_client()
    sent = form((photos[0], "a.jpg"), (b"hello, not a photo", "notes.txt"), (b"", "empty.jpg"), (photos[1], "b.jpg"))
    response = client.post("/api/predict", data=sent)
    assert response.status_code == 200
    answers = response.get_json()["predictions"]
    assert [a["filename"] for a in answers] == ["a.jpg", "notes.txt", "empty.jpg", "b.jpg"]
    errors = [None, "not an image (unrecognised file content)", "empty file (0 bytes)", None]
    assert [a["error"] for a in answers] == errors
    for sent_with_others, path in zip([answers[0], answers[3]], photos):  # as if each photo were sent alone
        [alone] = client.post("/api/predict", data=form((path, "x.jpg"))).get_json()["predictions"]
        assert sent_with_others["label"] == alone["label"]
        assert sent_with_others["probability"] == pytest.approx(alone["probability"], abs=1e-5)
    assert answers[1]["label"] is None and answers[1]["top"] == []

    page = client.post("/", data=form((photos[0], "a.jpg"), (b"junk", "junk.jpg")))
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and html.count('class="result"') == 2
    assert f'data-label="{answers[0]["label"]}"' in html and "skipped: not an image" in html

    only_bad = client.post("/api/predict", data=form((b"junk", "junk.jpg")))
    assert only_bad.status_code == 200 and only_bad.get_json()["predictions"][0]["error"].startswith("not an image")
    none = client.post("/api/predict", data={}, content_type="multipart/form-data")
    assert none.status_code == 400 and "no file" in none.get_json()["error"]
    text = client.post("/api/predict", data=b"a photo", content_type="text/plain")
    assert text.status_code == 400 and "multipart form field 'file'" in text.get_json()["error"]


def test_each_limit_has_its_own_413_naming_it_and_its_value(predictor):
    client = create_app(predictor, max_upload_bytes=2 * 2**20).test_client()
    body = client.post("/api/predict", data=form((b"\0" * (3 * 2**20), "big.png")))
    assert body.status_code == 413
    assert body.get_json()["error"] == (
        "the request body (3.0 MB) is larger than the 2 MB limit on a request (MAX_CONTENT_LENGTH, ptl serve "
        "--max-upload-mb)"
    )
    parts = client.post("/api/predict", data=form(*[(b"x", f"{i}.png") for i in range(1001)]))  # under 1 MB
    assert parts.status_code == 413
    assert parts.get_json()["error"] == "the form has more than 1000 parts, the limit on a request (MAX_FORM_PARTS)"
    field = client.post("/api/predict", data={"note": "x" * 500_001, **form((b"x", "a.png"))})
    assert field.status_code == 413
    assert field.get_json()["error"] == (
        "a form field that is not a file is larger than 500000 bytes, the limit on such a field (MAX_FORM_MEMORY_SIZE)"
    )
    page = client.post("/", data=form(*[(b"x", f"{i}.png") for i in range(1001)]))
    assert page.status_code == 413 and "more than 1000 parts" in page.get_data(as_text=True)
    fewer = create_app(predictor, max_form_parts=3).test_client()
    assert "more than 3 parts" in fewer.post("/api/predict", data=form(*[(b"x", "a")] * 4)).get_json()["error"]
    malformed = client.post("/api/predict", data=b"--x\r\nno headers", content_type="multipart/form-data; boundary=x")
    assert malformed.status_code == 400 and malformed.get_json()["error"].startswith("malformed multipart form")


def test_every_response_carries_the_security_headers_and_the_page_has_no_inline_script(predictor, photos):
    client = create_app(predictor, max_upload_bytes=2**20).test_client()
    responses = [
        client.get("/"),
        client.get("/health"),
        client.get("/static/classify.js"),
        client.get("/static/classify.css"),
        client.get("/no-such-page"),
        client.post("/api/predict", data=form((photos[0], "a.jpg"))),
        client.post("/api/predict", data={}, content_type="multipart/form-data"),
        client.post("/api/predict", data=form((b"\0" * 2**21, "big.png"))),
        client.post("/", data=form((b"junk", "junk.jpg"))),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 404, 200, 400, 413, 200]
    for response in responses:
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value, (response.request.path, name)
    policy = dict(d.strip().split(" ", 1) for d in SECURITY_HEADERS["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'none'" and "unsafe" not in policy["style-src"]
    assert SECURITY_HEADERS["X-Content-Type-Options"] == "nosniff" and SECURITY_HEADERS["X-Frame-Options"] == "DENY"
    html = responses[0].get_data(as_text=True)
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/classify.js">']
    assert "<style" not in html and not re.search(r"\son[a-z]+=", html)  # no inline style sheet, no handlers
    assert responses[2].headers["Content-Type"].startswith("text/javascript")


def test_health_names_the_weights_file_without_its_local_path(pipeline_run, tmp_path):
    from pyimagesearch_tl.backbones.efficientnet_lite import cached_weights

    folder = tmp_path / "private folder"
    folder.mkdir()
    weights = shutil.copy(cached_weights("efficientnet_lite0"), folder / "lite0.weights.h5")
    extracted = CliRunner().invoke(
        cli,
        ["extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(tmp_path / "features")]
        + ["--weights", str(weights), "--batch-size", "16"],
    )
    assert extracted.exit_code == 0, extracted.output
    bundle = Bundle.load(_train(tmp_path / "features", tmp_path / "models"))
    assert bundle.meta.weights == str(weights)  # the bundle keeps the path; the server shows the name
    response = create_app(Predictor(bundle)).test_client().get("/health")
    assert response.get_json()["weights"] == "lite0.weights.h5"
    assert str(tmp_path) not in response.get_data(as_text=True)


def test_each_upload_is_decoded_once_and_its_thumbnail_is_what_the_model_saw(predictor, photos):
    app = create_app(predictor)
    budget, client = app.extensions["pixel_budget"], app.test_client()
    page = client.post("/", data=form((photos[0], "a.jpg"), (b"junk", "junk.jpg"), (photos[1], "b.jpg")))
    assert page.status_code == 200 and budget.decodes == 3  # every decode holds the budget: one per upload
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page.get_data(as_text=True))
    sizes = [Image.open(io.BytesIO(base64.b64decode(t))).size for t in thumbnails]
    side = predictor.bundle.meta.input_size
    assert sizes == [(side, side)] * 2  # the model's input itself, not a second decode at another size
    client.post("/api/predict", data=form((photos[2], "c.jpg")))
    assert budget.decodes == 4


@pytest.fixture()
def waitress_server():
    """Start the real waitress server on a free port around an app; yields ``start(app) -> url``."""
    import waitress.server

    servers = []

    def start(app) -> str:
        server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=4)

        def run():
            with contextlib.suppress(OSError):  # close() below races the loop's select(): EBADF at shutdown only
                server.run()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.effective_port}"

    yield start
    for server, thread in servers:
        server.close()
        server.task_dispatcher.shutdown()
        thread.join(timeout=10)


def _post(url: str, files: list[tuple[str, bytes]]) -> tuple[int, dict, dict]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
            + content
            + b"\r\n"
            for name, content in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}/api/predict", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def test_the_pixel_budget_bounds_decoding_across_concurrent_requests(predictor, photos, waitress_server):
    """Four requests at once, each of three 4000x4000 PNGs (a few KB each, 64 MB each once decoded),
    on the real waitress server with a budget of one such image: they queue, one decode at a time, and
    every file is answered (what it costs in memory: the next test)."""
    side = 4000
    app = create_app(predictor, pixel_budget=side * side)
    budget, url = app.extensions["pixel_budget"], waitress_server(app)
    big = png(side, side)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: _post(url, [(f"big-{i}-{k}.png", big) for k in range(3)]), range(4)))

    assert [status for status, _, _ in replies] == [200] * 4
    answers = [a for _, _, answer in replies for a in answer["predictions"]]
    assert len(answers) == 12 and all(a["error"] is None and a["label"] for a in answers)
    assert len({a["label"] for a in answers}) == 1  # the same image, the same answer, queued or not
    assert budget.peak == side * side and budget.decodes == 12  # one image decoded at a time

    # an image larger than the whole budget is refused on its own; the others in its request are answered
    status, headers, answer = _post(url, [("huge.png", png(side + 1, side)), ("photo.jpg", photos[0].read_bytes())])
    huge, photo = answer["predictions"]
    assert status == 200 and photo["error"] is None
    assert huge["error"] == (
        f"{side + 1}x{side} = {(side + 1) * side} pixels is more than this server decodes at once "
        f"(its pixel budget: {side * side} pixels)"
    )
    assert headers["X-Frame-Options"] == "DENY"  # the headers come through waitress too
    status, headers, answer = _post(url, [("x.png", b"x")] * 1001)
    assert status == 413 and "MAX_FORM_PARTS" in answer["error"] and "Content-Security-Policy" in headers


def _status_kib(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


@pytest.fixture()
def serve(tmp_path):
    """``ptl serve --model MODEL`` as a user starts it, in a process of its own (its memory is the server's
    alone); ``serve(model)`` returns ``(url, pid)`` once it answers /health."""
    processes = []

    def start(model: Path) -> tuple[str, int]:
        with socket.socket() as probe:  # a free port (the server binds it a moment later)
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        log = tmp_path / f"serve-{len(processes)}.log"
        with log.open("w") as sink:
            process = subprocess.Popen(
                [*PTL, "serve", "--model", str(model), "--port", str(port)], stdout=sink, stderr=sink
            )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert process.poll() is None, log.read_text()
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=5).close()
                return url, process.pid
            time.sleep(0.1)
        raise AssertionError(f"ptl serve did not answer in 60 s: {log.read_text()}")

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def _grown(pid: int, send) -> tuple[float, float]:
    """MiB process ``pid``'s peak and resident memory grew by while ``send()`` ran (Linux's /proc)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib(pid)
    send()
    after = _status_kib(pid)
    return (after["VmHWM"] - before["VmRSS"]) / 1024, (after["VmRSS"] - before["VmRSS"]) / 1024


def _batch_and_upload_growth(url: str, pid: int, photo: Path) -> tuple[float, float]:
    """The peak growth of one request of 32 photos (a batch), then of one of 160, each request thread warmed."""
    upload = ("photo.jpg", photo.read_bytes())
    with ThreadPoolExecutor(4) as pool:  # every request thread warmed: runtime chosen, buffers made
        assert [status for status, _, _ in pool.map(lambda _: _post(url, [upload] * 3), range(4))] == [200] * 4
    batch, _ = _grown(pid, lambda: _post(url, [upload] * 32))
    many, _ = _grown(pid, lambda: _post(url, [upload] * 160))
    return batch, many


LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through /proc")


@LINUX_PROC
def test_a_served_flood_costs_one_decoded_image_and_a_large_upload_one_batch_of_memory(serve, model, photos):
    """The real ``ptl serve`` process, measured from /proc. Four requests at once of an 8000x8000 PNG each
    (244 MiB once decoded; its default budget fits one): its peak grows by about one decoded image, not
    four, and the memory goes back afterwards. One request of 160 photos costs about what one of
    32 (a batch) costs: the network sees them a batch at a time, not all at once (~9 MB each)."""
    url, pid = serve(model)
    batch, many = _batch_and_upload_growth(url, pid, photos[0])
    assert many < 2 * batch + 64, f"160 photos grew the peak by {many:.0f} MiB, 32 by {batch:.0f} MiB"

    side = 8000
    big, decoded_mib = png(side, side), side * side * 4 / 2**20  # Pillow holds RGB as 4 bytes a pixel

    def flood():
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: _post(url, [(f"big-{i}.png", big)]), range(4)))
        assert [len(answer["predictions"]) for status, _, answer in replies if status == 200] == [1] * 4

    peak, kept = _grown(pid, flood)
    assert peak < 2 * decoded_mib, f"peak grew by {peak:.0f} MiB, one decoded image is {decoded_mib:.0f} MiB"
    assert kept < decoded_mib / 2, f"{kept:.0f} MiB more resident after the flood"  # handed back to the system


@LINUX_PROC
def test_an_exported_graph_served_runs_a_large_upload_a_batch_at_a_time(serve, model, photos, tmp_path):
    """The same for ``ptl serve --model x.onnx`` (ONNX Runtime, no TensorFlow): 160 photos in one request
    cost about what 32 cost (all at once, 999 photos took 10.5 GB)."""
    graph = tmp_path / "model.onnx"
    exported = CliRunner().invoke(cli, ["export", "--model", str(model), "--output", str(graph)])
    assert exported.exit_code == 0, exported.output
    batch, many = _batch_and_upload_growth(*serve(graph), photos[0])
    assert many < 2 * batch + 64, f"160 photos grew the peak by {many:.0f} MiB, 32 by {batch:.0f} MiB"


def test_a_transparent_image_holds_the_budget_its_decoding_costs():
    """Decoding an RGBA or palette image composites it through full-size RGBA copies (~5x an RGB image's
    memory): the budget counts it so, read from the header alone; an RGB image of the same size fits."""
    from PIL import Image

    from pyimagesearch_tl.errors import ImageError
    from pyimagesearch_tl.serve import PixelBudget, _header_cost

    uploads = {}
    for mode in ("RGB", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (400, 300)).save(buffer, "PNG")
        uploads[mode] = buffer
    costs = {mode: _header_cost(data) for mode, data in uploads.items()}
    assert costs == {"RGB": ((400, 300), 1), "RGBA": ((400, 300), 5), "P": ((400, 300), 5)}
    budget = PixelBudget(400 * 300 * 2)
    with budget.hold(*costs["RGB"]):
        assert budget.peak == 400 * 300
    with pytest.raises(ImageError, match=r"400x300 = 120000 pixels \(5x for its transparency or palette\)"):
        with budget.hold(*costs["RGBA"]):
            pass
