#!/usr/bin/env python
"""``ptl build-dataset`` on every shared photo: this process's threads, and the Ray engine from one node to two.

Every photo below ``../shared/datasets`` (each dataset's class folders as classes of one input folder
of links) is decoded once (a reduced JPEG scale) and hashed, then linked into a fresh dataset folder
(``--link symlink``, so the copy does not dominate). img/s is the whole build:

* local engine: this process, a thread per CPU;
* ray engine on one 1-CPU node, then on two 1-CPU nodes, each pinned to a core of its own
  (:func:`benchmarks_common.pinned_ray_cluster`), the checks in shards of ``--shard-size`` photos.

It prints ``build-dataset local: X img/s`` and ``ray build scaling 1->2 nodes: S``, and writes the figures
to ``benchmarks/results/bench_build.json``. The manifests of all runs are compared: they must be equal.

    python benchmarks/bench_build.py [--repeats 2] [--shard-size 512]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, pinned_ray_cluster, save_results


def photo_folder(target: Path) -> int:
    """``target/<dataset>_<class>/<file>`` links to every shared JPEG; returns how many."""
    count = 0
    for photo in sorted(SHARED.rglob("*.jpg")):
        dataset = photo.relative_to(SHARED).parts[0]
        link = target / f"{dataset}_{photo.parent.name}" / f"{count:06d}_{photo.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(photo, link)
        count += 1
    return count


def build(source: Path, scratch: Path, shard_size: int, **engine) -> tuple[float, str]:
    """(seconds, manifest text) of one build into a fresh folder."""
    from pyimagesearch_tl.layouts import build_dataset

    output = Path(tempfile.mkdtemp(dir=scratch)) / "dataset"
    started = time.perf_counter()
    build_dataset(source, output, splits=["training", "validation", "evaluation"], fractions=[0.8, 0.1, 0.1],
                  link="symlink", shard_size=shard_size, **engine)  # fmt: skip
    return time.perf_counter() - started, (output / "manifest.csv").read_text()


@click.command()
@click.option("--repeats", default=2, show_default=True, help="Runs of each configuration; the median is reported.")
@click.option("--shard-size", default=512, show_default=True)
def main(repeats, shard_size):
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        photos = photo_folder(scratch / "photos")
        runs, manifests = {}, set()
        local = [build(scratch / "photos", scratch, shard_size) for _ in range(repeats)]
        runs["local, this process, 2 CPUs"] = local
        for name, nodes in (("ray, one 1-CPU node", [1]), ("ray, two 1-CPU nodes", [1, 1])):
            with pinned_ray_cluster(nodes) as address:
                runs[name] = [
                    build(scratch / "photos", scratch, shard_size, engine="ray", ray_address=address)
                    for _ in range(repeats)
                ]
        rates = {}
        for name, results in runs.items():
            manifests |= {text for _, text in results}
            rates[name] = photos / statistics.median(seconds for seconds, _ in results)
    if len(manifests) != 1:
        raise click.ClickException("the builds wrote different manifests")
    print(f"photos: {photos} (every JPEG under {SHARED}), shard size {shard_size}, median of {repeats} runs")
    for name, rate in rates.items():
        print(f"{name:<32} {rate:7.1f} img/s")
    scaling = rates["ray, two 1-CPU nodes"] / rates["ray, one 1-CPU node"]
    print(f"build-dataset local: {rates['local, this process, 2 CPUs']:.1f} img/s")
    print(f"ray build scaling 1->2 nodes: {scaling:.2f}")
    save_results(
        "bench_build",
        dict(
            photos=photos,
            shard_size=shard_size,
            repeats=repeats,
            img_per_s={name: round(rate, 1) for name, rate in rates.items()},
            ray_build_scaling_1_to_2_nodes=round(scaling, 3),
        ),  # fmt: skip
    )


if __name__ == "__main__":
    main()
