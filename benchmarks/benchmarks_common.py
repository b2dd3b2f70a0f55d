"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import itertools
from pathlib import Path

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


def save_results(name: str, figures: dict) -> Path:
    """Write ``figures`` to ``benchmarks/results/<name>.json`` with where they were measured.

    The record holds the commit (and whether the tree had uncommitted changes), the library
    versions, the CPU and the date, so a figure in the README can be traced to its run.
    """
    import datetime
    import json
    import os
    import platform
    import subprocess

    from pyimagesearch_tl.bundle import library_versions

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    record = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "figures": figures,
    }
    path = root / "benchmarks" / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path.relative_to(root)}")
    return path
