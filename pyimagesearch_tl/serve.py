"""Classify uploaded images from a web page and an HTTP API.

``create_app(predictor)`` builds a Flask application around one :class:`~pyimagesearch_tl.prediction.Predictor`
(the bundle and the backbone are loaded once); ``serve(...)`` runs it under waitress, a production
WSGI server. ``ptl predict`` and the server share the prediction code path.

Routes
------
``GET /``            an upload page; ``POST /`` shows each image with its top-k labels.
``POST /api/predict``  multipart form field ``file`` (repeatable); JSON with ``label``,
                     ``probability`` (or ``decision`` for classifiers without probabilities), ``top``.
``GET /health``      the model's classes, backbone and unknown threshold.

Uploads are read into memory and decoded from there: nothing a client sends is written to disk or
used as a path (its file name is only echoed back as text). An upload over the size limit gets
413, a file that is not an image 400, a request without files 400; the server keeps answering.
"""

from __future__ import annotations

import base64
import io

from .images import load_image
from .prediction import UNKNOWN, Prediction, Predictor

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pyimagesearch_tl: {{ model }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #222; }
 .result { display: flex; gap: 1rem; align-items: flex-start; border-top: 1px solid #ddd; padding: 1rem 0; }
 .result img { width: 160px; height: 160px; object-fit: cover; border-radius: 4px; }
 .label { font-size: 1.4rem; font-weight: 600; }
 .unknown { color: #a15c00; }
 .error { color: #b00020; }
 table { border-collapse: collapse; } td { padding: 0.1rem 0.8rem 0.1rem 0; }
</style>
</head>
<body>
<h1>Classify images</h1>
<p>Model <b>{{ model }}</b> on {{ backbone }} features; classes: {{ classes | join(", ") }}.</p>
<form method="post" enctype="multipart/form-data">
  <input type="file" name="file" accept="image/*" multiple required>
  <button type="submit">Classify</button>
</form>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
{% for r in results %}
<div class="result">
  {% if r.thumbnail %}<img src="data:image/jpeg;base64,{{ r.thumbnail }}" alt="{{ r.name }}">{% endif %}
  <div>
    <div>{{ r.name }}</div>
    {% if r.error %}<div class="error">skipped: {{ r.error }}</div>
    {% else %}
    <div class="label {{ 'unknown' if r.unknown else '' }}" data-label="{{ r.label }}">{{ r.label }}</div>
    <table>{% for name, value in r.top %}
      <tr><td>{{ name }}</td><td>{{ "%.4f" | format(value) }}</td></tr>{% endfor %}</table>
    {% if r.unknown %}<div class="unknown">None of the classes fits: the closest is {{ r.top[0][0] }}.</div>{% endif %}
    {% endif %}
  </div>
</div>
{% endfor %}
</body>
</html>
"""


class UploadError(ValueError):
    """A request the client must fix (400)."""


def _uploads(request) -> list[tuple[str, io.BytesIO]]:
    files = [f for f in request.files.getlist("file") if f is not None]
    if not files:
        raise UploadError("no file: send one or more images in the multipart form field 'file'")
    return [(f.filename or f"upload {i + 1}", io.BytesIO(f.read())) for i, f in enumerate(files)]


def _as_json(result: Prediction, kind: str) -> dict:
    return {
        "filename": result.path,
        "label": result.label,
        kind: result.score,
        "unknown": result.label == UNKNOWN,
        "similarity": result.similarity,
        "top": [{"label": name, kind: value} for name, value in result.top],
    }


def _thumbnail(data: io.BytesIO) -> str | None:
    """A small JPEG of the upload, decoded by the shared decoder (never the client's raw bytes)."""
    from PIL import Image

    try:
        data.seek(0)
        pixels = load_image(data, 160)
    except Exception:
        return None
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(predictor: Predictor, max_upload_bytes: int = 10 * 2**20):
    """The Flask application around ``predictor``; uploads above ``max_upload_bytes`` get 413."""
    from flask import Flask, jsonify, render_template_string, request
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    bundle = predictor.bundle
    kind = predictor.score_kind
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    limit = f"{max_upload_bytes / 2**20:g} MB"

    def page(status: int = 200, results=(), error: str | None = None):
        html = render_template_string(
            PAGE,
            model=bundle.name,
            backbone=bundle.meta.backbone,
            classes=bundle.label_names,
            results=results,
            error=error,
        )
        return html, status

    @app.get("/health")
    def health():
        novelty = bundle.novelty
        return jsonify(
            status="ok",
            model=bundle.name,
            classes=bundle.label_names,
            backbone=bundle.meta.backbone,
            weights=bundle.meta.weights,
            input_size=bundle.meta.input_size,
            score=kind,
            unknown_threshold=None if novelty is None else novelty.threshold,
        )

    @app.post("/api/predict")
    def api_predict():
        uploads = _uploads(request)
        results = predictor.predict([data for _, data in uploads], [name for name, _ in uploads])
        failed = [r for r in results if r.error]
        if failed:
            raise UploadError("; ".join(f"{r.path}: {r.error}" for r in failed))
        return jsonify(model=bundle.name, predictions=[_as_json(r, kind) for r in results])

    @app.get("/")
    def index():
        return page()

    @app.post("/")
    def upload():
        uploads = _uploads(request)
        results = predictor.predict([data for _, data in uploads], [name for name, _ in uploads])
        shown = [
            dict(
                name=r.path,
                label=r.label,
                top=r.top,
                error=r.error,
                unknown=r.label == UNKNOWN,
                thumbnail=_thumbnail(data),
            )
            for r, (_, data) in zip(results, uploads)
        ]
        return page(400 if all(r.error for r in results) else 200, shown)

    def wants_json() -> bool:
        return request.path.startswith("/api/")

    @app.errorhandler(UploadError)
    def bad_upload(error):
        return (jsonify(error=str(error)), 400) if wants_json() else page(400, error=str(error))

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error):
        message = f"upload larger than the {limit} limit"
        return (jsonify(error=message), 413) if wants_json() else page(413, error=message)

    @app.errorhandler(HTTPException)
    def http_error(error):
        return (jsonify(error=error.description), error.code) if wants_json() else (error.description, error.code)

    return app


def serve(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = 10 * 2**20,
    threads: int = 4,
) -> None:
    """Run the application under waitress until interrupted."""
    import waitress

    waitress.serve(
        create_app(predictor, max_upload_bytes),
        host=host,
        port=port,
        threads=threads,
        max_request_body_size=max_upload_bytes + 2**20,
    )
