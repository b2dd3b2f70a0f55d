"""Feature extraction: images -> backbone -> feature vectors, batch by batch.

:class:`FeatureExtractor` is the one path from image files to feature vectors; ``extract`` (through
:func:`extract_shards`, on whichever engine), ``predict`` and fine-tuned evaluation all use it.
Images are decoded by :func:`pyimagesearch_tl.images.load_image` in a thread pool that runs ahead
of the model (decoding overlaps inference, order is kept), and the model is called on whole batches
(in the runtime :mod:`pyimagesearch_tl.runtimes` chose) on uint8 pixels: casting and preprocessing
are part of the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import quiet
from .backbones import (
    FINETUNED,
    create_model,
    get_backbone,
    preprocess_input,
    resolve_weights,
    weights_digest,
    weights_identity,
)
from .cache import cached_file
from .cpus import available_cpus
from .engines import ShardTask
from .errors import BundleError, ConfigError, DatasetError, ImageError
from .images import DECODER, MAX_PIXELS, SQUASH, Resize, load_image, sha256_file
from .layouts import read_manifest
from .runtimes import (
    TENSORFLOW,
    cached_network,
    checked_network,
    choose,
    export_onnx,
    load,
    network_key,
    network_width,
    quantize_network,
    requested_runtime,
    survey,
)
from .store import CombinedMeta, FeatureMeta, FeatureSet, Shard


@dataclasses.dataclass
class Batch:
    """One decoded batch: the positions (in the input list) that decoded, their pixels, and the skips.

    ``images`` is one ``(n, size, size, 3)`` uint8 array, or a tuple of them, one per size, when the
    batch was decoded at several sizes (combined backbones).
    """

    indices: list[int]
    images: np.ndarray | tuple[np.ndarray, ...]
    skipped: list[tuple[int, str]]


def decode_batches(
    paths: Sequence,
    size: int | tuple[int, ...],
    batch_size: int,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    prefetch: int = 2,
    resize: Resize | tuple[Resize, ...] = SQUASH,
) -> Iterator[Batch]:
    """Decode ``paths`` (files or binary file objects) in order, ``batch_size`` at a time.

    A thread pool keeps ``prefetch`` batches in flight ahead of the consumer, so decoding overlaps
    the model. Images the decoder refuses are reported in :attr:`Batch.skipped` with the reason.
    With a tuple of sizes (and one ``resize`` for each, or one for all), every image is decoded from
    its file at each size (exactly as an extractor of that size alone decodes it). The decoding
    threads run at the lowest scheduling priority: on a CPU the model is the bottleneck, so they
    should only use the cycles it leaves idle; when the model waits for images, nothing else
    competes and they get the CPU anyway (see benchmarks/bench_extract.py).
    """
    sizes = size if isinstance(size, tuple) else (size,)
    fits = resize if isinstance(resize, tuple) else (resize,) * len(sizes)

    def decode(path) -> list[np.ndarray] | str:
        try:
            decoded = []
            for side, fit in zip(sizes, fits):
                if hasattr(path, "seek"):  # an upload held in memory, read once per size
                    path.seek(0)
                decoded.append(load_image(path, side, max_pixels, fit))
            return decoded
        except ImageError as exc:
            return str(exc)

    def collect(start: int, futures) -> Batch:
        indices, images, skipped = [], [], []
        for offset, future in enumerate(futures):
            result = future.result()
            if isinstance(result, str):
                skipped.append((start + offset, result))
            else:
                indices.append(start + offset)
                images.append(result)
        stacked = tuple(
            np.stack([views[k] for views in images]) if images else np.zeros((0, side, side, 3), np.uint8)
            for k, side in enumerate(sizes)
        )
        return Batch(indices, stacked if isinstance(size, tuple) else stacked[0], skipped)

    with ThreadPoolExecutor(workers or available_cpus(), initializer=_lowest_priority) as pool:
        pending: deque = deque()
        for start in range(0, len(paths), batch_size):
            pending.append((start, [pool.submit(decode, p) for p in paths[start : start + batch_size]]))
            if len(pending) > prefetch:
                yield collect(*pending.popleft())
        while pending:
            yield collect(*pending.popleft())


def run_in_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int, lock) -> np.ndarray:
    """``run`` on ``images`` ``batch_size`` at a time, one call at a time under ``lock``, the results stacked.

    A network's runtime already uses every core, and its activations grow with the images in flight (~9 MB
    each for EfficientNet-Lite0): a 1,000-file upload run at once took 9 GB, and a server's threads would
    each take that much.
    """
    results = []
    for start in range(0, max(len(images), 1), batch_size):  # no images: one call, as the runtime answers it
        with lock:
            results.append(run(images[start : start + batch_size]))
    return results[0] if len(results) == 1 else np.concatenate(results)


def layout_meta(
    backbone: str,
    weights,
    pooling: str,
    input_size: int | None,
    dtype: str,
    label_names: Sequence[str],
    precision: str,
    views: int,
    resize: str | Resize | None = None,
) -> FeatureMeta:
    """The meta an extractor of these settings records, with ``feature_dim`` 0: all of it that is known
    without building the backbone (the width is a function of its architecture).

    Weights are recorded by name: ``"finetuned"`` with the digest of the arrays, ``"imagenet"`` or
    ``"none"``, or a file's path with the file's SHA-256. ``resize`` is a mode (the backbone's crop
    share for ``crop``), a :class:`~pyimagesearch_tl.images.Resize` as it is, or None for the backbone's own.
    """
    record = get_backbone(backbone)
    resizing = record.resizing(resize)
    weights_path = resolve_weights(weights)
    if isinstance(weights_path, list):
        weights_name, digest = FINETUNED, weights_digest(weights_path)
    else:  # "imagenet", "none" or the file's path
        weights_name = weights_path or "none"
        digest = "" if weights_name in ("none", "imagenet") else sha256_file(weights_path)
    return FeatureMeta(
        backbone=backbone,
        weights=weights_name,
        weights_sha256=digest,
        pooling=pooling,
        input_size=input_size or record.input_size,
        preprocessing=record.preprocessing,
        decoder=DECODER,
        feature_dim=0,
        dtype=dtype,
        label_names=tuple(label_names),
        precision=precision,
        views=views,
        resize=resizing.mode,
        crop_pct=resizing.crop_pct,
    )


#: Views of each image whose features are averaged: 1 (the image) or 2 (the image and its mirror).
VIEWS = (1, 2)


class FeatureExtractor:
    """A backbone with its preprocessing and the shared image decoder.

    Parameters
    ----------
    backbone : str
        Registered backbone name.
    weights : {"imagenet", "none"}, path, or list of arrays
        A list of arrays is a fine-tuned backbone (recorded as ``"finetuned"`` with their digest).
    pooling : {"avg", "max", "flatten"}
    batch_size : int
    max_pixels : int
        Decompression-bomb limit passed to the decoder.
    workers : int, optional
        Decoding threads, and the runtime's (default: the CPUs this process may run on, see :mod:`.cpus`).
    input_size : int, optional
        Square input side (default: the backbone's own).
    dtype : {"float32", "float16"}
        Storage type recorded for the feature files.
    label_names : sequence of str
        Class names recorded with the features.
    precision : {"float32", "bfloat16", "int8"}
        Arithmetic of the backbone: bfloat16 in OpenVINO where the CPU has it, else in TensorFlow
        (see :func:`~pyimagesearch_tl.backbones.create_model`); int8 in OpenVINO, on the quantized
        network given as ``network`` or made by :meth:`quantize` (see :mod:`pyimagesearch_tl.quantization`).
    runtime : {"auto", "tensorflow", "onnxruntime", "openvino"}
        Where the network runs (see :mod:`pyimagesearch_tl.runtimes`); chosen, and checked against
        TensorFlow when new, on the first batch. :attr:`runtime` then names the one in use.
    views : {1, 2}
        2: each vector is the mean of the features of the image and of its left-right mirror (one
        more forward pass per image, inside the network, so every runtime and the ONNX export
        compute it the same way).
    network : bytes, optional
        int8: the quantized network file's content (a bundle's, or the one a job's driver made).
    quality : str
        A reduced precision's quality-gate figures (JSON, see :mod:`pyimagesearch_tl.quantization`),
        recorded in :attr:`meta` and so in every feature file.
    job_images : int, optional
        How many images the job ahead has (see :meth:`expect`); None: unknown (a server), so ``auto``
        converts the network when it is not cached yet.
    resize : {"squash", "crop", "letterbox"}, Resize or None
        How images are fitted to the square input (see :class:`~pyimagesearch_tl.images.Resize`);
        None: the backbone's own. Recorded in :attr:`meta`.
    """

    def __init__(
        self,
        backbone: str,
        weights: str = "imagenet",
        pooling: str = "avg",
        batch_size: int = 32,
        max_pixels: int = MAX_PIXELS,
        workers: int | None = None,
        input_size: int | None = None,
        dtype: str = "float32",
        label_names: Sequence[str] = (),
        precision: str = "float32",
        runtime: str = "auto",
        views: int = 1,
        network: bytes | None = None,
        quality: str = "",
        job_images: int | None = None,
        resize: str | Resize | None = None,
    ):
        if views not in VIEWS:
            raise ConfigError(f"views must be one of {', '.join(map(str, VIEWS))}, got {views!r}")
        if precision == "int8" and views != 1:  # measured: mean cosine 0.775 to float32 (0.996 with one view)
            raise ConfigError(
                "--precision int8 takes --views 1: the quantized mirrored-views network is far off float32"
            )
        self.views = views
        self.expect(job_images)
        self.runtime, self._run = requested_runtime(runtime, precision), None
        self._choosing = threading.Lock()  # a server's threads may send the first batches together
        self._building = threading.Lock()
        self._running = threading.Lock()
        layout = layout_meta(backbone, weights, pooling, input_size, dtype, label_names, precision, views, resize)
        self._backbone, self._weights = backbone, weights
        self.input_size, self.resize = layout.input_size, layout.resizing
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.workers = workers or available_cpus()
        # TensorFlow's bfloat16 runs a mixed_bfloat16 model; every other runtime a float32 network
        self._model_precision = "bfloat16" if precision == "bfloat16" and self.runtime == TENSORFLOW else "float32"
        self._model, self._forward = None, None
        self.meta = layout  # what network_key() reads; the width follows
        self._weights_identity = weights_identity(backbone, layout.weights, layout.weights_sha256)
        width = self._cached_width(network)
        if width is None:  # the Keras model tells: built now, so that whatever is wrong with it is said at once
            width = int(self.model.output.shape[-1])
        self.meta = dataclasses.replace(layout, feature_dim=width, quality=quality)
        self.network: bytes | None = None
        if network is not None:
            self.set_network(network)

    @property
    def model(self):
        """The headless Keras model, built on first use: a job whose converted network is cached and was
        checked on this machine runs without TensorFlow."""
        self._build()
        return self._model

    def _build(self) -> None:
        with self._building:
            if self._model is not None:
                return
            settings = (self.meta.pooling, self.input_size, self._model_precision)
            model = create_model(self._backbone, self._weights, *settings)  # a bad weights file: said before TF
            import tensorflow as tf

            mode, views = self.meta.preprocessing, self.views

            @tf.function(input_signature=[tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.uint8)])
            def forward(images):
                pixels = preprocess_input(tf.cast(images, tf.float32), mode)
                if views == 2:  # the image and its left-right mirror in one batch, their features averaged
                    both = tf.cast(
                        model(tf.concat([pixels, tf.reverse(pixels, axis=[2])], 0), training=False), tf.float32
                    )
                    original, mirrored = tf.split(both, 2, axis=0)
                    return (original + mirrored) / 2.0
                return tf.cast(model(pixels, training=False), tf.float32)

            self._model, self._forward = model, forward

    def _cached_width(self, network: bytes | None) -> int | None:
        """The feature width read from the network this extractor runs outside TensorFlow: the quantized
        ``network`` given, or the cached float32 network when a runtime passed its parity check here (None:
        neither is known)."""
        if self.runtime == TENSORFLOW:
            return None
        if network is not None:
            return network_width(bytes(network))
        if self._weights_identity is None:
            return None
        path = checked_network(self.network_key())  # else the model is built: a wrong file is said when checked
        return None if path is None else network_width(path)

    @classmethod
    def from_meta(
        cls,
        meta: FeatureMeta,
        batch_size: int = 32,
        max_pixels: int = MAX_PIXELS,
        finetuned_weights: Sequence[np.ndarray] | None = None,
        runtime: str = "auto",
        network: bytes | None = None,
    ) -> "FeatureExtractor":
        """Rebuild exactly the extractor that produced features described by ``meta``.

        A fine-tuned backbone (``meta.weights == "finetuned"``) needs its weight arrays, which
        its bundle carries; the rebuilt extractor's meta records their digest, so comparing it with
        ``meta`` (:meth:`Bundle.check_features`) catches arrays that are not the ones trained.
        """
        weights = meta.weights
        if meta.weights == FINETUNED:
            if finetuned_weights is None:
                raise BundleError(f"{meta.describe()}: the fine-tuned backbone weights are missing")
            weights = list(finetuned_weights)
        return cls(
            meta.backbone,
            weights,
            meta.pooling,
            batch_size,
            max_pixels,
            input_size=meta.input_size,
            dtype=meta.dtype,
            label_names=meta.label_names,
            precision=meta.precision,
            runtime=runtime,
            views=meta.views,
            network=network,
            quality=meta.quality,
            resize=meta.resizing,
        )

    def expect(self, images: int | None) -> None:
        """The job ahead has ``images`` images: with ``runtime="auto"``, a network not cached yet is
        converted only for a job of :data:`~pyimagesearch_tl.runtimes.MIN_IMAGES_TO_CONVERT` or more
        (the conversion would cost more than it saves); a smaller one runs in TensorFlow. None: unknown."""
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 0):
            raise ConfigError(f"job_images must be a whole number of images (or None), got {images!r}")
        self.job_images = images

    def decode(self, path: str | Path) -> np.ndarray:
        """One image as this extractor's model sees it (uint8, ``input_size`` square)."""
        return load_image(path, self.input_size, self.max_pixels, self.resize)

    def iter_batches(self, paths: Sequence[str | Path], prefetch: int = 2) -> Iterator[Batch]:
        """Decode ``paths`` in order, ``batch_size`` at a time (see :func:`decode_batches`)."""
        return decode_batches(
            paths, self.input_size, self.batch_size, self.max_pixels, self.workers, prefetch, self.resize
        )

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Feature vectors (float32) of a uint8 batch ``(n, size, size, 3)``.

        With ``views=2``, each vector is the mean of the image's features and those of its left-right
        mirror (one more forward pass per image).
        """
        if len(images) == 0:
            return np.zeros((0, self.meta.feature_dim), np.float32)
        if self._run is None:
            with self._choosing:
                if self._run is None:
                    self._choose_runtime(images[: self.batch_size])
        return run_in_batches(self._run, images, self.batch_size, self._running)

    def to_onnx(self):
        """This extractor's float32 network as an ONNX model: uint8 pixels in, float32 features out."""
        self._build()
        return export_onnx(self._forward, self.input_size)

    def quantize(self, calibration: np.ndarray, key: str) -> bytes:
        """int8: quantize the float32 network, calibrated on ``calibration`` (uint8 images), and use it.

        ``key`` names the result in the cache (see :func:`~pyimagesearch_tl.quantization.calibration`).
        Returns the quantized network file's content (what a bundle carries, what Ray workers receive).
        """
        self.set_network(quantize_network(self.float_network_file(), calibration, key).read_bytes())
        return self.network

    def set_network(self, network: bytes) -> None:
        """int8: run ``network`` (a quantized network file's content); its SHA-256 joins :attr:`meta`."""
        if self.meta.precision != "int8":
            raise ConfigError(f"a quantized network is for --precision int8, not {self.meta.precision}")
        self.network, self._run = bytes(network), None
        self.meta = dataclasses.replace(self.meta, network_sha256=hashlib.sha256(self.network).hexdigest())

    def _tensorflow(self, images: np.ndarray) -> np.ndarray:
        self._build()
        return self._forward(images).numpy().astype(np.float32, copy=False)

    def network_key(self) -> str:
        """The key of this extractor's converted network (see :func:`~pyimagesearch_tl.runtimes.network_key`):
        its weights named without TensorFlow where they can be, else by the built model's arrays."""
        return network_key(
            self._weights_identity or weights_digest(self.model.get_weights()),
            backbone=self.meta.backbone,
            input_size=self.input_size,
            pooling=self.meta.pooling,
            preprocessing=self.meta.preprocessing,
            precision=self._model_precision,
            views=self.meta.views,
        )

    def float_network_file(self, convert: bool = True) -> Path | None:
        """This extractor's float32 network as a cached ONNX file (converted on first use, then shared;
        ``convert=False``: None when it is not cached)."""
        return cached_network(self.network_key(), self.to_onnx, convert)

    def network_file(self, convert: bool = True) -> Path | None:
        """The ONNX file this extractor runs outside TensorFlow: the quantized network for int8 (cached by
        its SHA-256), else the float32 one (``convert=False``: None when it is not cached)."""
        if self.meta.precision != "int8":
            return self.float_network_file(convert)
        if self.network is None:
            raise ConfigError("an int8 extractor needs its quantized network: quantize() it or give network=")
        network = self.network
        return cached_file(
            Path("networks", f"{self.meta.network_sha256[:32]}.int8.onnx"), lambda: network, _write_bytes
        )

    def survey_runtimes(self, timed: bool = False) -> list[dict]:
        """Every runtime here for this network: installed, parity, speed (see :func:`.runtimes.survey`)."""
        return survey(self._tensorflow, self.float_network_file, self.input_size, self.workers, timed)

    def _choose_runtime(self, images: np.ndarray) -> None:
        """Settle the runtime on the first real batch (converting and checking it when new).

        A reduced precision outside TensorFlow runs where :func:`requested_runtime` settled it: no
        parity check against TensorFlow's float32 features (the quality gate compares them instead).
        """
        import warnings

        if self.meta.precision != "float32" and self.runtime != TENSORFLOW:
            forward = load(self.runtime, self.network_file(), self.workers, self.meta.precision)
            self._run = lambda batch: np.asarray(forward(batch), np.float32)
            return
        what = self.meta.describe()
        choice = choose(self.runtime, self._tensorflow, self.network_file, images, self.workers, what, self.job_images)
        if choice.note:
            warnings.warn(choice.note, stacklevel=3)
        self.runtime, self._run = choice.name, choice.forward


class CombinedExtractor:
    """Several extractors whose features are concatenated, for a model trained on combined feature folders.

    Each image is decoded at every part's input size and each part's network sees exactly what it saw
    when its folder was extracted; :attr:`meta` is the :class:`~pyimagesearch_tl.store.CombinedMeta`.
    """

    def __init__(self, parts: Sequence[FeatureExtractor]):
        self.parts = list(parts)
        self.meta = CombinedMeta(tuple(part.meta for part in self.parts))
        self.batch_size, self.max_pixels = self.parts[0].batch_size, self.parts[0].max_pixels
        self.workers = self.parts[0].workers

    @property
    def runtime(self) -> str:
        return "/".join(part.runtime for part in self.parts)

    def expect(self, images: int) -> None:
        """The job ahead has ``images`` images (see :meth:`FeatureExtractor.expect`)."""
        for part in self.parts:
            part.expect(images)

    def iter_batches(self, paths: Sequence, prefetch: int = 2) -> Iterator[Batch]:
        """Decode ``paths`` at each part's input size (see :func:`decode_batches`)."""
        sizes, fits = tuple(part.input_size for part in self.parts), tuple(part.resize for part in self.parts)
        return decode_batches(paths, sizes, self.batch_size, self.max_pixels, self.workers, prefetch, fits)

    def transform(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The parts' feature vectors of one decoded batch (one array per part), side by side."""
        return np.hstack([part.transform(pixels) for part, pixels in zip(self.parts, images)])


@contextlib.contextmanager
def interrupt_after_batch() -> Iterator[Callable[[], bool]]:
    """Defer Ctrl-C to the next batch boundary, so the batch in flight is written before stopping.

    Yields a function telling whether Ctrl-C was pressed; the caller raises ``KeyboardInterrupt``
    at a safe point. A second Ctrl-C stops at once. Outside the main thread, or where SIGINT is
    ignored (a background job), nothing changes.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield lambda: False
        return
    requested = threading.Event()

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _lowest_priority() -> None:
    """Lower the calling thread's priority (Linux applies nice values per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):  # not available on this platform: keep the default
        pass


# --- shards: the unit of work every engine hands out ----------------------------------------------


def extract_shards(extractor: FeatureExtractor, tasks: Sequence[ShardTask]) -> Iterator[tuple[int, Shard]]:
    """Extract ``tasks`` in order, yielding ``(task.index, shard)`` as each one completes.

    All images go through one decoding stream, so decoding keeps running ahead of the model across
    shard boundaries; a batch may hold the end of one shard and the start of the next.
    """
    owners = [(t, p) for t, task in enumerate(tasks) for p in range(len(task.paths))]
    ends = np.cumsum([len(task.paths) for task in tasks])
    rows: list[list] = [[] for _ in tasks]
    skipped: list[list] = [[] for _ in tasks]
    current, seen = 0, 0

    def completed():  # the tasks whose every image has been seen, in order (empty tasks included)
        nonlocal current
        while current < len(tasks) and ends[current] <= seen:
            done = rows[current]
            features = np.stack([v for _, v in done]) if done else np.zeros((0, extractor.meta.feature_dim), np.float32)
            yield tasks[current].index, Shard(features, np.array([p for p, _ in done], np.int64), skipped[current])
            rows[current], skipped[current] = [], []
            current += 1

    yield from completed()
    for batch in extractor.iter_batches([tasks[t].paths[p] for t, p in owners]):
        for i, vector in zip(batch.indices, extractor.transform(batch.images)):
            t, p = owners[i]
            rows[t].append((p, vector))
        for i, reason in batch.skipped:
            t, p = owners[i]
            skipped[t].append((p, reason))
        seen += len(batch.indices) + len(batch.skipped)
        yield from completed()


def limit_tensorflow_threads(cpus: int) -> None:
    """TensorFlow in this process keeps to ``cpus`` threads: several workers on one node (Ray gives
    each its CPUs) must not oversubscribe it. Call it before TensorFlow runs anything."""
    quiet.set_default_log_level()
    if "tensorflow" not in sys.modules:  # read when TensorFlow starts, if a job needs it at all
        os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = str(cpus)
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(cpus)


@dataclasses.dataclass
class ExtractionJob:
    """An engine's job (see :mod:`pyimagesearch_tl.engines`): each worker builds one extractor of
    ``options`` (:class:`FeatureExtractor`'s keywords; or this process's ``extractor`` itself) and
    extracts shard after shard (:func:`extract_shards`), each result a :class:`~pyimagesearch_tl.store.Shard`."""

    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    extractor: FeatureExtractor | None = None

    def check(self) -> None:
        get_backbone(self.options["backbone"])
        resolve_weights(self.options["weights"])

    def start(self, cpus: int | None) -> "ExtractionJob":
        if self.extractor is None:
            if cpus:
                limit_tensorflow_threads(cpus)
            self.extractor = FeatureExtractor(**self.options, **({"workers": cpus} if cpus else {}))
        return self

    @property
    def meta(self) -> FeatureMeta:
        return self.extractor.meta

    @property
    def runtime(self) -> str:
        return self.extractor.runtime

    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[int, Shard]]:
        return extract_shards(self.extractor, tasks)


def check_labels(rows: Sequence[dict[str, str]], label_names: Sequence[str], what: str) -> None:
    """Refuse manifest ``rows`` labelled with a class that is not one of the model's ``label_names``."""
    unknown = sorted({row["label"] for row in rows} - set(label_names))
    if unknown:
        raise DatasetError(
            f"{what} has class(es) the model was not trained on: {', '.join(map(repr, unknown))}; "
            f"the model's classes are {', '.join(map(repr, label_names))}"
        )


def extract_in_memory(
    extractor: FeatureExtractor, dataset_dir: str | Path, rows: Sequence[dict[str, str]]
) -> tuple[FeatureSet, list[tuple[str, str]]]:
    """Features of manifest ``rows`` held in memory (no feature file), and the skipped images.

    For models whose features are never stored: a fine-tuned backbone is evaluated this way. Rows
    labelled with a class that is not one of the extractor's ``label_names`` are refused with a
    :class:`DatasetError` before any image is decoded.
    """
    check_labels(rows, extractor.meta.label_names, f"dataset {dataset_dir}")
    label_index = {name: i for i, name in enumerate(extractor.meta.label_names)}
    task = ShardTask(0, [str(Path(dataset_dir) / row["path"]) for row in rows])
    [(_, shard)] = extract_shards(extractor, [task])  # the whole list as one shard, held in memory
    kept = shard.positions.tolist()
    skipped = [(rows[i]["path"], reason) for i, reason in shard.skipped]
    return FeatureSet(
        shard.features,
        np.array([label_index[rows[i]["label"]] for i in kept], dtype=np.int64),
        [rows[i]["path"] for i in kept],
        [rows[i].get("sha256", "") for i in kept],
        extractor.meta,
    ), skipped


def dataset_rows(dataset_dir: str | Path) -> dict[str, list[dict[str, str]]]:
    """Manifest rows grouped by split, with content hashes filled in where the manifest had none."""
    dataset_dir = Path(dataset_dir)
    by_split: dict[str, list[dict[str, str]]] = {}
    for row in read_manifest(dataset_dir):
        if not row.get("sha256"):
            try:
                row["sha256"] = sha256_file(dataset_dir / row["path"])
            except (OSError, ImageError):
                row["sha256"] = ""  # the decoder will report why it cannot be read
        by_split.setdefault(row["split"], []).append(row)
    return by_split


def _write_bytes(content: bytes, path: Path) -> None:
    path.write_bytes(content)
