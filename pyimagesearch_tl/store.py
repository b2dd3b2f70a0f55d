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
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_json
from .errors import FeatureFileError

FORMAT_VERSION = 1
SUFFIXES = {"hdf5": ".h5", "csv": ".csv"}
PARTIAL = ".partial"
SHARD_SIZE = 256  # images per shard file: the unit of extraction work and of resume
SHARDS = ".shards"  # <features dir>/.shards/<split>/: shard files of an extraction in progress
LABEL_ENCODER = "label_encoder.joblib"  # <features dir>/label_encoder.joblib: the class names, fitted once

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

    def describe(self) -> str:
        mirrored = ", mirrored views averaged" if self.views == 2 else ""
        return (
            f"{self.backbone} ({self.weights} weights, {self.pooling} pooling, {self.input_size}px, "
            f"{self.feature_dim} values{mirrored})"
        )

    def to_attrs(self) -> dict[str, object]:
        values = dataclasses.asdict(self)
        values["label_names"] = json.dumps(list(self.label_names))
        return values

    @classmethod
    def from_attrs(cls, attrs) -> "FeatureMeta":
        try:
            values = {field.name: attrs[field.name] for field in dataclasses.fields(cls) if field.name in attrs}
            values["label_names"] = tuple(json.loads(values["label_names"]))
            values["input_size"] = int(values["input_size"])
            values["feature_dim"] = int(values["feature_dim"])
            values["views"] = int(values.get("views", 1))  # files written before views existed have one
            values = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in values.items()}
            return cls(**values)
        except (KeyError, TypeError, ValueError) as exc:
            raise FeatureFileError(f"feature file metadata is incomplete or unreadable ({exc})") from None

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


class HDF5FeatureWriter:
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

        self.path, self.partial = Path(path), Path(str(path) + PARTIAL)
        self.meta, self.fingerprint = meta, fingerprint
        self.partial.unlink(missing_ok=True)
        self.file = h5py.File(self.partial, "w")
        f, dim = self.file, meta.feature_dim
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
        """Write one block of rows and the images skipped among them."""
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

    def finish(self) -> Path:
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


class CSVFeatureWriter:
    """PyImageSearch's CSV rows (label index, then values), plus a JSON sidecar with the metadata.

    CSV is for compatibility; like HDF5 it is written to ``.partial`` and renamed when complete.
    """

    def __init__(self, path: Path, meta: FeatureMeta, fingerprint: str, chunk_rows: int = 64):
        self.path, self.partial = Path(path), Path(str(path) + PARTIAL)
        self.meta, self.fingerprint = meta, fingerprint
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
        for label, row in zip(labels, np.asarray(features)):
            self.writer.writerow([int(label), *map(format_value, row.tolist())])
        self.paths += list(paths)
        self.sha256 += list(sha256)
        self.skipped += list(skipped)

    def finish(self) -> Path:
        """Rename the rows into place, then write the sidecar that describes them (rows, bytes, paths).

        Killed in between, the sidecar left is an older one whose size and row count do not match the
        rows: the file reads as unfinished and the next extraction redoes it.
        """
        self.handle.close()
        size = self.partial.stat().st_size
        os.replace(self.partial, self.path)
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
        return self.path

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()


WRITERS = {"hdf5": HDF5FeatureWriter, "csv": CSVFeatureWriter}


@dataclasses.dataclass
class Shard:
    """What one shard of images produced: feature rows and skips, by position in the shard's image list."""

    features: np.ndarray  # (n, D) float32
    positions: np.ndarray  # (n,) int64: which images of the shard the rows belong to
    skipped: list[tuple[int, str]]  # (position, reason) of the images the decoder refused


def write_shard(path: str | Path, identity: str, shard: Shard) -> None:
    """Write ``shard`` whole to ``path`` (temporary file, then rename), stamped with ``identity``."""
    import h5py

    with atomic_path(path) as temporary:
        with h5py.File(temporary, "w") as f:
            f.create_dataset("features", data=np.asarray(shard.features, np.float32))
            f.create_dataset("positions", data=np.asarray(shard.positions, np.int64))
            f.create_dataset("skipped_positions", data=np.array([p for p, _ in shard.skipped], np.int64))
            f.create_dataset(
                "skipped_reasons", data=[r.encode() for _, r in shard.skipped], dtype=h5py.vlen_dtype(bytes)
            )
            f.attrs["identity"] = identity


def read_shard(path: str | Path, identity: str) -> Shard | None:
    """The shard at ``path`` if it exists, is readable and carries ``identity``; else None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("identity") != identity:
                return None
            return Shard(
                f["features"][:],
                f["positions"][:],
                [(int(p), bytes(r).decode()) for p, r in zip(f["skipped_positions"][:], f["skipped_reasons"][:])],
            )
    except (OSError, KeyError, ValueError):  # missing, truncated, or not a shard file
        return None


def _csv_meta_path(path: Path) -> Path:
    return Path(str(path) + ".meta.json")


# --- reading ---------------------------------------------------------------------------------------


def feature_file(features_dir: str | Path, split: str) -> Path:
    """The finished feature file of ``split`` in ``features_dir`` (``ptl extract`` keeps one format per split)."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FeatureFileError(f"features folder {str(features_dir)!r} does not exist (run extract first)")
    found = [features_dir / f"{split}{suffix}" for suffix in SUFFIXES.values()]
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
    found = sorted(p.name for p in features_dir.iterdir() if p.suffix in SUFFIXES.values())
    raise FeatureFileError(
        f"no feature file for split {split!r} in {features_dir} (found: {', '.join(found) or 'none'})"
    )


def written_by_ptl(path: Path) -> bool:
    """True when ``path`` is a feature file ``ptl extract`` wrote (an HDF5 file or a CSV sidecar with its stamps)."""
    try:
        if path.suffix == SUFFIXES["hdf5"]:
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
    for name, suffix in SUFFIXES.items():
        path = features_dir / f"{split}{suffix}"
        if not path.is_file():
            continue
        if not written_by_ptl(path):  # neither removed nor, for the kept format, replaced
            raise FeatureFileError(
                f"{path} was not written by ptl extract and stands where the {split!r} features go; "
                f"move it away, or extract into another folder"
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
    return any((Path(features_dir) / f"{split}{suffix}").is_file() for suffix in SUFFIXES.values())


class HDF5FeatureReader:
    """Reads the parts of a finished ``.h5`` feature file, each on its own (features only when asked)."""

    def __init__(self, path: Path):
        self.path = path

    def meta(self) -> FeatureMeta:
        with _open_h5(self.path) as f:
            return FeatureMeta.from_attrs(f.attrs)

    def load(self) -> FeatureSet:
        with _open_h5(self.path) as f:
            return FeatureSet(
                features=f["features"][:],
                labels=f["labels"][:],
                paths=[os.fsdecode(bytes(p)) for p in f["paths"][:]],
                sha256=[s.decode() for s in f["sha256"][:]],
                meta=FeatureMeta.from_attrs(f.attrs),
            )

    def sha256(self) -> list[str]:
        with _open_h5(self.path) as f:
            return [s.decode() for s in f["sha256"][:]]

    def skipped(self) -> list[tuple[str, str]]:
        with _open_h5(self.path) as f:
            pairs = zip(f["skipped_paths"][:], f["skipped_reasons"][:])
            return [(os.fsdecode(bytes(p)), bytes(r).decode()) for p, r in pairs]

    def fingerprint(self) -> str | None:
        with _open_h5(self.path) as f:
            value = f.attrs.get("fingerprint")
            return value.decode() if isinstance(value, bytes) else value

    @contextlib.contextmanager
    def rows(self) -> Iterator[Callable[[Sequence[int]], np.ndarray]]:
        """Rows read on demand (a file larger than memory is fine)."""
        with _open_h5(self.path) as f:
            dataset = f["features"]

            def read(rows: Sequence[int]) -> np.ndarray:
                if len(rows) == 0:
                    return np.zeros((0, dataset.shape[1]), dataset.dtype)
                unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
                return dataset[unique][inverse]  # h5py reads increasing row numbers

            yield read


class CSVFeatureReader:
    """Reads a ``.csv`` feature file and its JSON sidecar (paths, hashes, metadata).

    CSV is a compatibility format: its features are always loaded whole.
    """

    def __init__(self, path: Path):
        self.path = path

    def _sidecar(self) -> dict:
        """The sidecar, checked against the rows: the same number of paths and hashes, the size it recorded."""
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
        counts = {len(values["paths"]), len(values.get("sha256", ())), values.get("rows", len(values["paths"]))}
        if len(counts) > 1 or values.get("csv_bytes", size) != size:
            raise FeatureFileError(
                f"{self.path}: its rows and {sidecar.name} disagree (a write was interrupted); rerun extract"
            )
        return values

    def meta(self) -> FeatureMeta:
        return FeatureMeta.from_attrs(self._sidecar())

    def load(self) -> FeatureSet:
        sidecar = self._sidecar()
        meta = FeatureMeta.from_attrs(sidecar)
        data = np.loadtxt(self.path, delimiter=",", dtype=np.float64, ndmin=2)
        if data.size == 0:
            data = np.zeros((0, meta.feature_dim + 1))
        if len(data) != len(sidecar["paths"]):
            raise FeatureFileError(
                f"{self.path}: {len(data)} rows of features but {len(sidecar['paths'])} paths; rerun extract"
            )
        paths = [os.fsdecode(p.encode("utf-8", "surrogateescape")) for p in sidecar["paths"]]
        return FeatureSet(data[:, 1:].astype(meta.dtype), data[:, 0].astype(np.int64), paths, sidecar["sha256"], meta)

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


#: Reader class by file suffix, one per format of :data:`WRITERS`.
READERS = {SUFFIXES["hdf5"]: HDF5FeatureReader, SUFFIXES["csv"]: CSVFeatureReader}


def feature_reader(path: str | Path) -> HDF5FeatureReader | CSVFeatureReader:
    """The reader for the finished feature file ``path``, chosen by its suffix."""
    path = Path(path)
    try:
        return READERS[path.suffix](path)
    except KeyError:
        raise FeatureFileError(
            f"{path}: not a feature file (expected a name ending in {' or '.join(READERS)})"
        ) from None


def _open_h5(path: Path):
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({exc})") from None
    if not handle.attrs.get("complete", False):
        handle.close()
        raise FeatureFileError(f"{path}: the extraction that wrote it did not finish; rerun extract")
    try:
        lengths = {name: len(handle[name]) for name in ("features", "labels", "paths", "sha256")}
    except KeyError as exc:
        handle.close()
        raise FeatureFileError(f"{path}: not a feature file ({exc})") from None
    if len(set(lengths.values())) > 1:
        handle.close()
        counts = ", ".join(f"{n} {name}" for name, n in lengths.items())
        raise FeatureFileError(f"{path}: its columns disagree ({counts}); rerun extract")
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
    can shuffle the order or hold blocks out.
    """
    with _open_h5(Path(path)) as f:
        features, labels = f["features"], f["labels"]
        step = rows or features.chunks[0]
        for block in range(-(-features.shape[0] // step)) if blocks is None else blocks:
            start = block * step
            yield features[start : start + step], labels[start : start + step]


def read_labels(path: str | Path) -> np.ndarray:
    """Only the label column of a finished HDF5 feature file (small even when the features are not)."""
    with _open_h5(Path(path)) as f:
        return f["labels"][:]


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
