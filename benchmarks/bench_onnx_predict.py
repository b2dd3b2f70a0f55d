#!/usr/bin/env python
"""``ptl predict`` of one photo with an exported ``.onnx`` against the same with its bundle: start-up and memory.

Each run is a fresh ``ptl predict --model M PHOTO`` process, as a user starts it: the wall time from
start to exit and its peak resident memory (``ru_maxrss`` of that process alone, from ``wait4``). The
bundle rebuilds its backbone in TensorFlow (and runs it in the runtime ``auto`` picks); the ``.onnx``
runs in ONNX Runtime without importing TensorFlow or scikit-learn. One unmeasured run of each first
(caches warm, the bundle's runtime verdict stored), then ``--repeats`` measured runs each, alternated;
the figures are medians. Both must print the same label for the photo.

    python benchmarks/bench_onnx_predict.py --model output/models/logreg.skops [--onnx logreg.onnx] [--repeats 5]

Without ``--onnx`` the bundle is exported first (``ptl export``) into a temporary folder.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, real_photos, save_results

PTL = [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()"]


def timed_run(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one ``ptl`` process."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen([*PTL, *args], stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)  # this process's own rusage (Popen.wait would discard it)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if process.returncode:
            raise click.ClickException(f"ptl {' '.join(args)} failed:\n{stderr.read()}")
        return seconds, usage.ru_maxrss / 1024, stdout.read()


def label_of(stdout: str) -> str:
    """The label ``ptl predict`` printed for the one photo (``path<TAB>label<TAB>...``)."""
    return stdout.splitlines()[0].split("\t")[1]


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False), help="A bundle.")
@click.option("--onnx", type=click.Path(exists=True, dir_okay=False), help="Its export (default: exported now).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered" / "validation"), show_default=True)
def main(model, onnx, repeats, data):
    photo = str(real_photos(Path(data), 1)[0])
    with tempfile.TemporaryDirectory() as scratch:
        if onnx is None:
            onnx = str(Path(scratch) / "model.onnx")
            subprocess.run([*PTL, "export", "--model", model, "--output", onnx], check=True, capture_output=True)
        models = {"bundle": model, "onnx": onnx}
        runs: dict[str, list[tuple[float, float]]] = {kind: [] for kind in models}
        labels = {kind: label_of(timed_run(["predict", "--model", path, photo])[2]) for kind, path in models.items()}
        if labels["bundle"] != labels["onnx"]:
            raise click.ClickException(f"the two predict different labels: {labels}")
        for _ in range(repeats):
            for kind, path in models.items():
                seconds, rss, _ = timed_run(["predict", "--model", path, photo])
                runs[kind].append((seconds, rss))
    figures = {
        kind: {
            "seconds": round(statistics.median(s for s, _ in runs[kind]), 2),
            "peak_rss_mib": round(statistics.median(r for _, r in runs[kind])),
        }
        for kind in models
    }
    figures.update(
        label=labels["onnx"],
        repeats=repeats,
        seconds_ratio=round(figures["bundle"]["seconds"] / figures["onnx"]["seconds"], 1),
        rss_ratio=round(figures["bundle"]["peak_rss_mib"] / figures["onnx"]["peak_rss_mib"], 1),
    )
    for kind in models:
        print(f"{kind:<7} {figures[kind]['seconds']:>6.2f} s  peak RSS {figures[kind]['peak_rss_mib']:>5} MiB")
    print(
        f"bundle / onnx: {figures['seconds_ratio']}x the time, {figures['rss_ratio']}x the memory "
        f"(same label: {labels['onnx']})"
    )
    save_results("bench_onnx_predict", figures)


if __name__ == "__main__":
    main()
