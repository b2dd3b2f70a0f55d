#!/usr/bin/env python
"""From raw photos to a trained, evaluated model: wall time of every ``ptl`` stage, end to end.

Builds an input folder of N real photos (default 5,000: cats and dogs from cats_and_dogs_filtered,
the rest from the five flower classes, as class folders of symlinks), then runs
``ptl build-dataset``, ``ptl extract``, ``ptl train`` and ``ptl evaluate`` as separate processes,
exactly as a user would, so Python start-up, imports and model building are all counted.

Once per runtime (default: ``tensorflow``, the reference, then ``auto``), each in a fresh output
folder and a fresh cache, so ``auto``'s one-off conversion to ONNX and its parity check are counted.

    python benchmarks/bench_end_to_end.py [--images 5000] [--data ../shared/datasets] [--runtimes tensorflow,auto]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, real_photos

from pyimagesearch_tl.bundle import BUNDLE_SUFFIX


def ptl(*args: str, cache: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, XDG_CACHE_HOME=str(cache)),
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise click.ClickException(f"ptl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return seconds, result.stdout


@click.command()
@click.option("--images", default=5000, show_default=True)
@click.option("--data", default=str(SHARED), show_default=True)
@click.option("--runtimes", default="tensorflow,auto", show_default=True, help="Comma-separated, one run each.")
def main(images, data, runtimes):
    from benchmarks_common import save_results

    data = Path(data)
    pets = min(3000, images * 3 // 5)
    photos = real_photos(data / "cats_and_dogs_filtered", pets) + real_photos(data / "flowers", images - pets)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for i, photo in enumerate(photos):
            link = scratch / "photos" / photo.parent.name / f"{i:05d}_{photo.name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(photo.resolve())
        print(f"{len(photos)} real photos, {len({p.parent.name for p in photos})} classes")
        for runtime in runtimes.split(","):
            out, cache = scratch / runtime / "output", scratch / runtime / "cache"
            stages = [
                (
                    "build-dataset",
                    ["build-dataset", "--input", str(scratch / "photos"), "--output", str(out / "dataset")],
                ),
                (
                    "extract",
                    [
                        "extract",
                        "--dataset",
                        str(out / "dataset"),
                        "--output",
                        str(out / "features"),
                        "--runtime",
                        runtime,
                    ],
                ),
                ("train", ["train", "--features", str(out / "features"), "--output", str(out / "models")]),
                (
                    "evaluate",
                    [
                        "evaluate",
                        "--model",
                        str(out / "models" / f"logreg{BUNDLE_SUFFIX}"),
                        "--features",
                        str(out / "features"),
                        "--output",
                        str(out / "evaluation"),
                    ],
                ),
            ]
            seconds, accuracy = {}, None
            for name, args in stages:
                seconds[name], stdout = ptl(*args, cache=cache)
                accuracy = next((line for line in stdout.splitlines() if line.startswith("accuracy: ")), accuracy)
            seconds["end to end"] = sum(seconds.values())
            results[runtime] = dict(
                seconds={k: round(v, 1) for k, v in seconds.items()}, accuracy=float(accuracy.split()[1])
            )
            print(f"--runtime {runtime}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + f"; {accuracy}")
    names = list(results)
    if len(names) > 1:
        ratio = results[names[0]]["seconds"]["end to end"] / results[names[-1]]["seconds"]["end to end"]
        print(f"end-to-end speedup, {names[-1]} vs {names[0]}: {ratio:.2f}")
    save_results("bench_end_to_end", dict(images=len(photos), runtimes=results))


if __name__ == "__main__":
    main()
