"""Classify uploaded images from a web page and an HTTP API.

``create_app(predictor)`` builds a Flask application around one :class:`~pyimagesearch_tl.prediction.Predictor`
(the bundle and the backbone are loaded once); ``serve(...)`` runs it under waitress, a production
WSGI server. ``ptl predict`` and the server share the prediction code path.

Routes
------
``GET /``            the page: drop or choose photos, previews at once, probability bars and the
                     "unknown" verdict explained (JavaScript); without JavaScript the form posts to
                     ``POST /``, which draws the same results on the server.
``POST /api/predict``  multipart form field ``file`` (repeatable); JSON with ``label``,
                     ``probability`` (or ``decision`` for classifiers without probabilities), ``top``.
``GET /health``      the model's classes, backbone and unknown threshold.

Uploads are read into memory and decoded from there: nothing a client sends is written to disk or
used as a path (its file name is only echoed back as text). An upload over the size limit gets
413, a file that is not an image 400, a request without files 400; the server keeps answering.
"""

from __future__ import annotations

import base64
import importlib.resources
import io

from .images import load_image
from .prediction import UNKNOWN, Prediction, Predictor

#: The page: a form that works without JavaScript, and a script that previews, classifies photo by
#: photo and draws the same bars as the server (templates/classify.html).
PAGE = importlib.resources.files(__package__).joinpath("templates", "classify.html").read_text(encoding="utf-8")


def _bars(top: list[tuple[str, float]], kind: str) -> list[tuple[str, float, float]]:
    """``(class, score, bar width %)``: probabilities as they are, decision scores scaled lowest..best."""
    values = [value for _, value in top]
    if kind == "probability":
        widths = [100 * v for v in values]
    else:
        low, high = min(values), max(values)
        widths = [100 * (v - low) / (high - low) if high > low else 100.0 for v in values]
    return [(name, value, width) for (name, value), width in zip(top, widths)]


def _why_unknown(result: Prediction, novelty) -> str:
    return (
        f"None of the classes fits: its {novelty.score_name} is {result.similarity:.3f}, below "
        f"{novelty.threshold:.3f}, the level {round(100 * novelty.keep)}% of the {novelty.calibration} reach "
        f"(closest class: {result.top[0][0]})."
    )


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

    novelty = bundle.novelty

    def page(status: int = 200, results=(), error: str | None = None):
        html = render_template_string(
            PAGE,
            model=bundle.name,
            backbone=bundle.meta.backbone,
            classes=bundle.label_names,
            kind=kind,
            threshold=None if novelty is None else novelty.threshold,
            keep=None if novelty is None else novelty.keep,
            score_name="" if novelty is None else novelty.score_name,
            calibration="" if novelty is None else novelty.calibration,
            results=results,
            error=error,
        )
        return html, status

    @app.get("/health")
    def health():
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
                bars=_bars(r.top, kind) if r.top else [],
                error=r.error,
                unknown=r.label == UNKNOWN,
                why=_why_unknown(r, novelty) if r.label == UNKNOWN else "",
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
