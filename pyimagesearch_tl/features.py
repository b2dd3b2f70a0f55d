"""Feature extraction: images -> backbone -> feature vectors, batch by batch, into feature files.

:class:`FeatureExtractor` is the one path from image files to feature vectors; ``extract`` and
``predict`` both use it. Images are decoded by :func:`pyimagesearch_tl.images.load_image` in a
thread pool that runs ahead of the model (decoding overlaps inference, order is kept), and the
model is called on whole batches inside a ``tf.function`` that also casts and preprocesses, so
NumPy hands over uint8 pixels only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .backbones import FINETUNED, create_model, get_backbone, preprocess_input, resolve_weights, weights_digest
from .errors import BundleError, DatasetError, ImageError
from .images import DECODER, load_image, sha256_file
from .layouts import read_manifest
from .atomic import atomic_joblib_dump, atomic_write_csv
from .store import SUFFIXES, WRITERS, FeatureMeta, FeatureSet, read_features, read_fingerprint, read_skipped

LABEL_ENCODER = "label_encoder.joblib"


@dataclasses.dataclass
class Batch:
    """One decoded batch: the positions (in the input list) that decoded, their pixels, and the skips."""

    indices: list[int]
    images: np.ndarray  # (n, size, size, 3) uint8
    skipped: list[tuple[int, str]]


def decode_batches(paths: Sequence, size: int, batch_size: int, max_pixels: int = 89_478_485,
                   workers: int | None = None, prefetch: int = 2) -> Iterator[Batch]:
    """Decode ``paths`` (files or binary file objects) in order, ``batch_size`` at a time.

    A thread pool keeps ``prefetch`` batches in flight ahead of the consumer, so decoding overlaps
    the model. Images the decoder refuses are reported in :attr:`Batch.skipped` with the reason.
    The decoding threads run at the lowest scheduling priority: on a CPU the model is the
    bottleneck, so they should only use the cycles it leaves idle; when the model waits for
    images, nothing else competes and they get the CPU anyway (see benchmarks/bench_extract.py).
    """

    def decode(path) -> np.ndarray | str:
        try:
            return load_image(path, size, max_pixels)
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
        return Batch(indices, np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8), skipped)

    with ThreadPoolExecutor(workers or os.cpu_count() or 1, initializer=_lowest_priority) as pool:
        pending: deque = deque()
        for start in range(0, len(paths), batch_size):
            pending.append((start, [pool.submit(decode, p) for p in paths[start:start + batch_size]]))
            if len(pending) > prefetch:
                yield collect(*pending.popleft())
        while pending:
            yield collect(*pending.popleft())


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
        Decoding threads (default: the number of CPUs).
    input_size : int, optional
        Square input side (default: the backbone's own).
    dtype : {"float32", "float16"}
        Storage type recorded for the feature files.
    label_names : sequence of str
        Class names recorded with the features.
    precision : {"float32", "bfloat16"}
        Arithmetic of the backbone (see :func:`~pyimagesearch_tl.backbones.create_model`).
    """

    def __init__(self, backbone: str, weights: str = "imagenet", pooling: str = "avg", batch_size: int = 32,
                 max_pixels: int = 89_478_485, workers: int | None = None, input_size: int | None = None,
                 dtype: str = "float32", label_names: Sequence[str] = (), precision: str = "float32"):
        import tensorflow as tf

        record = get_backbone(backbone)
        weights_path = resolve_weights(weights)
        self.input_size = input_size or record.input_size
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.workers = workers or os.cpu_count() or 1
        self.model = create_model(backbone, weights, pooling, self.input_size, precision)
        mode = record.preprocessing
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, self.input_size, self.input_size, 3], tf.uint8)])
        def forward(images):
            return tf.cast(model(preprocess_input(tf.cast(images, tf.float32), mode), training=False), tf.float32)

        self._forward = forward
        if isinstance(weights_path, list):
            weights_name, digest = FINETUNED, weights_digest(weights_path)
        else:  # "imagenet", "none" or the file's path
            weights_name = weights_path or "none"
            digest = "" if weights_name in ("none", "imagenet") else sha256_file(weights_path)
        self.meta = FeatureMeta(
            backbone=backbone,
            weights=weights_name,
            weights_sha256=digest,
            pooling=pooling,
            input_size=self.input_size,
            preprocessing=mode,
            decoder=DECODER,
            feature_dim=int(self.model.output.shape[-1]),
            dtype=dtype,
            label_names=tuple(label_names),
            precision=precision,
        )

    @classmethod
    def from_meta(cls, meta: FeatureMeta, batch_size: int = 32, max_pixels: int = 89_478_485,
                  finetuned_weights: Sequence[np.ndarray] | None = None) -> "FeatureExtractor":
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
        return cls(meta.backbone, weights, meta.pooling, batch_size, max_pixels, input_size=meta.input_size,
                   dtype=meta.dtype, label_names=meta.label_names, precision=meta.precision)

    def decode(self, path: str | Path) -> np.ndarray:
        """One image as this extractor's model sees it (uint8, ``input_size`` square)."""
        return load_image(path, self.input_size, self.max_pixels)

    def iter_batches(self, paths: Sequence[str | Path], prefetch: int = 2) -> Iterator[Batch]:
        """Decode ``paths`` in order, ``batch_size`` at a time (see :func:`decode_batches`)."""
        return decode_batches(paths, self.input_size, self.batch_size, self.max_pixels, self.workers, prefetch)

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Feature vectors (float32) of a uint8 batch ``(n, size, size, 3)``."""
        if len(images) == 0:
            return np.zeros((0, self.meta.feature_dim), np.float32)
        return self._forward(images).numpy().astype(np.float32, copy=False)


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


# --- extracting a dataset --------------------------------------------------------------------------


@dataclasses.dataclass
class SplitReport:
    split: str
    path: Path
    extracted: int
    skipped: list[tuple[str, str]]
    reused: int = 0
    resumed_from: int = 0
    up_to_date: bool = False
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


def fingerprint(meta: FeatureMeta, rows: Sequence[dict[str, str]]) -> str:
    """Identity of one extraction: the feature meta plus the ordered (path, label, content) list."""
    digest = hashlib.sha256(json.dumps(meta.to_attrs(), sort_keys=True).encode())
    for row in rows:
        digest.update(f"{row['path']}\0{row['label']}\0{row['sha256']}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _previous_rows(path: Path, meta: FeatureMeta) -> dict[str, np.ndarray]:
    """Feature rows of an earlier finished file with the same meta, keyed by content hash."""
    if not path.exists():
        return {}
    try:
        previous = read_features(path)
    except Exception:  # an unreadable or foreign file is simply not reused
        return {}
    if previous.meta != meta:
        return {}
    return {sha: row for sha, row in zip(previous.sha256, previous.features) if sha}


def _segments(todo: Sequence[dict[str, str]], reuse: dict[str, np.ndarray], extractor: FeatureExtractor):
    """Walk ``todo`` in order, yielding ``(stop, vectors, skipped, computed)`` once per batch of fresh images.

    ``vectors`` maps the positions up to ``stop`` to feature rows (computed, or reused from an
    earlier file by content hash); ``skipped`` maps positions to the decoder's reason; ``computed``
    counts the rows that went through the backbone. Decoding runs ahead
    over the whole list, so progress can be recorded after every batch without stalling the model.
    """
    fresh = [i for i, row in enumerate(todo) if row["sha256"] not in reuse]
    cursor = 0

    def reused_until(stop: int) -> dict[int, np.ndarray]:
        return {i: reuse[todo[i]["sha256"]] for i in range(cursor, stop) if todo[i]["sha256"] in reuse}

    for batch_number, batch in enumerate(extractor.iter_batches([todo[i]["path"] for i in fresh])):
        last = (batch_number + 1) * extractor.batch_size
        stop = fresh[last] if last < len(fresh) else len(todo)
        vectors = reused_until(stop)
        vectors.update({fresh[p]: v for p, v in zip(batch.indices, extractor.transform(batch.images))})
        yield stop, vectors, {fresh[p]: reason for p, reason in batch.skipped}, len(batch.indices)
        cursor = stop
    for start in range(cursor, len(todo), 1024):  # nothing left to compute: copy the reused rows
        stop = min(start + 1024, len(todo))
        yield stop, reused_until(stop), {}, 0
        cursor = stop


def extract_split(extractor: FeatureExtractor, dataset_dir: Path, rows: Sequence[dict[str, str]], split: str,
                  output_dir: Path, feature_format: str = "hdf5", progress: bool = True) -> SplitReport:
    """Extract one split into ``output_dir/<split>.<h5|csv>``, resuming or reusing where possible.

    * A finished file with the same fingerprint (same images by content, same settings): no work.
    * A ``.partial`` file with the same fingerprint: resume after the last batch it recorded.
    * A finished file of the same settings but other images: rows of unchanged images are reused,
      only new images go through the backbone.

    Undecodable images are skipped and listed in the feature file and in ``<split>.skipped.csv``.
    """
    from tqdm.auto import tqdm

    meta = extractor.meta
    label_index = {name: i for i, name in enumerate(meta.label_names)}
    path = output_dir / f"{split}{SUFFIXES[feature_format]}"
    identity = fingerprint(meta, rows)
    if read_fingerprint(path) == identity:
        return SplitReport(split, path, extracted=0, skipped=read_skipped(path), up_to_date=True)
    reuse = _previous_rows(path, meta)
    writer = WRITERS[feature_format](path, meta, identity, chunk_rows=extractor.batch_size)
    start = writer.resumed_from
    todo = [dict(row, path=dataset_dir / row["path"], relative=row["path"]) for row in rows[start:]]
    started, extracted, reused, cursor = time.perf_counter(), 0, 0, 0
    try:
        with interrupt_after_batch() as interrupted, \
                tqdm(total=len(rows), initial=start, desc=split, unit="img", disable=not progress) as bar:
            for stop, vectors, skipped, computed in _segments(todo, reuse, extractor):
                kept = sorted(vectors)
                writer.append(
                    features=np.stack([vectors[i] for i in kept]) if kept else np.zeros((0, meta.feature_dim)),
                    labels=np.array([label_index[todo[i]["label"]] for i in kept], dtype=np.int64),
                    paths=[todo[i]["relative"] for i in kept],
                    sha256=[todo[i]["sha256"] for i in kept],
                    skipped=[(todo[i]["relative"], skipped[i]) for i in sorted(skipped)],
                    inputs_done=start + stop,
                )
                extracted += computed
                reused += len(kept) - computed
                bar.update(stop - cursor)
                cursor = stop
                if interrupted():
                    raise KeyboardInterrupt
        writer.finish()
    finally:
        writer.close()
    skipped_rows = read_skipped(path)
    atomic_write_csv(output_dir / f"{split}.skipped.csv", ["path", "reason"],
                     [dict(path=p, reason=r) for p, r in skipped_rows])
    return SplitReport(split, path, extracted, skipped_rows, reused, start, seconds=time.perf_counter() - started)


def extract_in_memory(extractor: FeatureExtractor, dataset_dir: str | Path,
                      rows: Sequence[dict[str, str]]) -> tuple[FeatureSet, list[tuple[str, str]]]:
    """Features of manifest ``rows`` held in memory (no feature file), and the skipped images.

    For models whose features are never stored: a fine-tuned backbone is evaluated this way.
    """
    label_index = {name: i for i, name in enumerate(extractor.meta.label_names)}
    features, kept, skipped = [], [], []
    paths = [Path(dataset_dir) / row["path"] for row in rows]
    for batch in extractor.iter_batches(paths):
        features.append(extractor.transform(batch.images))
        kept += batch.indices
        skipped += [(rows[i]["path"], reason) for i, reason in batch.skipped]
    features_array = np.concatenate(features) if features else np.zeros((0, extractor.meta.feature_dim), np.float32)
    return FeatureSet(features_array, np.array([label_index[rows[i]["label"]] for i in kept], dtype=np.int64),
                      [rows[i]["path"] for i in kept], [rows[i].get("sha256", "") for i in kept], extractor.meta), skipped


def dataset_rows(dataset_dir: str | Path) -> dict[str, list[dict[str, str]]]:
    """Manifest rows grouped by split, with content hashes filled in where the manifest had none."""
    dataset_dir = Path(dataset_dir)
    by_split: dict[str, list[dict[str, str]]] = {}
    for row in read_manifest(dataset_dir):
        if not row.get("sha256"):
            try:
                row["sha256"] = sha256_file(dataset_dir / row["path"])
            except OSError:
                row["sha256"] = ""  # the decoder will report why it cannot be read
        by_split.setdefault(row["split"], []).append(row)
    return by_split


def extract_dataset(dataset_dir: str | Path, output_dir: str | Path, *, splits: Sequence[str],
                    backbone: str, weights: str = "imagenet", pooling: str = "avg", feature_format: str = "hdf5",
                    dtype: str = "float32", precision: str = "float32", batch_size: int = 32, max_pixels: int = 89_478_485,
                    progress: bool = True, on_split=None) -> list[SplitReport]:
    """Extract every configured split of ``dataset_dir`` into ``output_dir`` and save the label encoder.

    The label encoder is fitted on the class names of the whole dataset and saved once as
    ``label_encoder.joblib``; every feature file stores the same label names.
    """
    from sklearn.preprocessing import LabelEncoder

    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    by_split = dataset_rows(dataset_dir)
    present = [s for s in splits if by_split.get(s)]
    if not present:
        raise DatasetError(
            f"dataset {dataset_dir} has none of the configured splits ({', '.join(splits)}); it has: {', '.join(by_split)}"
        )
    label_names = sorted({row["label"] for rows in by_split.values() for row in rows})
    encoder = LabelEncoder().fit(label_names)
    extractor = FeatureExtractor(backbone, weights, pooling, batch_size, max_pixels, dtype=dtype, precision=precision,
                                 label_names=[str(c) for c in encoder.classes_])
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_joblib_dump(output_dir / LABEL_ENCODER, encoder)
    reports = []
    for split in present:
        report = extract_split(extractor, dataset_dir, by_split[split], split, output_dir, feature_format, progress)
        reports.append(report)
        if on_split is not None:
            on_split(report)
    return reports
