#!/usr/bin/env python
"""From raw photos to a trained, evaluated model: wall time of every ``ptl`` stage, end to end.

Builds an input folder of N real photos (default 5,000: cats and dogs from cats_and_dogs_filtered,
the rest from the five flower classes, as class folders of symlinks), then runs
``ptl build-dataset``, ``ptl extract``, ``ptl train`` and ``ptl evaluate`` as separate processes,
exactly as a user would, so Python start-up, imports and model building are all counted.

    python benchmarks/bench_end_to_end.py [--images 5000] [--data ../shared/datasets]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, real_photos


def ptl(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()", *args],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise click.ClickException(f"ptl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout


@click.command()
@click.option("--images", default=5000, show_default=True)
@click.option("--data", default=str(SHARED), show_default=True)
def main(images, data):
    data = Path(data)
    pets = min(3000, images * 3 // 5)
    photos = real_photos(data / "cats_and_dogs_filtered", pets) + real_photos(data / "flowers", images - pets)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for i, photo in enumerate(photos):
            link = scratch / "photos" / photo.parent.name / f"{i:05d}_{photo.name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(photo.resolve())
        out = scratch / "output"
        stages = [
            ("build-dataset", ["build-dataset", "--input", str(scratch / "photos"), "--output", str(out / "dataset")]),
            ("extract", ["extract", "--dataset", str(out / "dataset"), "--output", str(out / "features")]),
            ("train", ["train", "--features", str(out / "features"), "--output", str(out / "models")]),
            ("evaluate", ["evaluate", "--model", str(out / "models" / "logreg.joblib"), "--features",
                          str(out / "features"), "--output", str(out / "evaluation")]),
        ]
        total, accuracy = 0.0, None
        print(f"{len(photos)} real photos, {len({p.parent.name for p in photos})} classes")
        for name, args in stages:
            seconds, stdout = ptl(*args)
            total += seconds
            print(f"{name:<14} {seconds:6.1f} s")
            accuracy = next((l for l in stdout.splitlines() if l.startswith("accuracy: ")), accuracy)
        print(f"{'end to end':<14} {total:6.1f} s")
        print(accuracy)


if __name__ == "__main__":
    main()
