#!/usr/bin/env python
"""The Ray engine against the local engine, and its scaling from one node to two.

On the same real photos (default 1,000 from cats_and_dogs_filtered), EfficientNet-Lite0, each
configuration extracting into a fresh folder; img/s is the extraction itself (shards computed,
written and assembled), after the workers have built their backbones:

* local engine, this process, all CPUs;
* ray engine on one 2-CPU node (a Ray cluster started here): 2 workers x 1 CPU and 1 worker x 2 CPUs;
* ray engine on one 1-CPU node, then on two 1-CPU nodes (1 worker x 1 CPU per node), each node's
  processes pinned to cores of their own and the driver to the cluster's cores, so a 1-CPU node is
  what a 1-CPU machine would be.

It prints ``ray overhead: R`` (local img/s / best ray img/s on one 2-CPU node; goal <= 1.15) and
``scaling 1->2 nodes: S`` (two 1-CPU nodes / one 1-CPU node; goal >= 1.7), and writes the figures
to ``benchmarks/results/bench_ray.json``.

    python benchmarks/bench_ray.py [--images 1000] [--repeats 2] [--shard-size 256]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, pinned_ray_cluster, real_photos, save_results

SPLITS = ["training", "validation", "evaluation"]


def make_dataset(photos: list[Path], root: Path) -> Path:
    """A dataset folder of links to ``photos`` (all in the training split, by class folder)."""
    for photo in photos:
        target = root / "training" / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(photo, target)
    return root


def extract(dataset: Path, scratch: Path, shard_size: int, **engine) -> tuple[float, float]:
    """(img/s of the extraction, wall seconds including the workers' start) of one run into a fresh folder."""
    from pyimagesearch_tl.extraction import extract_dataset

    started = time.perf_counter()
    [report] = extract_dataset(
        dataset,
        Path(tempfile.mkdtemp(dir=scratch)),
        splits=SPLITS,
        backbone="efficientnet_lite0",
        shard_size=shard_size,
        progress=False,
        **engine,
    )
    return report.images_per_second, time.perf_counter() - started


def on_cluster(
    nodes: list[int], dataset: Path, scratch: Path, shard_size: int, repeats: int, cpus_per_worker: int = 1
) -> tuple[float, float]:
    """Median img/s and wall seconds on a fresh local Ray cluster with ``nodes`` CPUs per node
    (see :func:`benchmarks_common.pinned_ray_cluster`)."""
    with pinned_ray_cluster(nodes) as address:
        runs = [
            extract(
                dataset, scratch, shard_size, engine="ray", ray_address=address, ray_cpus_per_worker=cpus_per_worker
            )
            for _ in range(repeats)
        ]
    return statistics.median(r for r, _ in runs), statistics.median(w for _, w in runs)


@click.command()
@click.option("--images", default=1000, show_default=True)
@click.option("--repeats", default=2, show_default=True, help="Runs of each configuration; the median is reported.")
@click.option("--shard-size", default=256, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered" / "train"), show_default=True)
def main(images, repeats, shard_size, data):
    photos = real_photos(Path(data), images)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        dataset = make_dataset(photos, scratch / "dataset")
        local = [extract(dataset, scratch, shard_size, engine="local") for _ in range(repeats)]
        results = {
            "local, this process, 2 CPUs": (
                statistics.median(r for r, _ in local),
                statistics.median(w for _, w in local),
            )
        }
        results["ray, one 2-CPU node, 2 workers x 1 CPU"] = on_cluster([2], dataset, scratch, shard_size, repeats)
        results["ray, one 2-CPU node, 1 worker x 2 CPUs"] = on_cluster([2], dataset, scratch, shard_size, repeats, 2)
        results["ray, one 1-CPU node"] = on_cluster([1], dataset, scratch, shard_size, repeats)
        results["ray, two 1-CPU nodes"] = on_cluster([1, 1], dataset, scratch, shard_size, repeats)

    print(
        f"images: {len(photos)} real photos from {data}, EfficientNet-Lite0, shard size {shard_size}, "
        f"median of {repeats} runs"
    )
    for name, (rate, wall) in results.items():
        print(f"{name:<42} {rate:7.1f} img/s   (wall {wall:5.1f} s with the workers' start)")
    best_ray = max(
        results["ray, one 2-CPU node, 2 workers x 1 CPU"][0], results["ray, one 2-CPU node, 1 worker x 2 CPUs"][0]
    )
    overhead = results["local, this process, 2 CPUs"][0] / best_ray
    scaling = results["ray, two 1-CPU nodes"][0] / results["ray, one 1-CPU node"][0]
    print(f"ray overhead: {overhead:.2f}")
    print(f"scaling 1->2 nodes: {scaling:.2f}")
    save_results(
        "bench_ray",
        {
            "images": len(photos),
            "shard_size": shard_size,
            "repeats": repeats,
            "ray": __import__("ray").__version__,
            "img_per_s": {name: round(rate, 1) for name, (rate, _) in results.items()},
            "wall_s": {name: round(wall, 1) for name, (_, wall) in results.items()},
            "ray_overhead": round(overhead, 3),
            "scaling_1_to_2_nodes": round(scaling, 3),
        },
    )


if __name__ == "__main__":
    main()
