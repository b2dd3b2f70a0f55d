"""Classifying a photo archive: paths -> shards -> an engine -> part files -> one CSV, Parquet or JSON file.

``ptl predict`` and :meth:`pyimagesearch_tl.api.Model.predict_many` run here, for a few photos or millions:

1. The inputs (files, folders, glob patterns, a list file) become one ordered list of paths.
2. The list is cut into shards of ``shard_size`` consecutive paths. A shard's identity is the model
   file's SHA-256, ``top_k``, the pixel limit, the runtime asked for, and each photo's absolute path,
   size and modification time; a part file of that identity is finished work, so a rerun after a
   crash, a Ctrl-C or a killed driver never redoes it (see :func:`plan_parts`).
3. The engine (:mod:`pyimagesearch_tl.engines`: this process, or a Ray cluster whose workers each open
   the model once, with its runtime, precision and combined backbones) classifies the missing shards
   and hashes their files; this process writes each shard's part file as it arrives.
4. The parts are joined, in input order, into the output file; the part files are then removed.

With an output file the whole run holds that file's lock (:mod:`pyimagesearch_tl.locks`); without
one, nothing is written and nothing can be resumed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import stat
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .atomic import OutputError, atomic_path, atomic_write_json, check_writable, describe_os_error, remove_entry
from .bundle import Bundle
from .engines import ShardTask, create_engine, engine_class
from .errors import BundleError, ConfigError, PTLError
from .export import OnnxPredictor
from .features import interrupt_after_batch, limit_tensorflow_threads
from .images import MAX_PIXELS, sha256_file
from .locks import output_lock
from .prediction import UNKNOWN, Prediction, Predictor, expand_paths
from .store import SHARD_SIZE

#: The columns of every output row, whichever the engine and the format.
COLUMNS = ("path", "sha256", "label", "score", "unknown", "familiarity", "top", "error")
#: The formats of the output file, by suffix.
FORMATS = (".csv", ".parquet", ".json")


def read_path_list(path: str | Path) -> list[Path]:
    """The photos a list file names: one path per line, relative ones from the list's folder; blank
    lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise ConfigError(f"cannot read the list file {str(path)!r}: {describe_os_error(exc)}") from None
    lines = [line.strip() for line in text.splitlines()]
    return [path.parent / line for line in lines if line and not line.startswith("#")]


def row_of(prediction: Prediction, sha256: str) -> dict[str, Any]:
    """One output row (see :data:`COLUMNS`) of a :class:`~pyimagesearch_tl.prediction.Prediction`."""
    skipped = prediction.error is not None
    return dict(
        path=prediction.path,
        sha256=sha256,
        label=prediction.label or "",
        score=prediction.score,
        unknown=None if skipped else prediction.label == UNKNOWN,
        familiarity=prediction.familiarity,
        top=[[name, score] for name, score in prediction.top],
        error=prediction.error,
    )


def _sha256(path: str) -> str:
    try:
        return sha256_file(path)
    except (OSError, PTLError):  # gone, a folder, a pipe, a dangling link: the decoder has said why
        return ""


def open_predictor(
    path: str | Path,
    top_k: int = 3,
    *,
    trust_pickle: bool = False,
    batch_size: int = 32,
    max_pixels: int = MAX_PIXELS,
    runtime: str = "auto",
):
    """The predictor of a model file: a bundle's :class:`~pyimagesearch_tl.prediction.Predictor`, or an
    ``.onnx`` file's :class:`~pyimagesearch_tl.export.OnnxPredictor` (ONNX Runtime, no TensorFlow;
    ``runtime`` "auto" or "onnxruntime" only). ``ptl predict``, ``ptl serve`` and the workers open models here."""
    if Path(path).suffix.lower() != ".onnx":
        return Predictor(Bundle.load(path, trust_pickle=trust_pickle), batch_size, max_pixels, top_k, runtime)
    if runtime not in ("auto", "onnxruntime"):
        raise ConfigError(f"{path} is an ONNX model, run by ONNX Runtime: runtime {runtime!r} is for bundles")
    return OnnxPredictor(path, batch_size, max_pixels, top_k)


@dataclasses.dataclass
class PredictionJob:
    """An engine's job (see :mod:`pyimagesearch_tl.engines`): each worker opens the model file whose
    content is ``model`` once, then classifies shard after shard; each result is the shard's rows.

    Every worker, the local engine's included, opens a copy of ``model``: exactly the bytes that name the
    shards, whatever happens to the file meanwhile. ``source`` is the file's path, which only
    :meth:`describe` opens (before the bytes are read), so that a model refused is named as the user gave it.
    """

    model: bytes
    suffix: str
    trust_pickle: bool
    top_k: int
    batch_size: int
    max_pixels: int
    requested_runtime: str  # as the user gave it (``runtime``: where the network runs once started)
    images: int  # the whole job's size: where the network runs (see FeatureExtractor.expect)
    source: Path | None = None
    predictor: Any = None

    def __getstate__(self):
        return dict(self.__dict__, source=None, predictor=None)

    def settings(self) -> str:
        """What decides a shard's rows besides its photos: the model's bytes, top-k, the pixel limit, the runtime."""
        model = hashlib.sha256(self.model).hexdigest()
        return f"{model}\0{self.top_k}\0{self.max_pixels}\0{self.requested_runtime}"

    def _open(self, path: Path):
        return open_predictor(
            path,
            self.top_k,
            trust_pickle=self.trust_pickle,
            batch_size=self.batch_size,
            max_pixels=self.max_pixels,
            runtime=self.requested_runtime,
        )

    def _with_model_file(self, use: Callable[[Path], Any]):
        with tempfile.TemporaryDirectory(prefix="ptl-model-") as folder:
            path = Path(folder) / f"model{self.suffix}"
            path.write_bytes(self.model)
            return use(path)

    def describe(self):
        """The model, opened without building its backbone: a bundle (checked whole), or an ONNX file's
        description (:class:`~pyimagesearch_tl.export.OnnxModel`). What the driver reports with."""
        if self.suffix.lower() == ".onnx":
            return self._open(self.source).bundle  # no backbone: cheap
        return Bundle.load(self.source, trust_pickle=self.trust_pickle)

    def check(self) -> None:
        """Done when the run was made (:meth:`describe`)."""

    def start(self, cpus: int | None) -> "PredictionJob":
        if self.predictor is None:
            if cpus and self.suffix.lower() != ".onnx":
                limit_tensorflow_threads(cpus)
            self.predictor = self._with_model_file(self._open)
        extractor = getattr(self.predictor, "extractor", None)
        if cpus and extractor is not None:  # the decoder and the runtimes keep to the worker's CPUs
            for part in getattr(extractor, "parts", [extractor]):
                part.workers = cpus
        self.predictor.expect(self.images)
        return self

    @property
    def meta(self):
        return self.predictor.bundle.meta

    @property
    def runtime(self) -> str:
        extractor = getattr(self.predictor, "extractor", None)
        return "onnxruntime" if extractor is None else extractor.runtime

    def run(self, tasks: Sequence[ShardTask]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """Each task's rows, in order, as soon as all its photos are classified: the photos of every
        task go through one decoding stream, which keeps running ahead across shard boundaries."""
        paths = [path for task in tasks for path in task.paths]
        ends = list(itertools.accumulate(len(task.paths) for task in tasks))
        pending: dict[int, Prediction] = {}
        current, seen = 0, 0

        def completed():  # the tasks whose every photo has been classified, in order (empty tasks included)
            nonlocal current
            while current < len(tasks) and ends[current] <= seen:
                start = ends[current] - len(tasks[current].paths)
                yield (
                    tasks[current].index,
                    [row_of(pending.pop(i), _sha256(paths[i])) for i in range(start, ends[current])],
                )
                current += 1

        yield from completed()
        for batch in self.predictor.iter_batches(paths):
            pending.update(self.predictor.iter_predictions([batch], paths))
            seen += len(batch.indices) + len(batch.skipped)
            yield from completed()


@dataclasses.dataclass
class PlannedPart:
    """Paths ``start:stop`` of the input list and where their finished rows are kept."""

    index: int
    start: int
    stop: int
    identity: str
    path: Path | None


def _stamp(path: Path) -> str:
    try:
        status = path.stat()
    except OSError:
        return "-"
    return f"{status.st_size}:{status.st_mtime_ns}"


def plan_parts(files: Sequence[Path], settings: str, shard_size: int, folder: Path | None):
    """Cut ``files`` into shards of ``shard_size``, each named by its identity: ``settings`` (what else
    decides the rows: the model file's SHA-256, top-k, the pixel limit, the runtime), then each photo's
    absolute path, size and modification time."""
    parts = []
    for index, start in enumerate(range(0, len(files), shard_size)):
        stop = min(start + shard_size, len(files))
        digest = hashlib.sha256(f"{settings}\n".encode())
        for path in files[start:stop]:
            digest.update(f"{Path(path).absolute()}\0{_stamp(path)}\n".encode("utf-8", "surrogateescape"))
        identity = digest.hexdigest()
        parts.append(
            PlannedPart(index, start, stop, identity, folder / f"{index:07d}-{identity[:16]}.json" if folder else None)
        )
    return parts


#: A part file larger than this per photo is not one this module wrote (a row is a few hundred bytes).
PART_BYTES_PER_PHOTO = 64 * 1024


def _among(target: Path, paths: Sequence[str | Path]) -> bool:
    """Whether ``target`` is the same file as one of ``paths``, however spelled (``..``, links, hard links)."""
    try:
        wanted = target.stat()
    except OSError:  # nothing there yet: no input can be it
        return False
    for path in paths:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), wanted):
                return True
    return False


def _read_part(part: PlannedPart, files: Sequence[Path], classes: Sequence[str]) -> list[dict[str, Any]] | str:
    """The rows of a finished part file, or why it cannot be used (it is untrusted: checked whole)."""
    expected = [str(p) for p in files[part.start : part.stop]]
    try:
        status = part.path.lstat()
        if not stat.S_ISREG(status.st_mode):
            return f"part file {part.path} is not a regular file"
        if status.st_size > PART_BYTES_PER_PHOTO * max(len(expected), 1):
            return f"part file {part.path} is far larger than its rows could be"
        content = json.loads(part.path.read_text(encoding="utf-8", errors="surrogateescape"))
    except (OSError, ValueError, RecursionError) as exc:
        return f"part file {part.path} is unreadable ({type(exc).__name__}; cut short?)"
    rows = content.get("rows") if isinstance(content, dict) else None
    if content.get("identity") != part.identity if isinstance(content, dict) else True:
        return f"part file {part.path} is not this shard's"
    labels = {*classes, UNKNOWN}
    if (
        not isinstance(rows, list)
        or len(rows) != len(expected)
        or not all(_valid_row(row, labels) for row in rows)
        or [row["path"] for row in rows] != expected
    ):
        return f"part file {part.path} does not hold this shard's rows"
    return [{key: row[key] for key in COLUMNS} for row in rows]


def _number_or_none(value) -> bool:
    """None, or a finite number (bare NaN and Infinity are not JSON; 1e400 as an integer overflows a float)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _valid_row(row, labels: set[str]) -> bool:
    """Whether ``row`` (read back from a part file) is a row this module writes, field by field: a
    photo classified (a label of the model's, a score) or skipped (no label, a reason), nothing between."""
    if not (
        isinstance(row, dict)
        and sorted(row) == sorted(COLUMNS)
        and all(isinstance(row[key], str) for key in ("path", "sha256", "label"))
        and _number_or_none(row["score"])
        and _number_or_none(row["familiarity"])
        and isinstance(row["top"], list)
        and all(
            isinstance(pair, list) and len(pair) == 2 and pair[0] in labels and _number_or_none(pair[1])
            for pair in row["top"]
        )
    ):
        return False
    if row["error"] is None:
        return row["label"] in labels and isinstance(row["unknown"], bool) and row["score"] is not None
    return isinstance(row["error"], str) and row["label"] == "" and row["unknown"] is None and row["top"] == []


@dataclasses.dataclass
class PredictReport:
    """What a run did: counts, skipped photos with reasons, shards, where it ran, the output file."""

    images: int
    predicted: int
    unknown: int
    skipped: list[tuple[str, str]]
    shards: int
    shards_resumed: int
    output: Path | None
    seconds: float
    nodes: dict[str, int]
    runtimes: list[str]
    score_kind: str


def _pyarrow():
    """pyarrow (for ``.parquet``), or one clear error saying how to install it."""
    try:
        import pyarrow
    except ImportError:
        raise ConfigError(
            "--output *.parquet needs pyarrow, an optional extra: pip install 'pyimagesearch_tl[parquet]'"
        ) from None
    return pyarrow


def _utf8(text: str | None) -> str | None:
    """``text`` as valid UTF-8 (a file name's undecodable bytes, kept as surrogates, become ``\\xNN``)."""
    return None if text is None else text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Writer:
    """Rows to the output file, shard by shard, in the format its suffix names."""

    def __init__(self, path: Path, handle_path: Path):
        self.suffix = path.suffix.lower()
        self.path = handle_path
        self._parquet = None
        if self.suffix != ".parquet":
            self._handle = handle_path.open("w", newline="", encoding="utf-8", errors="surrogateescape")
            if self.suffix == ".csv":
                import csv

                self._csv = csv.DictWriter(self._handle, COLUMNS)
                self._csv.writeheader()
            else:
                self._handle.write("[")
                self._first = True

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self.suffix == ".csv":
            self._csv.writerows(
                dict(row, top=json.dumps(row["top"]), unknown="" if row["unknown"] is None else row["unknown"])
                for row in rows
            )
        elif self.suffix == ".json":
            for row in rows:
                self._handle.write(("\n" if self._first else ",\n") + json.dumps(row))
                self._first = False
        else:
            self._write_parquet(rows)

    def _write_parquet(self, rows):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                ("path", pa.string()),
                ("sha256", pa.string()),
                ("label", pa.string()),
                ("score", pa.float64()),
                ("unknown", pa.bool_()),
                ("familiarity", pa.float64()),
                ("top", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
                ("error", pa.string()),
            ]
        )
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(str(self.path), schema)
        table = pa.Table.from_pylist(
            [
                dict(
                    row,
                    path=_utf8(row["path"]),
                    error=_utf8(row["error"]),
                    top=[dict(label=name, score=score) for name, score in row["top"]],
                )
                for row in rows
            ],
            schema,
        )
        self._parquet.write_table(table)

    def close(self) -> None:
        if self.suffix == ".parquet":
            if self._parquet is None:
                self._write_parquet([])
            self._parquet.close()
        else:
            if self.suffix == ".json":
                self._handle.write("\n]\n")
            self._handle.close()


def predict_files(model_path: str | Path, inputs: Sequence[str | Path] = (), output=None, **options) -> "PredictReport":
    """``PredictionRun(model_path, inputs, output, **options).execute(...)``: see :class:`PredictionRun`
    (``wait``, ``progress``, ``on_rows`` and ``on_start`` go to :meth:`PredictionRun.execute`)."""
    run_options = {key: options.pop(key) for key in ("wait", "progress", "on_rows", "on_start") if key in options}
    return PredictionRun(model_path, inputs, output, **options).execute(**run_options)


class PredictionRun:
    """Every photo of ``inputs`` (files, folders, glob patterns) and ``file_list``, classified by a model file.

    Everything is checked when the run is made, before any work: the photos found, the engine, the
    output's format and folder, the model file (:attr:`model` is its bundle, or the ONNX file's
    description: ``score_kind``, ``label_names``, ``novelty``).

    Parameters
    ----------
    model_path : path
        A bundle (``train``, ``finetune``) or an ``.onnx`` file (``export``).
    output : path, optional
        ``*.csv``, ``*.parquet`` or ``*.json``: one row per photo (:data:`COLUMNS`), in input order,
        skipped photos included with their reason. Finished shards are kept beside it until the run
        ends, so the same run again resumes an interrupted one; another run on the same file is
        refused (or waited for: ``execute(wait=True)``). Without one, nothing is written.
    engine : {"local", "ray"}
        Where the shards run (see :mod:`pyimagesearch_tl.engines`); the rows are the same.

    Raises
    ------
    ConfigError, DatasetError, BundleError
        No photo given, an unknown engine or format, a model that cannot be opened.
    """

    def __init__(
        self,
        model_path: str | Path,
        inputs: Sequence[str | Path] = (),
        output: str | Path | None = None,
        *,
        file_list: str | Path | None = None,
        engine: str = "local",
        shard_size: int = SHARD_SIZE,
        top_k: int = 3,
        trust_pickle: bool = False,
        batch_size: int = 32,
        max_pixels: int = MAX_PIXELS,
        runtime: str = "auto",
        ray_address: str | None = None,
        ray_cpus_per_worker: int = 1,
    ):
        for name, value in (("shard_size", shard_size), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number, at least 1, got {value!r}")
        engine_class(engine)
        lists = [Path(file_list)] if file_list else []  # the list file: an input too, never to be overwritten
        self.files = expand_paths(inputs) + (read_path_list(file_list) if file_list else [])
        if not self.files:
            given = [*map(str, inputs), *map(str, lists)]
            raise ConfigError(f"no image files found in: {', '.join(given)}" if given else "no image given")
        self.output = Path(output) if output is not None else None
        if self.output is not None:
            if self.output.suffix.lower() not in FORMATS:
                raise ConfigError(f"--output must end in one of {', '.join(FORMATS)}, not {self.output.name!r}")
            if self.output.suffix.lower() == ".parquet":
                _pyarrow()
            if _among(self.output, [*self.files, *lists]):
                raise ConfigError(f"--output {self.output} is one of the inputs: it would be overwritten")
            check_writable(self.output)  # refused now, not after every photo has gone through the network
        model_path = Path(model_path)
        self.job = PredictionJob(
            b"", model_path.suffix, trust_pickle, top_k, batch_size, max_pixels, runtime, len(self.files)
        )
        self.job.source = model_path
        self.model = self.job.describe()  # opened here first: its errors name the file
        try:
            self.job.model = model_path.read_bytes()  # what the workers open, and what names the shards
        except OSError as exc:
            raise BundleError(f"model file {str(model_path)!r}: {describe_os_error(exc)}") from None
        self.engine, self.shard_size = engine, shard_size
        self.engine_options = dict(address=ray_address, cpus_per_worker=ray_cpus_per_worker)

    @classmethod
    def from_config(cls, config, model_path, inputs=(), output=None, **options) -> "PredictionRun":
        """A run with the settings of a :class:`~pyimagesearch_tl.config.Config` (engine, shards, runtime,
        batch size, pixel limit), and ``options`` (``file_list``, ``top_k``, ``trust_pickle``)."""
        return cls(
            model_path,
            inputs,
            output,
            engine=config.engine,
            shard_size=config.shard_size,
            batch_size=config.batch_size,
            max_pixels=config.max_image_pixels,
            runtime=config.runtime,
            ray_address=config.ray_address,
            ray_cpus_per_worker=config.ray_cpus_per_worker,
            **options,
        )

    def execute(
        self,
        wait: bool = False,
        progress: bool = False,
        on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
        on_start: Callable[[Any, int, int], None] | None = None,
    ) -> PredictReport:
        """Run it: ``on_start(engine, resumed, shards)`` once the workers are up (engine None when every
        shard was already done), ``on_rows(rows)`` with each shard's rows as it finishes (in the order
        shards finish)."""
        if self.output is None:
            return self._run(progress, on_rows, on_start)
        with output_lock(self.output, wait):
            return self._run(progress, on_rows, on_start)

    def _run(self, progress, on_rows, on_start) -> PredictReport:
        from tqdm.auto import tqdm

        job, files, output = self.job, self.files, self.output

        started = time.perf_counter()
        folder = output.with_name(f".{output.name}.parts") if output is not None else None
        parts = plan_parts(files, job.settings(), self.shard_size, folder)
        finished: set[int] = set()  # part files checked: read again, one at a time, when the output is written
        if folder is not None:
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise OutputError(f"{folder} is not a folder of part files (a link, or a file): move it away")
            folder.mkdir(parents=True, exist_ok=True)
            for part in parts:
                if part.path.exists() or part.path.is_symlink():
                    rows = _read_part(part, files, self.model.label_names)
                    if isinstance(rows, str):
                        warnings.warn(f"{rows}; its photos are classified again")
                        remove_entry(part.path)
                    else:
                        finished.add(part.index)
        todo = {p.index: p for p in parts if p.index not in finished}
        # Workers get absolute paths (a Ray worker's folder is not this one's); the rows name the photos as given.
        tasks = [ShardTask(p.index, [str(f.absolute()) for f in files[p.start : p.stop]]) for p in todo.values()]
        nodes: collections.Counter = collections.Counter()
        runtimes: list[str] = []
        counts: collections.Counter = collections.Counter()
        skipped: list[tuple[str, str]] = []

        def tally(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                counts["images"] += 1
                if row["error"] is not None:
                    skipped.append((row["path"], row["error"]))
                else:
                    counts["unknown"] += bool(row["unknown"])

        with contextlib.ExitStack() as stack:
            if tasks:
                runner = stack.enter_context(create_engine(self.engine, job, **self.engine_options))
                interrupted = stack.enter_context(interrupt_after_batch())
                if on_start is not None:
                    on_start(runner, len(parts) - len(todo), len(parts))
                done = len(files) - sum(p.stop - p.start for p in todo.values())
                bar = stack.enter_context(tqdm(total=len(files), initial=done, unit="img", disable=not progress))
                for index, rows, node in runner.run(tasks):
                    part = todo[index]
                    for row, given in zip(rows, files[part.start : part.stop]):
                        row["path"] = str(given)
                    if folder is not None:
                        atomic_write_json(part.path, dict(identity=part.identity, rows=rows))
                    else:  # nothing kept: the counts are all the report needs
                        tally(rows)
                    nodes[node] += 1
                    bar.update(part.stop - part.start)
                    if on_rows is not None:
                        on_rows(rows)
                    if interrupted():
                        raise KeyboardInterrupt
                runtimes = runner.runtimes()
            elif on_start is not None:
                on_start(None, len(parts), len(parts))
        if output is not None:  # every part file, in order, one at a time: memory stays one shard's
            with atomic_path(output) as temporary:
                writer = _Writer(output, temporary)
                try:
                    for part in parts:
                        rows = _read_part(part, files, self.model.label_names)
                        if isinstance(rows, str):
                            raise OutputError(f"{rows}: it changed during the run; rerun the same command")
                        tally(rows)
                        writer.write(rows)
                finally:
                    writer.close()
            shutil.rmtree(folder)
        return PredictReport(
            images=counts["images"],
            predicted=counts["images"] - len(skipped),
            unknown=counts["unknown"],
            skipped=skipped,
            shards=len(parts),
            shards_resumed=len(finished),
            output=output,
            seconds=time.perf_counter() - started,
            nodes=dict(nodes),
            runtimes=runtimes,
            score_kind=self.model.score_kind,
        )
