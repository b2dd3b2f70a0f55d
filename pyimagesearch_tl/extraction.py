"""Extracting a dataset: manifest rows -> shards -> an engine -> shard files -> ``<split>.h5``.

For each split:

1. If the finished feature file has the same fingerprint (same settings, same images by content),
   there is nothing to do. When that holds for every split, no engine starts (no backbone is built,
   TensorFlow is not even imported): see :func:`up_to_date_without_backbone`.
2. Rows whose content hash is in the finished file of the same settings are reused, not recomputed
   (images added later are the only ones extracted).
3. The rows are cut into shards of ``shard_size`` consecutive rows. A shard's identity is the
   feature meta plus the rows it must compute; a shard file of that identity is finished work, so a
   rerun after a crash, a Ctrl-C or a killed driver never recomputes it.
4. The engine (:mod:`pyimagesearch_tl.engines`: this process, or a Ray cluster) extracts the
   missing shards; this process writes each shard file as its result arrives.
5. The shards and the reused rows are assembled, in manifest order, into ``<split>.h5`` (or
   ``.csv``); the shard files are then removed.

The whole run holds the output folder's lock (:mod:`pyimagesearch_tl.locks`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import quantization
from .atomic import atomic_write_csv, remove_entry
from .engines import Engine, ShardTask, create_engine, engine_class
from .errors import DatasetError, FeatureFileError
from .features import ExtractionJob, dataset_rows, interrupt_after_batch, layout_meta
from .images import MAX_PIXELS
from .locks import locks_output
from .runtimes import requested_runtime
from .store import (
    FORMATS,
    SHARD_SIZE,
    SHARDS,
    FeatureMeta,
    Shard,
    read_fingerprint,
    read_meta,
    read_sha256,
    read_shard,
    read_skipped,
    remove_feature_files,
    row_reader,
    write_shard,
)


@dataclasses.dataclass
class SplitReport:
    split: str
    path: Path
    extracted: int
    skipped: list[tuple[str, str]]
    reused: int = 0
    shards: int = 0  # shards with images to compute
    shards_resumed: int = 0  # of those, finished by an earlier run
    up_to_date: bool = False
    seconds: float = 0.0
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # shards computed per worker node
    runtimes: list[str] = dataclasses.field(default_factory=list)  # where the backbone ran (see runtimes.py)
    quality: str = ""  # a reduced precision's quality-gate figures (JSON; see quantization.py)

    @property
    def images_per_second(self) -> float:
        return self.extracted / self.seconds if self.seconds else 0.0


def fingerprint(meta: FeatureMeta, rows: Sequence[dict[str, str]]) -> str:
    """Identity of one extraction: the feature meta plus the ordered (path, label, content) list."""
    attrs = dict(meta.to_attrs(), quality="")  # the gate's figures describe the features, not what they are
    digest = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode())
    for row in rows:
        digest.update(f"{row['path']}\0{row['label']}\0{row['sha256']}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


@dataclasses.dataclass
class PlannedShard:
    """Rows ``start:stop`` of a split; ``fresh`` are the row numbers among them that need the backbone."""

    index: int
    start: int
    stop: int
    fresh: list[int]
    identity: str
    path: Path


def plan_shards(
    rows: Sequence[dict[str, str]], meta: FeatureMeta, reusable: set[str], shard_size: int, shard_dir: Path
) -> list[PlannedShard]:
    """Cut ``rows`` into shards of ``shard_size`` consecutive rows, each named by its identity."""
    shards = []
    for index, start in enumerate(range(0, len(rows), shard_size)):
        stop = min(start + shard_size, len(rows))
        fresh = [i for i in range(start, stop) if rows[i]["sha256"] not in reusable]
        identity = fingerprint(meta, [rows[i] for i in fresh])
        shards.append(PlannedShard(index, start, stop, fresh, identity, shard_dir / f"{index:06d}-{identity[:16]}.h5"))
    return shards


def _unusable_shard(planned: PlannedShard, meta: FeatureMeta) -> str | None:
    """Why the shard file of ``planned`` cannot be used (None when it can): unreadable, or not what it should hold."""
    try:
        if read_shard(planned.path, planned.identity, meta, len(planned.fresh)) is None:
            return f"shard file {planned.path} is unreadable (cut short?)"
    except FeatureFileError as exc:
        return str(exc)
    return None


def settings_meta(options: dict) -> FeatureMeta:
    """The meta a :class:`~pyimagesearch_tl.features.FeatureExtractor` of ``options`` records, with
    ``feature_dim`` 0: all of it that is known without building the backbone.

    The rest is a function of the backbone's architecture, so two metas equal but for ``feature_dim``
    describe the same features. The requested runtime is checked as the extractor checks it.
    """
    requested_runtime(options["runtime"], options["precision"])
    names = ("backbone", "weights", "pooling", "dtype", "label_names", "precision", "views", "resize")
    meta = layout_meta(**{name: options[name] for name in names}, input_size=None)
    network = options.get("network")
    return dataclasses.replace(meta, network_sha256=hashlib.sha256(network).hexdigest()) if network else meta


def same_features(a: FeatureMeta, b: FeatureMeta) -> bool:
    """Whether metas ``a`` and ``b`` describe the same features (a quality gate's figures aside)."""
    return dataclasses.replace(a, quality="") == dataclasses.replace(b, quality="")


def up_to_date_without_backbone(
    output_dir: Path,
    by_split: dict[str, list[dict[str, str]]],
    splits: Sequence[str],
    feature_format: str,
    options: dict,
) -> bool:
    """Whether the finished feature file of every split in ``splits`` is already the one the extractor of
    ``options`` would make from these rows, found without building the backbone (nor importing
    TensorFlow, nor starting an engine): its meta is :func:`settings_meta`'s but for ``feature_dim``,
    and its fingerprint is that of its meta and the rows. :func:`extract_split` would then find every
    split up to date."""
    known = None
    for split in splits:
        path = output_dir / f"{split}{FORMATS.get(feature_format).suffix}"
        try:
            stored = read_meta(path)
        except Exception:  # none yet, unreadable or foreign: the engine's way decides
            return False
        known = known or settings_meta(options)  # once there is a file to compare it with (it hashes a weights file)
        if not same_features(dataclasses.replace(stored, feature_dim=0), known):
            return False
        if read_fingerprint(path) != fingerprint(stored, by_split[split]):
            return False
    return True


def _previous_index(path: Path, meta: FeatureMeta) -> dict[str, int]:
    """Row numbers by content hash in an earlier finished file of the same meta (empty if none)."""
    if not path.exists():
        return {}
    try:
        if not same_features(read_meta(path), meta):
            return {}
        return {sha: row for row, sha in enumerate(read_sha256(path)) if sha}
    except Exception:  # an unreadable or foreign file is simply not reused
        return {}


def extract_split(
    engine: Engine,
    dataset_dir: Path,
    rows: Sequence[dict[str, str]],
    split: str,
    output_dir: Path,
    feature_format: str = "hdf5",
    shard_size: int = SHARD_SIZE,
    chunk_rows: int = 32,
    progress: bool = True,
    interrupted: Callable[[], bool] = lambda: False,
) -> SplitReport:
    """Extract one split into ``output_dir/<split>.<h5|csv>`` on ``engine``, resuming or reusing where possible.

    Undecodable images are skipped and listed in the feature file and in ``<split>.skipped.csv``.
    ``interrupted`` is asked after each shard; when it says so, the run stops with the finished
    shards kept (``KeyboardInterrupt``).
    """
    from tqdm.auto import tqdm

    meta = engine.meta
    path = output_dir / f"{split}{FORMATS.get(feature_format).suffix}"
    identity = fingerprint(meta, rows)
    remove_feature_files(output_dir, split, keep=feature_format)  # one format per split, and only files of ours
    if read_fingerprint(path) == identity:
        return SplitReport(split, path, extracted=0, skipped=read_skipped(path), up_to_date=True, quality=meta.quality)
    started = time.perf_counter()
    previous = _previous_index(path, meta)
    shard_dir = output_dir / SHARDS / split
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(rows, meta, set(previous), shard_size, shard_dir)
    working = [s for s in shards if s.fresh]
    todo = {}
    for planned in working:
        problem = _unusable_shard(planned, meta) if planned.path.exists() else None
        if problem:
            warnings.warn(f"{problem}; its images are extracted again")
            remove_entry(planned.path)
        if not planned.path.exists():
            todo[planned.index] = planned

    dataset_dir = Path(dataset_dir).absolute()
    tasks = [ShardTask(s.index, [str(dataset_dir / rows[i]["path"]) for i in s.fresh]) for s in todo.values()]
    nodes: collections.Counter = collections.Counter()
    extracted = 0
    done_rows = len(rows) - sum(s.stop - s.start for s in todo.values())
    with tqdm(total=len(rows), initial=done_rows, desc=split, unit="img", disable=not progress) as bar:
        for index, shard, node in engine.run(tasks):
            write_shard(todo[index].path, todo[index].identity, shard)
            extracted += len(shard.positions)
            nodes[node] += 1
            bar.update(todo[index].stop - todo[index].start)
            if interrupted():
                raise KeyboardInterrupt

    reused = _assemble(path, meta, identity, rows, shards, previous, feature_format, chunk_rows)
    shutil.rmtree(shard_dir)
    with contextlib.suppress(OSError):
        shard_dir.parent.rmdir()  # .shards, once no split has shards left
    skipped_rows = read_skipped(path)
    atomic_write_csv(
        output_dir / f"{split}.skipped.csv", ["path", "reason"], [dict(path=p, reason=r) for p, r in skipped_rows]
    )
    return SplitReport(
        split,
        path,
        extracted,
        skipped_rows,
        reused,
        shards=len(working),
        shards_resumed=len(working) - len(todo),
        seconds=time.perf_counter() - started,
        nodes=dict(nodes),
        runtimes=engine.runtimes() if todo else [],
        quality=meta.quality,
    )


def _assemble(
    path: Path,
    meta: FeatureMeta,
    identity: str,
    rows: Sequence[dict[str, str]],
    shards: Sequence[PlannedShard],
    previous: dict[str, int],
    feature_format: str,
    chunk_rows: int,
) -> int:
    """Write the finished feature file from the shard files and the reused rows; return how many were reused."""
    label_index = {name: i for i, name in enumerate(meta.label_names)}
    empty = Shard(np.zeros((0, meta.feature_dim), np.float32), np.zeros(0, np.int64), [])
    reused = 0
    writer = FORMATS.get(feature_format).writer(path, meta, identity, chunk_rows=chunk_rows)
    with contextlib.ExitStack() as stack:
        stack.callback(writer.close)
        read_previous = stack.enter_context(row_reader(path)) if previous else None
        for planned in shards:
            shard = read_shard(planned.path, planned.identity, meta, len(planned.fresh)) if planned.fresh else empty
            if shard is None:  # checked before extracting: only a file changed under a running extraction
                raise FeatureFileError(f"shard file {planned.path} changed during the extraction; rerun extract")
            vectors = {planned.fresh[p]: v for p, v in zip(shard.positions, shard.features)}
            fresh = set(planned.fresh)
            old = [i for i in range(planned.start, planned.stop) if i not in fresh]
            if old:
                vectors.update(zip(old, read_previous([previous[rows[i]["sha256"]] for i in old])))
                reused += len(old)
            kept = sorted(vectors)
            writer.append(
                features=np.stack([vectors[i] for i in kept]) if kept else empty.features,
                labels=np.array([label_index[rows[i]["label"]] for i in kept], dtype=np.int64),
                paths=[rows[i]["path"] for i in kept],
                sha256=[rows[i]["sha256"] for i in kept],
                skipped=[(rows[planned.fresh[p]]["path"], reason) for p, reason in sorted(shard.skipped)],
            )
        writer.finish()
    return reused


@locks_output("output_dir")
def extract_dataset(
    dataset_dir: str | Path,
    output_dir: str | Path,
    *,
    splits: Sequence[str],
    backbone: str,
    weights: str = "imagenet",
    pooling: str = "avg",
    feature_format: str = "hdf5",
    dtype: str = "float32",
    precision: str = "float32",
    batch_size: int = 32,
    max_pixels: int = MAX_PIXELS,
    runtime: str = "auto",
    views: int = 1,
    resize: str | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_cpus_per_worker: int = 1,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
    on_split=None,
    on_engine=None,
) -> list[SplitReport]:
    """Extract every configured split of ``dataset_dir`` into ``output_dir``.

    The class names of the whole dataset, sorted, are recorded in every feature file (its label
    indices point into them): no separate label-encoder file, nothing pickled. ``engine`` names where
    the shards run (see :mod:`pyimagesearch_tl.engines`); the output is the same either way.
    ``on_engine(engine)`` is called once the workers are up (none start when every split is up to
    date), ``on_split(report)`` after each split.
    Another run on ``output_dir`` makes this one fail at once (or wait, with ``wait=True``).
    """
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    by_split = dataset_rows(dataset_dir)
    present = [s for s in splits if by_split.get(s)]
    if not present:
        raise DatasetError(
            f"dataset {dataset_dir} has none of the configured splits ({', '.join(splits)}); "
            f"it has: {', '.join(by_split)}"
        )
    for split in splits:  # a split the dataset no longer has: its old features must not be read as current
        if split not in present:
            for stale in remove_feature_files(output_dir, split):
                warnings.warn(f"removed {stale}: dataset {dataset_dir} has no {split!r} split any more")
    label_names = sorted({row["label"] for rows in by_split.values() for row in rows})
    extractor_options = dict(
        backbone=backbone,
        weights=weights,
        pooling=pooling,
        batch_size=batch_size,
        max_pixels=max_pixels,
        dtype=dtype,
        precision=precision,
        runtime=runtime,
        views=views,
        resize=resize,
        label_names=label_names,
        job_images=sum(len(by_split[split]) for split in present),  # all of them: a few new ones may convert, once
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    engine_class(engine)  # an unknown name is an error even with nothing to do
    if precision == "int8":  # the folder's own network when it was made for this calibration: no backbone built
        layout = settings_meta(extractor_options)
        calibration, key = quantization.calibration(dataset_dir, by_split, present, layout, max_pixels)
        extractor_options["network"] = quantization.network(output_dir, calibration, key, extractor_options)
    else:  # an int8 network left by an earlier run would be read as this run's
        for name in (quantization.NETWORK_FILE, quantization.NETWORK_RECORD):
            (output_dir / name).unlink(missing_ok=True)
    if up_to_date_without_backbone(output_dir, by_split, present, feature_format, extractor_options):
        for split in present:  # as extract_split does for a split that is up to date
            remove_feature_files(output_dir, split, keep=feature_format)
            path = output_dir / f"{split}{FORMATS.get(feature_format).suffix}"
            reports.append(SplitReport(split, path, extracted=0, skipped=read_skipped(path), up_to_date=True))
            if on_split is not None:
                on_split(reports[-1])
        return reports
    if precision != "float32":  # the quality gate, before any work is handed out
        calibrated = len(calibration) if precision == "int8" else None
        extractor_options["quality"] = quantization.gate(dataset_dir, by_split, present, extractor_options, calibrated)
    with (
        create_engine(
            engine, ExtractionJob(extractor_options), address=ray_address, cpus_per_worker=ray_cpus_per_worker
        ) as runner,
        interrupt_after_batch() as interrupted,
    ):
        if on_engine is not None:
            on_engine(runner)
        for split in present:
            report = extract_split(
                runner,
                dataset_dir,
                by_split[split],
                split,
                output_dir,
                feature_format,
                shard_size,
                batch_size,
                progress,
                interrupted,
            )
            reports.append(report)
            if on_split is not None:
                on_split(report)
    return reports
