#!/usr/bin/env python
"""``ptl predict`` on the Ray engine against the local engine, and its scaling from one node to two.

A logreg bundle is trained on the features of ``--train`` real photos (cats_and_dogs_filtered's
validation photos), then the same ``--images`` other real photos (its training photos) are classified
in each configuration, to a fresh CSV file each time. img/s is the classification itself (shards
decoded, run through the network and the classifier, hashed, written and assembled), counted from the
moment the workers are up (``on_start``), as ``bench_ray.py`` counts extraction:

* local engine, this process, all CPUs;
* ray engine on one 2-CPU node, 2 workers x 1 CPU;
* ray engine on one 1-CPU node, then on two 1-CPU nodes, each node pinned to cores of its own
  (:func:`benchmarks_common.pinned_ray_cluster`).

It prints ``ray predict overhead: R`` (local img/s / ray img/s on one 2-CPU node; goal <= 1.15) and
``ray predict scaling 1->2 nodes: S`` (two 1-CPU nodes / one 1-CPU node; goal >= 1.7), and writes the
figures to ``benchmarks/results/bench_predict.json``.

    python benchmarks/bench_predict.py [--images 1000] [--train 200] [--repeats 3] [--shard-size 64]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, pinned_ray_cluster, real_photos, save_results

DATA = SHARED / "cats_and_dogs_filtered"


def trained_model(photos: list[Path], scratch: Path) -> Path:
    """A logreg bundle trained on the features of ``photos`` (their class folders are the labels)."""
    import pyimagesearch_tl as ptl

    source = scratch / "train-photos"
    for photo in photos:
        target = source / photo.parent.name / photo.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(photo, target)
    dataset = ptl.build_dataset(source, scratch / "dataset", split_fractions=[0.8, 0.2, 0.0])
    model = ptl.train(ptl.extract(dataset, scratch / "features"), scratch / "models", cv="validation")
    return model.path


def classify(model: Path, photos: list[Path], scratch: Path, shard_size: int, **engine) -> tuple[float, float]:
    """(img/s once the workers are up, wall seconds with their start) of one run to a fresh CSV file."""
    from pyimagesearch_tl.bulk_prediction import PredictionRun

    up = []
    started = time.perf_counter()
    output = Path(tempfile.mkdtemp(dir=scratch)) / "labels.csv"
    report = PredictionRun(model, photos, output, shard_size=shard_size, **engine).execute(
        on_start=lambda *_: up.append(time.perf_counter())
    )
    ended = time.perf_counter()
    if report.predicted != len(photos):
        raise click.ClickException(f"{len(report.skipped)} photos skipped, e.g. {report.skipped[:1]}")
    return report.images / (ended - up[0]), ended - started


def on_cluster(nodes, model, photos, scratch, shard_size, repeats) -> tuple[float, float]:
    with pinned_ray_cluster(nodes) as address:
        runs = [classify(model, photos, scratch, shard_size, engine="ray", ray_address=address) for _ in range(repeats)]
    return statistics.median(r for r, _ in runs), statistics.median(w for _, w in runs)


@click.command()
@click.option("--images", default=1000, show_default=True, help="Photos classified in each configuration.")
@click.option("--train", "train_images", default=200, show_default=True, help="Photos the bundle is trained on.")
@click.option("--repeats", default=3, show_default=True, help="Runs of each configuration; the median is reported.")
@click.option(
    "--shard-size",
    default=64,
    show_default=True,
    help="16 shards of 1,000 photos: with 8 (128), one shard more on one worker was 1/8 of the run (scaling 1.53).",
)
def main(images, train_images, repeats, shard_size):
    photos = real_photos(DATA / "train", images)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = trained_model(real_photos(DATA / "validation", train_images), scratch)
        local = [classify(model, photos, scratch, shard_size) for _ in range(repeats)]
        results = {"local, this process, 2 CPUs": tuple(statistics.median(run[i] for run in local) for i in (0, 1))}
        results["ray, one 2-CPU node, 2 workers x 1 CPU"] = on_cluster([2], model, photos, scratch, shard_size, repeats)
        results["ray, one 1-CPU node"] = on_cluster([1], model, photos, scratch, shard_size, repeats)
        results["ray, two 1-CPU nodes"] = on_cluster([1, 1], model, photos, scratch, shard_size, repeats)

    print(
        f"images: {len(photos)} real photos from {DATA / 'train'}, a logreg bundle on EfficientNet-Lite0 features "
        f"of {train_images} others, shard size {shard_size}, median of {repeats} runs"
    )
    for name, (rate, wall) in results.items():
        print(f"{name:<42} {rate:7.1f} img/s   (wall {wall:5.1f} s with the workers' start)")
    overhead = results["local, this process, 2 CPUs"][0] / results["ray, one 2-CPU node, 2 workers x 1 CPU"][0]
    scaling = results["ray, two 1-CPU nodes"][0] / results["ray, one 1-CPU node"][0]
    print(f"ray predict overhead: {overhead:.2f}")
    print(f"ray predict scaling 1->2 nodes: {scaling:.2f}")
    save_results(
        "bench_predict",
        {
            "images": len(photos),
            "train_images": train_images,
            "shard_size": shard_size,
            "repeats": repeats,
            "img_per_s": {name: round(rate, 1) for name, (rate, _) in results.items()},
            "wall_s": {name: round(wall, 1) for name, (_, wall) in results.items()},
            "ray_predict_overhead": round(overhead, 3),
            "ray_predict_scaling_1_to_2_nodes": round(scaling, 3),
        },
    )


if __name__ == "__main__":
    main()
