"""Shared fixtures: small copies of the real photos in ../shared/datasets, and one extraction reused.

The shared datasets are read-only; every test that changes files works on copies in a temporary
folder. Set PTL_SHARED_DATASETS to point elsewhere.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# NumPy asks the kernel for transparent huge pages on every array of 4 MB or more (madvise): each one then
# faults in, and zeroes, whole 2 MB pages. The suite makes and drops such arrays by the thousand in short
# processes, and on this project's VMs that cost 12% of the CPU time of its scikit-learn-heavy modules
# (four of them: 73.7 s vs 65.0 s, the mean of four alternated runs). Set before NumPy is first imported,
# here and in every process the tests start; results are unchanged (the pages' size is all it changes).
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

import numpy as np  # noqa: E402
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PTL_SHARED_DATASETS", ROOT.parent / "shared" / "datasets"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: ``ptl`` as a user runs it, in this interpreter (whatever PATH holds): a process of its own.
PTL = [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()"]


WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
#: The CPUs this run may use, before a pytest-xdist worker is pinned to its share of them.
ALL_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


def _pin_to_a_share_of_the_cpus() -> bool:
    """Under pytest-xdist, worker ``gwN`` of ``n`` runs on every n-th CPU from the N-th: the workers'
    runtimes (TensorFlow, OpenVINO, ONNX Runtime size their thread pools by the CPUs a process may run
    on) then do not oversubscribe the machine and spin against each other. Whether it was pinned."""
    if not WORKER.startswith("gw") or WORKERS < 2 or len(ALL_CPUS) < WORKERS:
        return False
    os.sched_setaffinity(0, sorted(ALL_CPUS)[int(WORKER[2:]) % WORKERS :: WORKERS])
    return True


PINNED = _pin_to_a_share_of_the_cpus()
if PINNED:
    # NumPy's OpenBLAS sized its thread pool by the CPUs when this module imported it, before the pin: two
    # threads on a one-CPU share spin against each other in every matrix product of the worker. The
    # libraries loaded from now on (SciPy's OpenBLAS, OpenMP, the runtimes) size theirs by the share.
    from threadpoolctl import threadpool_limits

    threadpool_limits(len(os.sched_getaffinity(0)))


def _finished_marker(config, worker: str) -> Path:
    return config._tmp_path_factory.getbasetemp().parent / f"finished-{worker}"


def pytest_sessionfinish(session):
    """A pytest-xdist worker that has run its last test says so (see :func:`pytest_runtest_setup`)."""
    if PINNED:
        _finished_marker(session.config, WORKER).touch()


def pytest_runtest_setup(item):
    """Once every other worker has finished, the last one takes the whole machine: the processes it
    starts from then on (a Ray cluster, a ``ptl`` command) may use the CPUs the others have left idle."""
    global PINNED
    if PINNED and all(_finished_marker(item.config, f"gw{n}").exists() for n in range(WORKERS) if f"gw{n}" != WORKER):
        os.sched_setaffinity(0, ALL_CPUS)
        PINNED = False


@pytest.fixture(scope="module")
def whole_machine():
    """The processes a module starts run on every CPU of the run, not on its worker's share: a Ray
    cluster of two one-CPU nodes must have two CPUs."""
    if not PINNED:
        yield
        return
    share = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CPUS)
    try:
        yield
    finally:
        if PINNED:
            os.sched_setaffinity(0, share)


#: Memory one pytest-xdist worker may take: the largest process of a `make test` run peaked at 3.6 GB.
WORKER_MEMORY = 4 * 2**30


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU (xdist's count), but no more than the available memory holds at
    :data:`WORKER_MEMORY` each; ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set."""
    outcome = yield
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: xdist's count
        return
    outcome.force_result(max(1, min(outcome.get_result(), available // WORKER_MEMORY)))


#: What TensorFlow prints at import (absl, oneDNN, CPU features): nothing of it may reach a user's stderr.
TENSORFLOW_CHATTER = (
    "oneDNN custom operations",
    "absl::InitializeLog",
    "This TensorFlow binary is optimized",
    "cpu_feature_guard",
)


def chatty_env(**overrides: str) -> dict[str, str]:
    """The environment of a user's shell (no ``TF_CPP_MIN_LOG_LEVEL``) with ``TF_ENABLE_ONEDNN_OPTS=1``:
    TensorFlow then prints its oneDNN and absl lines at import on any x86 CPU (by default only AVX-512
    ones do), so a run in it leaks them wherever they are not suppressed."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    return dict(env, **overrides)


def chatter(stderr: str) -> list[str]:
    """The lines of ``stderr`` that TensorFlow printed at import."""
    return [line for line in stderr.splitlines() if any(c in line for c in TENSORFLOW_CHATTER)]


def shared(*parts: str) -> Path:
    """A folder of ../shared/datasets; when it is missing the test fails under CI (``CI`` set: a run
    without the photos must not pass green) and is skipped, with the reason, elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"real photos not available: {path} is missing (set PTL_SHARED_DATASETS)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def copy_subset(source: Path, target: Path, per_folder: int) -> Path:
    """Copy the first ``per_folder`` images of every leaf folder of ``source`` (structure kept)."""
    for folder in sorted(p for p in source.rglob("*") if p.is_dir()) + [source]:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for path in files[:per_folder]:
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, destination)
    return target


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Converted weights and networks go to a cache of this test run, never the user's; the first build
    converts them. pytest-xdist workers share it (as Ray workers share a node's): each conversion once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <run>/popen-gwN: the run's folder is the parent
        root = root.parent
    cache = root / "xdg-cache"
    cache.mkdir(exist_ok=True)
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def cats_dogs(tmp_path_factory) -> Path:
    """15 real photos per class in train/ and validation/ of cats_and_dogs_filtered (60 in all)."""
    return copy_subset(shared("cats_and_dogs_filtered"), tmp_path_factory.mktemp("cats_dogs"), 15)


@pytest.fixture(scope="session")
def default_network(isolated_cache) -> Path:
    """The default backbone's network converted and checked in the session cache, as a user's first large
    job leaves it: the ``ptl`` processes the tests start then run it without importing TensorFlow (the
    path through TensorFlow is taken where a test's own cache lacks the network)."""
    from pyimagesearch_tl.features import FeatureExtractor
    from pyimagesearch_tl.images import load_image

    photos = sorted(shared("hymenoptera_data", "train", "ants").glob("*.jpg"))[:4]
    extractor = FeatureExtractor("efficientnet_lite0")  # a job of unknown size: auto converts the network
    extractor.transform(np.stack([load_image(p, extractor.input_size) for p in photos]))
    return extractor.network_file(convert=False)


@pytest.fixture(scope="session")
def pipeline_run(cats_dogs, tmp_path_factory, default_network) -> dict[str, Path]:
    """build-dataset + extract with the default (offline, pretrained) backbone, shared by many tests."""
    from pyimagesearch_tl.extraction import extract_dataset
    from pyimagesearch_tl.layouts import build_dataset

    work = tmp_path_factory.mktemp("pipeline")
    splits = ["training", "validation", "evaluation"]
    build_dataset(cats_dogs, work / "dataset", splits=splits, fractions=[0.75, 0.15, 0.10])
    extract_dataset(
        work / "dataset", work / "features", splits=splits, backbone="efficientnet_lite0", batch_size=16, progress=False
    )
    return {"work": work, "dataset": work / "dataset", "features": work / "features"}
