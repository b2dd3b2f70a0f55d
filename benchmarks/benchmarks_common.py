"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Iterator

import click

#: The real photos beside the checkout (see ../shared/datasets/README.md).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def real_photos(data: Path, count: int) -> list[Path]:
    """``count`` real JPEGs, taken round-robin from the class folders below ``data``."""
    folders = sorted({p.parent for p in Path(data).rglob("*.jpg")})
    if not folders:
        raise click.ClickException(f"no JPEG photos under {data}")
    streams = [iter(sorted(f.glob("*.jpg"))) for f in folders]
    photos = [p for p in itertools.chain.from_iterable(itertools.zip_longest(*streams)) if p is not None]
    if len(photos) < count:
        raise click.ClickException(f"only {len(photos)} photos under {data}, asked for {count}")
    return photos[:count]


ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    import subprocess

    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


#: The code a benchmark runs: the commit, and whether the package or benchmark code differed from it, when it started
#: (edits made while it runs are not part of the run).
STARTED_FROM = {
    "commit": _git("rev-parse", "--short", "HEAD"),
    "uncommitted_changes": bool(
        _git("status", "--porcelain", "--untracked-files=no", "--", "pyimagesearch_tl", "benchmarks", "setup.cfg")
    ),
}


def save_results(name: str, figures: dict) -> Path:
    """Write ``figures`` to ``benchmarks/results/<name>.json`` with where they were measured.

    The record holds the commit the run started from (and whether the tree had uncommitted
    changes then), the library versions, the CPU and the date, so a figure in the documentation can
    be traced to its run; ``benchmarks/report.py`` renders the tables of docs/ from these files.
    """
    import datetime
    import json
    import os
    import platform

    from pyimagesearch_tl.bundle import library_versions

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    record = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **STARTED_FROM,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "figures": figures,
    }
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


@contextlib.contextmanager
def pinned_ray_cluster(nodes: list[int]) -> Iterator[str]:
    """A fresh local Ray cluster with ``nodes`` CPUs per node; yields its address.

    Each node's processes are pinned to cores of their own (a node's raylet, and the workers it
    starts, inherit the affinity this process has when the node starts), so a 1-CPU node uses one
    core, as a 1-CPU machine would: Ray itself only counts CPUs, it does not confine a worker's
    threads, and a worker would otherwise spread its decoding onto the idle cores of this machine.
    The driver (this process) runs on the cluster's cores as well, so the run uses those alone.
    """
    from ray.cluster_utils import Cluster

    everything, first, cluster = os.sched_getaffinity(0), 0, None
    try:
        for number, cpus in enumerate(nodes):
            os.sched_setaffinity(0, set(range(first, first + cpus)))
            first += cpus
            if number == 0:
                cluster = Cluster(
                    initialize_head=True,
                    head_node_args=dict(num_cpus=cpus, include_dashboard=False, object_store_memory=200 * 2**20),
                )
            else:
                cluster.add_node(num_cpus=cpus, object_store_memory=200 * 2**20)
        os.sched_setaffinity(0, set(range(first)))  # the driver runs on the cluster's cores too, nowhere else
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        if cluster is not None:
            cluster.shutdown()
        os.sched_setaffinity(0, everything)
