"""Classify uploaded images from a web page and an HTTP API.

``create_app(predictor)`` builds a Flask application around one :class:`~pyimagesearch_tl.prediction.Predictor`
(the bundle and the backbone, or an exported ``.onnx``, loaded once); ``serve(...)`` runs it under waitress,
a production WSGI server. ``ptl predict`` and the server share the prediction code path.

Routes
------
``GET /``            the page: drop or choose photos, previews at once, probability bars and the
                     "unknown" verdict explained (``static/classify.js``); without JavaScript the form
                     posts to ``POST /``, which draws the same results on the server.
``POST /api/predict``  multipart form field ``file`` (repeatable); JSON with one entry per file, in
                     order: ``label``, ``probability`` (or ``decision`` for classifiers without
                     probabilities), ``top``, ``unknown``, ``familiarity`` (the "unknown" detector's
                     score; also under its former name ``similarity``), and ``error`` (None, or why
                     that file was skipped: the others are still classified).
``GET /health``      the model's classes, backbone, weights (by name), unknown threshold and what it was
                     calibrated on (``"95% of the validation photos"``: the share of them it keeps).

What a client sends is trusted for nothing
------------------------------------------
Uploads are read into memory and decoded from there: none is saved under a name or used as a path
(its file name is only echoed back as text). Each limit has its own 413 answer, which names it and
its value: the request body (``MAX_CONTENT_LENGTH``, ``ptl serve --max-upload-mb``), the parts of the
form (``MAX_FORM_PARTS``) and a form field that is not a file (``MAX_FORM_MEMORY_SIZE``). A request
without files, or not a multipart form, gets 400. Past those, every request gets 200 and every file
its own answer: a file that is not an image, is damaged, or is larger than the decoder or the pixel
budget allows is one entry with its ``error``.

A few hundred kilobytes of PNG can hold 88 million pixels (350 MB decoded), so the bytes of a request
say little about the memory its images take. A :class:`PixelBudget` bounds the pixels being decoded
at once across all request threads: each image holds its pixel count, read from its header before
anything is decoded, while the shared decoder (:func:`pyimagesearch_tl.images.load_image`) turns it
into the model's input, and waits its turn when the budget is taken; after a large image the memory
the C allocator kept is handed back to the system before the next one starts. An image larger than
the whole budget is refused with its own error. Each image is decoded once: the page's thumbnail is
the model's input itself.

Every response carries a Content-Security-Policy that allows no inline script (the page's script and
style are files under ``static/``), ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import ctypes
import io
import threading
from pathlib import PureWindowsPath
from typing import Iterator

import numpy as np

from .errors import ImageError
from .features import Batch
from .images import MAX_PIXELS, declared_cost
from .prediction import UNKNOWN, Prediction, Predictor

#: Werkzeug's defaults, set explicitly: the parts of one form, and the bytes of a form field that is not a file.
MAX_FORM_PARTS = 1000
MAX_FORM_MEMORY_SIZE = 500_000

#: Images of at least this many pixels hand the memory of their decode back to the system when done.
#: glibc keeps what a thread frees in that thread's arena, and each decode runs on a thread of its own,
#: so without it decodes taking turns would each leave their pages resident (4000x4000 PNGs: the
#: peak grew by 87-130 MiB for one 61 MiB image at a time, and by 64-66 MiB with it).
RETURN_MEMORY_PIXELS = 2**22

#: The headers of every response. Style attributes are allowed (the server draws each bar's width as
#: one when the page has no JavaScript); scripts, style sheets, images and requests come from this
#: server only (previews are ``blob:`` URLs, thumbnails ``data:`` JPEGs).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class UploadError(Exception):
    """A request the client must fix: ``status`` 400, or 413 above a limit on what it may send (the
    message names the limit and its value)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _malloc_trim():
    """glibc's ``malloc_trim``, or None under another C library (whose allocator is left as it is)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


_MALLOC_TRIM = _malloc_trim()


class PixelBudget:
    """At most ``limit`` decoded pixels in flight across all request threads, first come, first served.

    Parameters
    ----------
    limit : int
        Pixels that may be decoded at once. The default of :func:`create_app` is the decoder's
        largest image (:data:`~pyimagesearch_tl.images.MAX_PIXELS`): one image of that size at a time,
        or hundreds of photos.

    Attributes
    ----------
    peak : int
        The most pixels held at once so far.
    decodes : int
        How many decodes have held the budget: one per upload (those the decoder refuses included).
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"pixel budget must be at least 1, got {limit}")
        self.limit, self.peak, self.decodes = limit, 0, 0
        self._held = 0
        self._queue: collections.deque = collections.deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, size: tuple[int, int], weight: int = 1) -> Iterator[None]:
        """Hold the pixels of an image of ``size`` ``(width, height)``, times ``weight`` (what decoding
        its mode costs against RGB: :data:`~pyimagesearch_tl.images.DECODE_WEIGHT`), for the block,
        waiting behind earlier holders for room.

        Raises
        ------
        ImageError
            When the image has more pixels than the whole budget.
        """
        pixels = size[0] * size[1] * weight
        if pixels > self.limit:
            costs = f" ({weight}x for its transparency or palette)" if weight > 1 else ""
            raise ImageError(
                f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels{costs} is more than this server decodes at once "
                f"(its pixel budget: {self.limit} pixels)"
            )
        turn = object()
        with self._changed:
            self._queue.append(turn)
            self._changed.wait_for(lambda: self._queue[0] is turn and self._held + pixels <= self.limit)
            self._queue.popleft()
            self._held += pixels
            self.peak, self.decodes = max(self.peak, self._held), self.decodes + 1
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            if pixels >= RETURN_MEMORY_PIXELS and _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)  # before its pixels go back to the budget: the next image finds them gone
            with self._changed:
                self._held -= pixels
                self._changed.notify_all()


def _header_cost(data: io.BytesIO) -> tuple[tuple[int, int], int]:
    """The ``(width, height)`` an upload's header declares and its decoding weight, nothing decoded.

    ``((0, 0), 1)`` when Pillow cannot open it: the decoder then refuses it at the same step, with the
    reason, before decoding anything. A JPEG the decoder reads at a reduced scale counts at its full
    size: the budget errs on the safe side.
    """
    try:
        return declared_cost(data)
    except ImageError:
        return (0, 0), 1
    finally:
        data.seek(0)


def _decode(predictor: Predictor, budget: PixelBudget, uploads: list[tuple[str, io.BytesIO]]) -> Batch:
    """The uploads decoded by the predictor's decoder, one at a time, each under ``budget``, as one batch."""
    indices, decoded, skipped = [], [], []
    for index, (_, data) in enumerate(uploads):
        try:
            with budget.hold(*_header_cost(data)):
                (batch,) = predictor.iter_batches([data])
        except ImageError as exc:
            skipped.append((index, str(exc)))
            continue
        if batch.indices:
            indices.append(index)
            decoded.append(batch.images)
        skipped += [(index, reason) for _, reason in batch.skipped]
    if not decoded:
        images = np.zeros((0, 0, 0, 3), np.uint8)
    elif isinstance(decoded[0], tuple):  # a combined bundle: one array per input size
        images = tuple(np.concatenate(views) for views in zip(*decoded))
    else:
        images = np.concatenate(decoded)
    return Batch(indices, images, skipped)


def _thumbnails(batch: Batch, count: int) -> list[str | None]:
    """Each upload's thumbnail: the pixels the model saw (its first input size), as a base64 JPEG."""
    from PIL import Image

    images = batch.images[0] if isinstance(batch.images, tuple) else batch.images
    thumbnails: list[str | None] = [None] * count
    for index, pixels in zip(batch.indices, images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        thumbnails[index] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return thumbnails


def _read_uploads(request, max_parts: int, max_field_bytes: int, limit: str) -> list[tuple[str, io.BytesIO]]:
    """The files of the multipart field ``file``, each read into memory, every limit checked as the body is read.

    Raises
    ------
    UploadError
        413 above ``MAX_CONTENT_LENGTH`` (``limit``), ``max_parts`` parts or a field of ``max_field_bytes``;
        400 for a request that is not a multipart form, a malformed one, or one without files.
    """
    from werkzeug.exceptions import RequestEntityTooLarge
    from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

    too_large = f"larger than the {limit} limit on a request (MAX_CONTENT_LENGTH, ptl serve --max-upload-mb)"
    if request.max_content_length is not None and (request.content_length or 0) > request.max_content_length:
        raise UploadError(f"the request body ({request.content_length / 2**20:.1f} MB) is {too_large}", 413)
    boundary = request.mimetype_params.get("boundary", "")
    if request.mimetype != "multipart/form-data" or not boundary:
        raise UploadError("no file: send one or more images in the multipart form field 'file'")
    files: list[tuple[str, io.BytesIO]] = []
    parts, field_bytes, target = 0, None, None
    try:
        decoder = MultipartDecoder(boundary.encode("latin-1"))
        while True:
            chunk = request.stream.read(2**16)
            decoder.receive_data(chunk or None)
            event = decoder.next_event()
            while not isinstance(event, (NeedData, Epilogue)):
                if isinstance(event, (Field, File)):
                    parts += 1
                    if parts > max_parts:
                        raise UploadError(
                            f"the form has more than {max_parts} parts, the limit on a request (MAX_FORM_PARTS)", 413
                        )
                    field_bytes = 0 if isinstance(event, Field) else None
                    target = None
                    if isinstance(event, File) and event.name == "file":
                        target = io.BytesIO()
                        files.append((event.filename or f"upload {len(files) + 1}", target))
                elif isinstance(event, Data):
                    if field_bytes is not None:
                        field_bytes += len(event.data)
                        if field_bytes > max_field_bytes:
                            raise UploadError(
                                f"a form field that is not a file is larger than {max_field_bytes} bytes, "
                                "the limit on such a field (MAX_FORM_MEMORY_SIZE)",
                                413,
                            )
                    if target is not None:
                        target.write(event.data)
                event = decoder.next_event()
            if not chunk:
                break
    except RequestEntityTooLarge:  # a body without a length, read past the limit
        raise UploadError(f"the request body is {too_large}", 413) from None
    except ValueError as exc:
        raise UploadError(f"malformed multipart form: {exc}") from None
    if not files:
        raise UploadError("no file: send one or more images in the multipart form field 'file'")
    for _, data in files:
        data.seek(0)
    return files


def _as_json(result: Prediction, kind: str) -> dict:
    return {
        "filename": result.path,
        "label": result.label,
        kind: result.score,
        "unknown": result.label == UNKNOWN,
        "familiarity": result.familiarity,
        "similarity": result.familiarity,  # its name before 2026-12, kept for clients written then
        "top": [{"label": name, kind: value} for name, value in result.top],
        "error": result.error,
    }


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
        f"None of the classes fits: its {novelty.score_name} is {result.familiarity:.3f}, below "
        f"{novelty.threshold:.3f}, the level {novelty.calibration_rule} reach "
        f"(closest class: {result.top[0][0]})."
    )


def _weights_name(meta) -> str:
    """The backbone weights by name (``imagenet``, ``finetuned``, a file's name): never a local path."""
    return "+".join(PureWindowsPath(part.weights).name for part in getattr(meta, "parts", (meta,)))


def create_app(
    predictor: Predictor,
    max_upload_bytes: int = 10 * 2**20,
    pixel_budget: int = MAX_PIXELS,
    max_form_parts: int = MAX_FORM_PARTS,
):
    """The Flask application around ``predictor``.

    Parameters
    ----------
    predictor : Predictor
        A bundle's predictor, or an :class:`~pyimagesearch_tl.export.OnnxPredictor`.
    max_upload_bytes : int
        The largest request body (``MAX_CONTENT_LENGTH``); above it, 413.
    pixel_budget : int
        Pixels decoded at once across all request threads (:class:`PixelBudget`, in
        ``app.extensions["pixel_budget"]``); a larger image is refused with its own error.
    max_form_parts : int
        The most parts of one multipart form (``MAX_FORM_PARTS``); above it, 413.
    """
    from flask import Flask, jsonify, render_template, request

    bundle = predictor.bundle
    kind = predictor.score_kind
    novelty = bundle.novelty
    budget = PixelBudget(pixel_budget)
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=max_upload_bytes, MAX_FORM_PARTS=max_form_parts, MAX_FORM_MEMORY_SIZE=MAX_FORM_MEMORY_SIZE
    )
    app.extensions["pixel_budget"] = budget
    limit = f"{max_upload_bytes / 2**20:g} MB"

    def classify() -> tuple[list[Prediction], Batch]:
        uploads = _read_uploads(request, max_form_parts, MAX_FORM_MEMORY_SIZE, limit)
        batch = _decode(predictor, budget, uploads)
        return predictor.predict_batches([batch], [name for name, _ in uploads]), batch

    def page(status: int = 200, results=(), error: str | None = None):
        html = render_template(
            "classify.html",
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
            weights=_weights_name(bundle.meta),
            input_size=bundle.meta.input_size,
            score=kind,
            unknown_threshold=None if novelty is None else novelty.threshold,
            unknown_calibration=None if novelty is None else novelty.calibration_rule,
        )

    @app.post("/api/predict")
    def api_predict():
        results, _ = classify()
        return jsonify(model=bundle.name, predictions=[_as_json(r, kind) for r in results])

    @app.get("/")
    def index():
        return page()

    @app.post("/")
    def upload():
        results, batch = classify()
        shown = [
            dict(
                name=r.path,
                label=r.label,
                bars=_bars(r.top, kind) if r.top else [],
                error=r.error,
                unknown=r.label == UNKNOWN,
                why=_why_unknown(r, novelty) if r.label == UNKNOWN else "",
                thumbnail=thumbnail,
            )
            for r, thumbnail in zip(results, _thumbnails(batch, len(results)))
        ]
        return page(200, shown)

    @app.after_request
    def security_headers(response):
        response.headers.update(SECURITY_HEADERS)
        return response

    def answer(message: str, status: int):
        return (jsonify(error=message), status) if request.path.startswith("/api/") else page(status, error=message)

    @app.errorhandler(UploadError)
    def refused(error):
        return answer(str(error), error.status)

    from werkzeug.exceptions import HTTPException

    @app.errorhandler(HTTPException)
    def http_error(error):
        if request.path.startswith("/api/"):
            return jsonify(error=error.description), error.code
        return error.description, error.code, {"Content-Type": "text/plain; charset=utf-8"}

    return app


def serve(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_bytes: int = 10 * 2**20,
    threads: int = 4,
    pixel_budget: int = MAX_PIXELS,
) -> None:
    """Run the application under waitress until interrupted (see :func:`create_app` for the limits).

    Waitress itself refuses a body more than 1 MB above ``max_upload_bytes`` (its own 413) before the
    application reads it.
    """
    import waitress

    waitress.serve(
        create_app(predictor, max_upload_bytes, pixel_budget),
        host=host,
        port=port,
        threads=threads,
        max_request_body_size=max_upload_bytes + 2**20,
    )
