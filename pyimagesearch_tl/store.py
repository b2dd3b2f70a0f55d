"""Feature files: HDF5 (default, chunked) or CSV (PyImageSearch's format), and the shard files they are made of.

An HDF5 feature file ``<split>.h5`` holds

* ``features`` (N, D) float32 or float16, chunked by rows;
* ``labels`` (N,) int64, ``paths`` (N,) file paths (raw bytes), ``sha256`` (N,) content hashes;
* ``skipped_paths`` / ``skipped_reasons``: the images that could not be decoded;
* attributes: the :class:`FeatureMeta` fields (backbone, weights, pooling, input size,
  preprocessing, decoder, label names, ...) and the input ``fingerprint``.

Extraction first writes one small **shard file** per run of consecutive images
(``.shards/<split>/<index>-<identity>.h5``, each written whole and renamed into place), then
assembles them into ``<split>.h5.partial``, renamed to ``<split>.h5`` only when complete: an
unfinished file is never taken for a finished one, and a rerun never recomputes a finished shard.

A CSV feature file ``<split>.csv`` has one row per image, the label index first, then the values,
as in PyImageSearch; the metadata and paths go to ``<split>.csv.meta.json`` beside it.

Reading trusts nothing it reads, since feature files may come from elsewhere: every reader checks what
it reads with :func:`check_rows` (one row of ``feature_dim`` finite numbers and one class index per
image), and the metadata, the columns and the sidecar for their kinds and lengths, so a bad file is a
:class:`~pyimagesearch_tl.errors.FeatureFileError` naming it and the problem before any training. A
failed write (disk full) is an :class:`~pyimagesearch_tl.atomic.OutputError` naming the file, and leaves
no unfinished file behind (:class:`_FailSafeFile` for HDF5).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_json, writing
from .errors import ConfigError, FeatureFileError
from .images import Resize
from .registry import Registry

FORMAT_VERSION = 1
PARTIAL = ".partial"
SHARD_SIZE = 256  # images per shard file: the unit of extraction work and of resume
SHARDS = ".shards"  # <features dir>/.shards/<split>/: shard files of an extraction in progress

#: Meta fields that must be equal for two feature sets (or a bundle and new images) to be comparable.
LAYOUT_FIELDS = (
    "backbone",
    "weights",
    "weights_sha256",
    "pooling",
    "input_size",
    "preprocessing",
    "decoder",
    "feature_dim",
    "precision",
    "views",
    "network_sha256",
    "resize",
    "crop_pct",
)


#: Bounds on what metadata read from a file may say (the config allows input sizes up to 1024).
MAX_INPUT_SIZE = 1024
MAX_FEATURE_DIM = 1 << 20
POOLINGS = ("avg", "max", "flatten")
PRECISIONS = ("float32", "bfloat16", "int8")
#: Meta fields that must be text.
TEXT_FIELDS = (
    "backbone",
    "weights",
    "pooling",
    "preprocessing",
    "decoder",
    "weights_sha256",
    "precision",
    "network_sha256",
    "quality",
    "resize",
)


@dataclasses.dataclass(frozen=True)
class FeatureMeta:
    """Everything that determines what a feature vector means (stored with every feature file)."""

    backbone: str
    weights: str
    pooling: str
    input_size: int
    preprocessing: str
    decoder: str
    feature_dim: int
    dtype: str
    label_names: tuple[str, ...]
    weights_sha256: str = ""
    precision: str = "float32"
    views: int = 1  # 2: each vector is the mean of the image's features and its left-right mirror's
    network_sha256: str = ""  # int8: the SHA-256 of the quantized network (its calibration decides it)
    quality: str = ""  # reduced precision: the quality gate's figures against float32 (JSON), not layout
    resize: str = "squash"  # how images meet the square input (images.RESIZE_MODES); files before it: squash
    crop_pct: float = 1.0  # resize "crop": the share of the shorter side kept

    @property
    def resizing(self) -> Resize:
        """How this layout's images were fitted to the input (see :class:`~pyimagesearch_tl.images.Resize`)."""
        return Resize(self.resize, self.crop_pct)

    def describe(self) -> str:
        mirrored = ", mirrored views averaged" if self.views == 2 else ""
        resized = "" if self.resize == "squash" else f" {self.resizing.describe()}"
        return (
            f"{self.backbone} ({self.weights} weights, {self.pooling} pooling, {self.input_size}px{resized}, "
            f"{self.feature_dim} values{mirrored})"
        )

    def to_attrs(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values["label_names"] = json.dumps(list(self.label_names))
        return values

    @classmethod
    def from_attrs(cls, attrs, source: str | Path = "feature file") -> "FeatureMeta":
        """The meta stored in ``attrs`` (an HDF5 file's attributes, a CSV sidecar), each field checked.

        Raises
        ------
        FeatureFileError
            Naming ``source`` and the field that is missing or not what it must be: ``label_names``
            a JSON list of distinct names, ``feature_dim``, ``input_size`` and ``views`` whole numbers
            of at least 1, ``dtype`` a floating-point type.
        """
        try:
            values = {field.name: attrs[field.name] for field in dataclasses.fields(cls) if field.name in attrs}
            values = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items()}
            try:
                names = json.loads(values["label_names"])
            except (TypeError, ValueError):
                names = None
            if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
                raise ValueError(f"label_names={values['label_names']!r} is not a list of class names")
            if len(set(names)) != len(names):
                raise ValueError(f"label_names={values['label_names']!r} names a class twice")
            values["label_names"] = tuple(names)
            values["views"] = values.get("views", 1)  # files written before views existed have one
            for name, largest in (("input_size", MAX_INPUT_SIZE), ("feature_dim", MAX_FEATURE_DIM), ("views", 2)):
                number = values[name]
                if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or not 1 <= number <= largest:
                    raise ValueError(f"{name}={number!r} is not a whole number from 1 to {largest}")
                values[name] = int(number)
            for name in TEXT_FIELDS:
                if name in values and not isinstance(values[name], str):
                    raise ValueError(f"{name}={values[name]!r} is not text")
            for name, allowed in (("pooling", POOLINGS), ("precision", PRECISIONS)):
                if values.get(name, allowed[0]) not in allowed:
                    raise ValueError(f"{name}={values[name]!r} is not one of {', '.join(allowed)}")
            if not isinstance(values["dtype"], str) or np.dtype(values["dtype"]).kind != "f":
                raise ValueError(f"dtype={values['dtype']!r} is not a floating-point type")
            if isinstance(values.get("crop_pct"), np.floating):
                values["crop_pct"] = float(values["crop_pct"])
            Resize(values.get("resize", "squash"), values.get("crop_pct", 1.0))  # a mode it knows, a share it allows
            return cls(**values)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            missing = f"{exc} is missing" if isinstance(exc, KeyError) else exc
            raise FeatureFileError(f"{source}: its metadata is incomplete or unreadable ({missing})") from None

    @property
    def parts(self) -> tuple["FeatureMeta", ...]:
        """The extractors whose features make up a vector: this one alone (see :class:`CombinedMeta`)."""
        return (self,)


@dataclasses.dataclass(frozen=True)
class CombinedMeta:
    """The layout of vectors that concatenate the features of several extractors (combined backbones).

    Each part is the :class:`FeatureMeta` of one feature folder, in the order the vectors concatenate
    them; all parts describe the same images with the same label names.
    """

    parts: tuple[FeatureMeta, ...]

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.parts[0].label_names

    @property
    def feature_dim(self) -> int:
        return sum(part.feature_dim for part in self.parts)

    @property
    def dtype(self) -> str:
        return "float32" if len({part.dtype for part in self.parts}) > 1 else self.parts[0].dtype

    @property
    def backbone(self) -> str:
        return "+".join(part.backbone for part in self.parts)

    @property
    def weights(self) -> str:
        return "+".join(part.weights for part in self.parts)

    @property
    def precision(self) -> str:
        return "+".join(sorted({part.precision for part in self.parts}))

    @property
    def input_size(self) -> tuple[int, ...]:
        return tuple(part.input_size for part in self.parts)

    def describe(self) -> str:
        return " + ".join(part.describe() for part in self.parts)


def check_same_layout(reference: FeatureMeta | CombinedMeta, other: FeatureMeta | CombinedMeta, what: str) -> None:
    """Raise :class:`FeatureFileError` naming the first field where ``other`` differs."""
    if len(reference.parts) != len(other.parts):
        raise FeatureFileError(
            f"{what} concatenate {len(other.parts)} feature folders ({other.backbone}) but the reference "
            f"{len(reference.parts)} ({reference.backbone}); give the same feature folders, in the same order"
        )
    for part, (mine, theirs) in enumerate(zip(reference.parts, other.parts)):
        where = what if len(reference.parts) == 1 else f"{what} (part {part + 1}, {theirs.backbone})"
        for name in LAYOUT_FIELDS:
            if getattr(mine, name) != getattr(theirs, name):
                raise FeatureFileError(
                    f"{where} has {name}={getattr(theirs, name)!r} but the reference has {getattr(mine, name)!r}; "
                    "features from different backbones or settings cannot be mixed"
                )
    if reference.label_names != other.label_names:
        raise FeatureFileError(
            f"{what} has labels {list(other.label_names)} but the reference has {list(reference.label_names)}"
        )


#: Values read and checked at a time (2 MiB of float32): each part is checked while it is still in the CPU's
#: cache, which makes checking cost next to nothing (see :func:`_read_checked`).
CHECK_VALUES = 1 << 19


def check_rows(
    source: str | Path, meta: FeatureMeta, features=None, labels=None, first_row: int | np.ndarray = 0
) -> None:
    """Raise :class:`FeatureFileError` naming ``source`` and the first thing wrong with rows read from it.

    The one check of what every reader reads from a feature or shard file, so that nothing unusable
    reaches training. Arrays and h5py datasets alike are checked for their shape and type (a dataset
    costs nothing: it is not read); arrays also for their values, block by block.

    Parameters
    ----------
    source : path
        The file, named in the message.
    meta : FeatureMeta
        Its metadata: ``feature_dim`` and the number of classes.
    features : ndarray or h5py.Dataset, optional
        Must be 2-D, of numbers, ``meta.feature_dim`` wide, every value finite (no NaN or infinity).
    labels : ndarray or h5py.Dataset, optional
        Must be 1-D numbers, each a class index: a whole number from 0 to the number of classes - 1.
    first_row : int or ndarray
        The row number in ``source`` of the first row given (a block of a file read in parts), or of
        every row given (rows read by number).
    """

    def number(row: int) -> int:
        return int(first_row[row]) if isinstance(first_row, np.ndarray) else first_row + row

    if features is not None:
        if features.dtype.kind not in "fiu":
            raise FeatureFileError(f"{source}: its features are stored as {features.dtype}, not as numbers")
        if features.ndim != 2:
            raise FeatureFileError(
                f"{source}: its features have shape {features.shape}, not one row of {meta.feature_dim} "
                "values per image"
            )
        if features.shape[1] != meta.feature_dim:
            raise FeatureFileError(
                f"{source}: its features have {features.shape[1]} values per image but its metadata says "
                f"feature_dim={meta.feature_dim}"
            )
        if isinstance(features, np.ndarray):
            step = max(1, CHECK_VALUES // max(1, meta.feature_dim))
            for start in range(0, len(features), step):
                block = features[start : start + step]
                if not np.isfinite(block).all():
                    row = start + int(np.argmin(np.isfinite(block).all(axis=1)))
                    raise FeatureFileError(f"{source}: row {number(row)} has NaN or infinite values")
    if labels is not None:
        classes = len(meta.label_names)
        if labels.dtype.kind not in "fiu" or labels.ndim != 1:
            raise FeatureFileError(
                f"{source}: its labels are {labels.dtype} of shape {labels.shape}, not one class index per image"
            )
        if isinstance(labels, np.ndarray):
            wrong = (labels < 0) | (labels >= classes)
            if labels.dtype.kind == "f":
                wrong |= labels != np.floor(labels)  # NaN too
            if wrong.any():
                row = int(np.argmax(wrong))
                raise FeatureFileError(
                    f"{source}: row {number(row)} has label {labels[row].item():g}, not a class index "
                    f"(0 to {classes - 1}: {', '.join(meta.label_names)})"
                )


def _check_text(source: str | Path, name: str, column) -> None:
    """Raise :class:`FeatureFileError` unless HDF5 dataset ``column`` is 1-D text (paths, hashes, reasons)."""
    import h5py

    if column.ndim != 1 or (column.dtype.kind != "S" and h5py.check_string_dtype(column.dtype) is None):
        raise FeatureFileError(f"{source}: its {name} are {column.dtype} of shape {column.shape}, not text")


def _text(values) -> list[str]:
    """Strings of an HDF5 text column as read (bytes, numpy bytes or str), file names kept byte for byte."""
    return [os.fsdecode(v) if isinstance(v, bytes) else str(v) for v in values]


@dataclasses.dataclass
class FeatureSet:
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    sha256: list[str]
    meta: FeatureMeta | CombinedMeta


def combine(sets: Sequence[FeatureSet], names: Sequence[str]) -> FeatureSet:
    """One feature set whose vectors concatenate ``sets``' vectors of the same images.

    Rows are matched by (path, content hash), never by position, and come out in the first set's
    order. Every set must hold exactly the same images with the same labels: a missing or extra
    image, or other label names, is a :class:`FeatureFileError` naming the folder (``names``) and an
    image, since vectors of different images must never be glued together.
    """
    first, reference = sets[0], names[0]
    if len(sets) == 1:
        return first
    keys = list(zip(first.paths, first.sha256))
    blocks, parts = [first.features], list(first.meta.parts)
    for other, name in zip(sets[1:], names[1:]):
        if other.meta.label_names != first.meta.label_names:
            raise FeatureFileError(
                f"{name} has labels {list(other.meta.label_names)} but {reference} has "
                f"{list(first.meta.label_names)}: features of different datasets cannot be combined"
            )
        index = {key: row for row, key in enumerate(zip(other.paths, other.sha256))}
        missing = [path for path, digest in keys if (path, digest) not in index]
        if missing:
            raise FeatureFileError(
                f"{name} lacks {len(missing)} of the {len(keys)} images of {reference} (e.g. {missing[0]}); "
                "extract every feature folder from the same dataset"
            )
        if len(index) != len(keys):
            extra = sorted(set(index) - set(keys))
            raise FeatureFileError(
                f"{name} has {len(extra)} images that {reference} lacks (e.g. {extra[0][0]}); "
                "extract every feature folder from the same dataset"
            )
        order = np.array([index[key] for key in keys], dtype=np.int64)
        if not np.array_equal(other.labels[order], first.labels):
            path = first.paths[int(np.flatnonzero(other.labels[order] != first.labels)[0])]
            raise FeatureFileError(f"{name} labels {path} differently from {reference}")
        blocks.append(other.features[order])
        parts += other.meta.parts
    meta = CombinedMeta(tuple(parts))
    features = np.hstack([block.astype(meta.dtype, copy=False) for block in blocks])
    return FeatureSet(features, first.labels, first.paths, first.sha256, meta)


# --- writing ---------------------------------------------------------------------------------------


class _FailSafeFile(io.FileIO):
    """The file an HDF5 file is written through (h5py's ``fileobj`` driver): after a failed write, it
    takes what it is given without writing it.

    HDF5 keeps the data it failed to write (a full disk) and tries again at every close, the last time
    while Python exits, where it crashes the interpreter. Written through this file, HDF5 never sees
    the failure, so it closes cleanly; the writer then raises :attr:`error`.
    """

    def __init__(self, path: Path):
        super().__init__(path, "w+")
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while self.error is None and len(view):
            try:
                view = view[super().write(view) :]
            except OSError as exc:
                self.error = exc
        return size

    def truncate(self, size=None) -> int:
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as exc:
                self.error = exc
        return self.tell() if size is None else size

    def read(self, size=-1) -> bytes:
        data = super().read(size)
        if self.error is not None and size > len(data):  # what was not written reads as zeros, as past the end
            data += bytes(size - len(data))
        return data

    def close(self) -> None:
        """Close the file; the first time, raise the write that failed, if any (:attr:`error`)."""
        closing = not self.closed
        super().close()
        if closing and self.error is not None:
            raise self.error


class _FeatureWriter:
    """What the feature file writers share: ``path``, the ``.partial`` file written first, and what a
    failed write leaves (nothing)."""

    def __init__(self, path: Path, meta: FeatureMeta, fingerprint: str):
        self.path, self.partial = Path(path), Path(str(path) + PARTIAL)
        self.meta, self.fingerprint = meta, fingerprint

    @contextlib.contextmanager
    def _removed_on_failure(self) -> Iterator[None]:
        """Raise an ``OSError`` inside as an :class:`~pyimagesearch_tl.atomic.OutputError` naming the file,
        once the unfinished file is closed and removed."""
        try:
            with writing(self.path, self.partial):
                yield
        except OSError:
            self.close()
            self.partial.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        raise NotImplementedError


class HDF5FeatureWriter(_FeatureWriter):
    """Appends batches to ``<split>.h5.partial`` and renames it into place when finished.

    The file is written in one go from finished shard files (see :mod:`pyimagesearch_tl.extraction`),
    so an interrupted write is simply started again; the ``.partial`` name keeps an unfinished file
    from ever being taken for a finished one.

    Parameters
    ----------
    path : Path
        The finished file's path (``.../<split>.h5``).
    meta : FeatureMeta
    fingerprint : str
        Identifies the exact input (ordered image list + meta).
    chunk_rows : int
        Rows per HDF5 chunk (the extraction batch size).
    """

    def __init__(self, path: Path, meta: FeatureMeta, fingerprint: str, chunk_rows: int = 64):
        import h5py

        super().__init__(path, meta, fingerprint)
        with writing(self.path, self.partial):
            self.partial.unlink(missing_ok=True)
            self.stream = _FailSafeFile(self.partial)
        self.file = f = h5py.File(self.stream, "w")
        dim = meta.feature_dim
        rows = max(1, min(chunk_rows, max(1, (1 << 20) // (4 * dim))))  # chunks of ~1 MB at most
        f.create_dataset("features", (0, dim), maxshape=(None, dim), dtype=meta.dtype, chunks=(rows, dim))
        f.create_dataset("labels", (0,), maxshape=(None,), dtype="int64", chunks=(4096,))
        for name in ("paths", "skipped_paths", "skipped_reasons"):
            f.create_dataset(name, (0,), maxshape=(None,), dtype=h5py.vlen_dtype(bytes), chunks=(1024,))
        f.create_dataset("sha256", (0,), maxshape=(None,), dtype="S64", chunks=(4096,))
        f.attrs.update(meta.to_attrs())
        f.attrs.update(format_version=FORMAT_VERSION, fingerprint=fingerprint, complete=False)

    @property
    def rows(self) -> int:
        return self.file["labels"].shape[0]

    def append(self, features, labels, paths, sha256, skipped: Sequence[tuple[str, str]]) -> None:
        """Write one block of rows and the images skipped among them.

        Raises
        ------
        OutputError
            A write failed (this block's or an earlier one's), naming the file.
        """
        f = self.file
        start, count = self.rows, len(labels)
        if count:
            for name, values in (
                ("features", np.asarray(features, dtype=self.meta.dtype)),
                ("labels", labels),
                ("paths", [os.fsencode(p) for p in paths]),
                ("sha256", [s.encode() for s in sha256]),
            ):
                f[name].resize(start + count, axis=0)
                f[name][start : start + count] = values
        if skipped:
            done = f["skipped_paths"].shape[0]
            for name, values in (
                ("skipped_paths", [os.fsencode(p) for p, _ in skipped]),
                ("skipped_reasons", [r.encode() for _, r in skipped]),
            ):
                f[name].resize(done + len(skipped), axis=0)
                f[name][done:] = values
        if self.stream.error is not None:  # stop now, not after writing the rest to nowhere
            with self._removed_on_failure():
                raise self.stream.error

    def finish(self) -> Path:
        """Close the file and rename it into place.

        Raises
        ------
        OutputError
            A write failed, naming the file; the unfinished file is removed.
        """
        self.file.attrs["complete"] = True
        with self._removed_on_failure():
            self.file.close()
            self.stream.close()
            os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close the file (an unfinished one stays, as ``.partial``, until the next writer starts over)."""
        if self.file.id.valid:
            self.file.close()
        with contextlib.suppress(OSError):  # a failed write: raised by append or finish
            self.stream.close()


class CSVFeatureWriter(_FeatureWriter):
    """PyImageSearch's CSV rows (label index, then values), plus a JSON sidecar with the metadata.

    CSV is for compatibility; like HDF5 it is written to ``.partial`` and renamed when complete.
    """

    def __init__(self, path: Path, meta: FeatureMeta, fingerprint: str, chunk_rows: int = 64):
        super().__init__(path, meta, fingerprint)
        with writing(self.path, self.partial):
            self.handle = open(self.partial, "w", newline="")
        self.writer = csv.writer(self.handle)
        self.paths: list[str] = []
        self.sha256: list[str] = []
        self.skipped: list[tuple[str, str]] = []

    @property
    def rows(self) -> int:
        return len(self.paths)

    def append(self, features, labels, paths, sha256, skipped) -> None:
        format_value = "{:.7g}".format if self.meta.dtype == "float32" else "{:.4g}".format
        with self._removed_on_failure():
            for label, row in zip(labels, np.asarray(features)):
                self.writer.writerow([int(label), *map(format_value, row.tolist())])
        self.paths += list(paths)
        self.sha256 += list(sha256)
        self.skipped += list(skipped)

    def finish(self) -> Path:
        """Rename the rows into place, then write the sidecar that describes them (rows, bytes, paths).

        Killed in between, the sidecar left is an older one whose size and row count do not match the
        rows: the file reads as unfinished and the next extraction redoes it. When the sidecar cannot
        be written (disk full), the rows are removed again, so that no file is left without one.
        """
        with self._removed_on_failure():
            self.handle.close()
            size = self.partial.stat().st_size
            os.replace(self.partial, self.path)
        try:
            atomic_write_json(
                _csv_meta_path(self.path),
                dict(
                    self.meta.to_attrs(),
                    format_version=FORMAT_VERSION,
                    fingerprint=self.fingerprint,
                    complete=True,
                    rows=len(self.paths),
                    csv_bytes=size,
                    paths=[os.fsencode(p).decode("utf-8", "surrogateescape") for p in self.paths],
                    sha256=self.sha256,
                    skipped=[list(s) for s in self.skipped],
                ),
            )
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return self.path

    def close(self) -> None:
        """Close the file (an unfinished one stays, as ``.partial``, until the next writer starts over)."""
        with contextlib.suppress(OSError):  # a failed write: raised by append or finish
            self.handle.close()


@dataclasses.dataclass
class Shard:
    """What one shard of images produced: feature rows and skips, by position in the shard's image list."""

    features: np.ndarray  # (n, D) float32
    positions: np.ndarray  # (n,) int64: which images of the shard the rows belong to
    skipped: list[tuple[int, str]]  # (position, reason) of the images the decoder refused


def write_shard(path: str | Path, identity: str, shard: Shard) -> None:
    """Write ``shard`` whole to ``path`` (temporary file, then rename), stamped with ``identity``.

    A failed write is an :class:`~pyimagesearch_tl.atomic.OutputError` naming ``path``; nothing is left.
    """
    import h5py

    with atomic_path(path) as temporary:
        with _FailSafeFile(temporary) as stream, h5py.File(stream, "w") as f:
            f.create_dataset("features", data=np.asarray(shard.features, np.float32))
            f.create_dataset("positions", data=np.asarray(shard.positions, np.int64))
            f.create_dataset("skipped_positions", data=np.array([p for p, _ in shard.skipped], np.int64))
            f.create_dataset(
                "skipped_reasons", data=[r.encode() for _, r in shard.skipped], dtype=h5py.vlen_dtype(bytes)
            )
            f.attrs["identity"] = identity


def read_shard(path: str | Path, identity: str, meta: FeatureMeta | None = None, images: int = 0) -> Shard | None:
    """The shard at ``path`` if it exists, is readable and carries ``identity``; else None.

    Given ``meta`` and ``images`` (how many images the shard was given), what a shard of this identity
    holds is checked too: vectors of ``meta.feature_dim`` finite numbers (:func:`check_rows`), one per
    position, and positions (of vectors and of skipped images) that are distinct images of the shard.

    Raises
    ------
    FeatureFileError
        The shard carries ``identity`` but its content is not what the shard was given to compute.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("identity") != identity:
                return None
            shard = Shard(
                f["features"][:],
                f["positions"][:],
                [(int(p), bytes(r).decode()) for p, r in zip(f["skipped_positions"][:], f["skipped_reasons"][:])],
            )
    except (OSError, KeyError, ValueError, TypeError):  # missing, truncated, or not a shard file
        return None
    if meta is not None:
        check_rows(f"shard file {path}", meta, shard.features)
        if not _distinct_images(shard, images):
            raise FeatureFileError(
                f"shard file {path}: its {len(shard.features)} vectors and {len(shard.skipped)} skipped images "
                f"are not one each of distinct images among the shard's {images}"
            )
    return shard


def _distinct_images(shard: Shard, images: int) -> bool:
    """True when every vector and skip of ``shard`` is at its own position among ``images``."""
    positions = shard.positions
    if positions.ndim != 1 or positions.dtype.kind not in "iu" or len(positions) != len(shard.features):
        return False
    every = np.concatenate([positions, np.array([p for p, _ in shard.skipped], dtype=np.int64)])
    return bool(((every >= 0) & (every < images)).all()) and len(np.unique(every)) == len(every)


def _csv_meta_path(path: Path) -> Path:
    return Path(str(path) + ".meta.json")


# --- reading ---------------------------------------------------------------------------------------


def feature_file(features_dir: str | Path, split: str) -> Path:
    """The finished feature file of ``split`` in ``features_dir`` (``ptl extract`` keeps one format per split)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FeatureFileError(f"features folder {str(features_dir)!r} does not exist (run extract first)")
    found = [features_dir / f"{split}{suffix}" for suffix in suffixes()]
    found = [path for path in found if path.is_file()]
    if len(found) > 1:
        raise FeatureFileError(
            f"{features_dir} holds the {split!r} features in two formats ({', '.join(p.name for p in found)}), "
            f"maybe from different settings; delete the one you do not want, or rerun extract"
        )
    if found:
        return found[0]
    if (features_dir / SHARDS / split).is_dir() or list(features_dir.glob(f"{split}.*{PARTIAL}")):
        raise FeatureFileError(
            f"the {split!r} features in {features_dir} are an unfinished extraction; rerun extract to resume it"
        )
    found = sorted(p.name for p in features_dir.iterdir() if p.suffix in suffixes())
    raise FeatureFileError(
        f"no feature file for split {split!r} in {features_dir} (found: {', '.join(found) or 'none'})"
    )


def written_by_ptl(path: Path) -> bool:
    """True when ``path`` is a feature file ``ptl extract`` wrote (an HDF5 file or a CSV sidecar with its stamps)."""
    try:
        if path.suffix == FORMATS.get("hdf5").suffix:
            import h5py

            with h5py.File(path, "r") as f:
                return "format_version" in f.attrs and "fingerprint" in f.attrs
        sidecar = json.loads(_csv_meta_path(path).read_text(encoding="utf-8"))
        return isinstance(sidecar, dict) and "format_version" in sidecar and "fingerprint" in sidecar
    except (OSError, ValueError):
        return False


def remove_feature_files(features_dir: str | Path, split: str, keep: str | None = None) -> list[Path]:
    """Remove the feature files of ``split`` in every format but ``keep`` (all when None), with their sidecars,
    and, with ``keep=None``, the split's list of skipped images and unfinished shards.

    Only files ``ptl extract`` wrote are removed (or, in the ``keep`` format, left to be replaced): a file
    of such a name that it did not write is a :class:`FeatureFileError`, never touched. Returns the
    feature files removed.
    """
    features_dir, removed = Path(features_dir), []
    for entry in FORMATS.entries():
        name, path = entry.name, features_dir / f"{split}{entry.value.suffix}"
        if not path.is_file():
            continue
        if not written_by_ptl(path):  # neither removed nor, for the kept format, replaced
            raise FeatureFileError(
                f"{path} is not a feature file ptl extract wrote (another program's, or damaged: cut short, "
                f"unreadable) and stands where the {split!r} features go; move it away, or extract into another folder"
            )
        if name != keep:
            path.unlink()
            _csv_meta_path(path).unlink(missing_ok=True)
            removed.append(path)
    if keep is None and removed:
        (features_dir / f"{split}.skipped.csv").unlink(missing_ok=True)
    if keep is None:
        shutil.rmtree(features_dir / SHARDS / split, ignore_errors=True)
        with contextlib.suppress(OSError):
            (features_dir / SHARDS).rmdir()  # once no split has shards left
    return removed


def feature_folders(features_dirs: str | Path | Sequence[str | Path]) -> list[Path]:
    """One feature folder or several (combined backbones) as a list of paths."""
    if isinstance(features_dirs, (str, Path)):
        return [Path(features_dirs)]
    folders = [Path(d) for d in features_dirs]
    if len(set(folders)) != len(folders):
        raise FeatureFileError(f"the same feature folder is given twice: {', '.join(map(str, folders))}")
    return folders


def read_split(features_dirs: str | Path | Sequence[str | Path], split: str) -> FeatureSet:
    """The features of ``split``: from one folder, or from several concatenated row by row (:func:`combine`)."""
    folders = feature_folders(features_dirs)
    return combine([read_features(feature_file(d, split)) for d in folders], [str(d) for d in folders])


def has_feature_file(features_dir: str | Path, split: str) -> bool:
    """True when ``features_dir`` holds a finished feature file for ``split``."""
    return any((Path(features_dir) / f"{split}{suffix}").is_file() for suffix in suffixes())


class HDF5FeatureReader:
    """Reads the parts of a finished ``.h5`` feature file, each on its own (features only when asked).

    Opening checks the metadata and the columns' kinds and lengths (:func:`_open_h5`); what is read
    is checked by :func:`check_rows`.
    """

    def __init__(self, path: Path):
        self.path = path

    def meta(self) -> FeatureMeta:
        with _open_h5(self.path) as f:
            return FeatureMeta.from_attrs(f.attrs, self.path)

    def load(self) -> FeatureSet:
        """The whole file, checked (:func:`check_rows`)."""
        with _open_h5(self.path) as f:
            meta, labels = FeatureMeta.from_attrs(f.attrs, self.path), f["labels"][:]
            check_rows(self.path, meta, labels=labels)
            return FeatureSet(
                features=_read_checked(self.path, meta, f["features"], 0, len(labels)),
                labels=labels.astype(np.int64, copy=False),
                paths=_text(f["paths"][:]),
                sha256=_text(f["sha256"][:]),
                meta=meta,
            )

    def sha256(self) -> list[str]:
        with _open_h5(self.path) as f:
            return _text(f["sha256"][:])

    def skipped(self) -> list[tuple[str, str]]:
        with _open_h5(self.path) as f:
            try:
                columns = [f[name] for name in ("skipped_paths", "skipped_reasons")]
            except KeyError as exc:
                raise FeatureFileError(f"{self.path}: not a feature file ({exc})") from None
            for name, column in zip(("skipped paths", "skipped reasons"), columns):
                _check_text(self.path, name, column)
            if len(columns[0]) != len(columns[1]):
                raise FeatureFileError(
                    f"{self.path}: {len(columns[0])} skipped paths but {len(columns[1])} reasons; rerun extract"
                )
            return list(zip(_text(columns[0][:]), _text(columns[1][:])))

    def fingerprint(self) -> str | None:
        with _open_h5(self.path) as f:
            value = f.attrs.get("fingerprint")
            return value.decode() if isinstance(value, bytes) else value

    @contextlib.contextmanager
    def rows(self) -> Iterator[Callable[[Sequence[int]], np.ndarray]]:
        """Rows read on demand (a file larger than memory is fine), each checked (:func:`check_rows`)."""
        with _open_h5(self.path) as f:
            meta, dataset = FeatureMeta.from_attrs(f.attrs, self.path), f["features"]

            def read(rows: Sequence[int]) -> np.ndarray:
                if len(rows) == 0:
                    return np.zeros((0, dataset.shape[1]), dataset.dtype)
                unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
                values = dataset[unique]  # h5py reads increasing row numbers
                check_rows(self.path, meta, values, first_row=unique)
                return values[inverse]

            yield read


class CSVFeatureReader:
    """Reads a ``.csv`` feature file and its JSON sidecar (paths, hashes, metadata).

    CSV is a compatibility format: its features are always loaded whole.
    """

    def __init__(self, path: Path):
        self.path = path

    def _sidecar(self) -> dict:
        """The sidecar, its fields checked (:data:`SIDECAR_FIELDS`) and checked against the rows: as many paths
        and hashes as the rows it recorded, the size it recorded."""
        sidecar = _csv_meta_path(self.path)
        try:
            values = json.loads(sidecar.read_text(encoding="utf-8"))
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise FeatureFileError(f"{self.path}: its metadata file {sidecar.name} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FeatureFileError(f"{sidecar}: unreadable metadata ({exc})") from None
        if not isinstance(values, dict) or not isinstance(values.get("paths"), list):
            raise FeatureFileError(f"{sidecar}: not the metadata of a feature file")
        values.setdefault("sha256", [])
        values.setdefault("skipped", [])
        for name, (is_valid, must_be) in SIDECAR_FIELDS.items():
            if name in values and not is_valid(values[name]):
                raise FeatureFileError(
                    f"{sidecar}: {name!r} is {type(values[name]).__name__} {_clip(values[name])}, not {must_be}"
                )
        counts = {len(values["paths"]), len(values["sha256"]), values.get("rows", len(values["paths"]))}
        if len(counts) > 1 or values.get("csv_bytes", size) != size:
            raise FeatureFileError(
                f"{self.path}: its rows and {sidecar.name} disagree (a write was interrupted); rerun extract"
            )
        return values

    def meta(self) -> FeatureMeta:
        return FeatureMeta.from_attrs(self._sidecar(), _csv_meta_path(self.path))

    def load(self) -> FeatureSet:
        """The whole file, checked (:func:`check_rows`): a label and ``feature_dim`` finite numbers per row."""
        sidecar = self._sidecar()
        meta = FeatureMeta.from_attrs(sidecar, _csv_meta_path(self.path))
        try:
            data = np.loadtxt(self.path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as exc:  # text that is not a number, rows of different lengths
            raise FeatureFileError(
                f"{self.path}: not rows of a label and {meta.feature_dim} numbers ({str(exc).split(';')[0]})"
            ) from None
        if data.size == 0:
            data = np.zeros((0, meta.feature_dim + 1))
        if len(data) != len(sidecar["paths"]):
            raise FeatureFileError(
                f"{self.path}: {len(data)} rows of features but {len(sidecar['paths'])} paths; rerun extract"
            )
        with np.errstate(over="ignore"):  # a value too large for the type becomes infinite, and is refused
            features = data[:, 1:].astype(meta.dtype)
        check_rows(self.path, meta, features, data[:, 0])
        paths = [os.fsdecode(p.encode("utf-8", "surrogateescape")) for p in sidecar["paths"]]
        return FeatureSet(features, data[:, 0].astype(np.int64), paths, sidecar["sha256"], meta)

    def sha256(self) -> list[str]:
        return list(self._sidecar()["sha256"])

    def skipped(self) -> list[tuple[str, str]]:
        return [tuple(s) for s in self._sidecar()["skipped"]]

    def fingerprint(self) -> str | None:
        return self._sidecar().get("fingerprint")

    @contextlib.contextmanager
    def rows(self) -> Iterator[Callable[[Sequence[int]], np.ndarray]]:
        features = self.load().features
        yield lambda rows: features[np.asarray(rows, dtype=np.int64)]


def _clip(value, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: What the fields of a CSV sidecar must be (besides the :class:`FeatureMeta` fields): a test and its words.
SIDECAR_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "paths": (_strings, "a list of file paths"),
    "sha256": (_strings, "a list of content hashes"),
    "skipped": (
        lambda value: isinstance(value, list) and all(_strings(pair) and len(pair) == 2 for pair in value),
        "a list of [path, reason] pairs",
    ),
    "rows": (_count, "a whole number of rows"),
    "csv_bytes": (_count, "a whole number of bytes"),
    "fingerprint": (lambda value: isinstance(value, str), "a string"),
}


@dataclasses.dataclass(frozen=True)
class FeatureFormat:
    """A feature-file format (``--format NAME``): its file suffix, writer and reader classes."""

    suffix: str
    writer: type
    reader: type


#: The feature-file formats, by name (see :mod:`pyimagesearch_tl.registry`).
FORMATS: Registry[FeatureFormat] = Registry("feature format", "formats")
FORMATS.register(
    "hdf5",
    FeatureFormat(".h5", HDF5FeatureWriter, HDF5FeatureReader),
    description="HDF5 (.h5), chunked: read block by block (train --streaming); the default",
)
FORMATS.register(
    "csv",
    FeatureFormat(".csv", CSVFeatureWriter, CSVFeatureReader),
    description="CSV (.csv) with a JSON sidecar of the layout: for other tools",
)


def suffixes() -> list[str]:
    """The file suffix of every feature format."""
    return [entry.value.suffix for entry in FORMATS.entries()]


def feature_reader(path: str | Path) -> HDF5FeatureReader | CSVFeatureReader:
    """The reader for the finished feature file ``path``, chosen by its suffix."""
    path = Path(path)
    for entry in FORMATS.entries():
        if path.suffix == entry.value.suffix:
            return entry.value.reader(path)
    raise FeatureFileError(f"{path}: not a feature file (expected a name ending in {' or '.join(suffixes())})")


def _open_h5(path: Path):
    """The finished HDF5 feature file ``path``, open, once its metadata and columns are checked.

    Checked without reading the columns: the metadata (:meth:`FeatureMeta.from_attrs`), the kinds and
    shapes of ``features`` and ``labels`` (:func:`check_rows`), ``paths`` and ``sha256`` as text, and
    one row of each per image. Anything wrong is a :class:`FeatureFileError` naming the file.
    """
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({exc})") from None
    try:
        complete = handle.attrs.get("complete", False)
        if not (isinstance(complete, (bool, np.bool_)) and complete):  # an array or a number is not a finished file
            raise FeatureFileError(f"{path}: the extraction that wrote it did not finish; rerun extract")
        try:
            columns = {name: handle[name] for name in ("features", "labels", "paths", "sha256")}
        except KeyError as exc:
            raise FeatureFileError(f"{path}: not a feature file ({exc})") from None
        if not all(isinstance(column, h5py.Dataset) for column in columns.values()):
            raise FeatureFileError(f"{path}: not a feature file (its columns are not all datasets)")
        check_rows(path, FeatureMeta.from_attrs(handle.attrs, path), columns["features"], columns["labels"])
        _check_text(path, "paths", columns["paths"])
        _check_text(path, "sha256", columns["sha256"])
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) > 1:
            counts = ", ".join(f"{n} {name}" for name, n in lengths.items())
            raise FeatureFileError(f"{path}: its columns disagree ({counts}); rerun extract")
    except BaseException:
        handle.close()
        raise
    return handle


def read_meta(path: str | Path) -> FeatureMeta:
    """The metadata of a finished feature file, without reading the features."""
    return feature_reader(path).meta()


def read_features(path: str | Path) -> FeatureSet:
    """Load a whole finished feature file (HDF5 or CSV) into memory."""
    return feature_reader(path).load()


def iter_chunks(path: str | Path, rows: int | None = None, blocks=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(features, labels)`` blocks of ``rows`` rows of an HDF5 file without loading it whole.

    ``blocks`` gives the block numbers to read, in order (default: all, first to last), so callers
    can shuffle the order or hold blocks out. Every block is checked as it is read (:func:`check_rows`).
    """
    path = Path(path)
    with _open_h5(path) as f:
        meta, features, labels = FeatureMeta.from_attrs(f.attrs, path), f["features"], f["labels"]
        step = rows or (features.chunks or (SHARD_SIZE,))[0]  # a file from elsewhere may not be chunked
        for block in range(-(-features.shape[0] // step)) if blocks is None else blocks:
            start = block * step
            y = labels[start : start + step]
            check_rows(path, meta, labels=y, first_row=start)
            yield _read_checked(path, meta, features, start, start + step), y.astype(np.int64, copy=False)


def _read_checked(path: Path, meta: FeatureMeta, dataset, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the HDF5 ``features`` dataset, read and checked (:func:`check_rows`)
    :data:`CHECK_VALUES` values at a time, each part checked while it is still in the CPU's cache."""
    stop = min(stop, len(dataset))
    step = max(1, CHECK_VALUES // meta.feature_dim)
    if stop - start <= step:  # one part: no copy
        rows = dataset[start:stop]
        check_rows(path, meta, rows, first_row=start)
        return rows
    rows = np.empty((stop - start, meta.feature_dim), dataset.dtype)
    for part in range(start, stop, step):
        values = dataset[part : min(stop, part + step)]
        check_rows(path, meta, values, first_row=part)
        rows[part - start : part - start + len(values)] = values
    return rows


def read_labels(path: str | Path) -> np.ndarray:
    """Only the label column of a finished HDF5 feature file (small even when the features are not), checked."""
    path = Path(path)
    with _open_h5(path) as f:
        labels = f["labels"][:]
        check_rows(path, FeatureMeta.from_attrs(f.attrs, path), labels=labels)
        return labels.astype(np.int64, copy=False)


def read_sha256(path: str | Path) -> list[str]:
    """Only the content-hash column of a finished feature file."""
    return feature_reader(path).sha256()


def row_reader(path: str | Path) -> contextlib.AbstractContextManager[Callable[[Sequence[int]], np.ndarray]]:
    """A context giving a function that reads feature rows of a finished file by row number, in the order asked.

    HDF5 files are read row by row on demand (a file larger than memory is fine); CSV files,
    a compatibility format, are loaded whole once.
    """
    return feature_reader(path).rows()


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    """The (path, reason) pairs of images a finished feature file could not include."""
    return feature_reader(path).skipped()


def read_fingerprint(path: str | Path) -> str | None:
    """The input fingerprint of a finished feature file, or None if it has none or is unreadable."""
    try:
        return feature_reader(path).fingerprint()
    except FeatureFileError:
        return None
