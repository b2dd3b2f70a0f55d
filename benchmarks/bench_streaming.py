#!/usr/bin/env python
"""Training at scale: ``train --streaming`` on a 1,000,000-row feature file.

Real features first: the flowers photos of ``../shared/datasets`` built and extracted with the
default backbone (or ``--features DIR`` holding ``training.h5``, ``validation.h5`` and
``evaluation.h5``). The training file is then grown to R rows: real training rows drawn at random,
each with small Gaussian noise (0.1 of each feature's standard deviation), written block by block;
the validation and evaluation files stay the real ones.

Each training run is a fresh child process reporting its wall time and peak RSS:

* streaming on R/4 and R rows with 1 epoch, and on R rows with 2 epochs: the peak RSS ratio R vs R/4
  (flat: about 1), and seconds per epoch at R rows (the 2-epoch run minus the 1-epoch run);
* the in-memory fits of the same classifier (``sgd``, the same grid) and of the default ``logreg`` on a
  seeded subsample of the big file (``--subsample`` rows) as the accuracy references.

Both are scored on the real evaluation photos (never seen, no noise).

    python benchmarks/bench_streaming.py [--rows 1000000] [--subsample 20000] [--features DIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results

CHILD = """
import json, sys, time
from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.store import read_features
from pyimagesearch_tl.training import train, train_streaming

features, output, mode, epochs, evaluation = sys.argv[1:6]
start = time.perf_counter()
if mode == "streaming":
    report = train_streaming(features, output, training_split="training", validation_split="validation",
                             classifier="sgd", epochs=int(epochs))
else:
    [report] = train(features, output, training_split="training", validation_split="validation",
                     classifier=mode.split(":")[1], cv="validation")
seconds = time.perf_counter() - start
test = read_features(evaluation)
scores, _ = Bundle.load(report.path).scores(test.features)
# VmHWM, not ru_maxrss: that one keeps the parent's high-water mark across fork and exec
peak_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
print(json.dumps(dict(seconds=seconds, peak_mib=peak_kib / 1024,
                      accuracy=float((scores.argmax(1) == test.labels).mean()))))
"""


def child(features: Path, output: Path, mode: str, epochs: int, evaluation: Path) -> dict:
    """One training run in a fresh process: its seconds, peak RSS (MiB) and evaluation accuracy."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(features), str(output), mode, str(epochs), str(evaluation)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise click.ClickException(f"{mode} training failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def real_features(scratch: Path) -> Path:
    """The flowers photos, built into three splits and extracted with the default backbone."""
    import pyimagesearch_tl as ptl

    dataset = ptl.build_dataset(SHARED / "flowers", scratch / "dataset", split_fractions=[0.7, 0.15, 0.15]).path
    ptl.extract(dataset, scratch / "features")
    return scratch / "features"


def grown(source: Path, target: Path, rows: int, seed: int = 0) -> Path:
    """``source``'s feature folder with its training file grown to ``rows`` noisy copies of real rows."""
    from pyimagesearch_tl.store import HDF5FeatureWriter, read_features

    target.mkdir(parents=True)
    for split in ("validation", "evaluation"):
        (target / f"{split}.h5").symlink_to((source / f"{split}.h5").resolve())
    real = read_features(source / "training.h5")
    rng, spread = np.random.default_rng(seed), real.features.std(axis=0) * 0.1
    writer = HDF5FeatureWriter(target / "training.h5", real.meta, f"grown-{rows}", chunk_rows=1024)
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        picked = rng.integers(0, len(real.labels), n)
        values = real.features[picked] + rng.normal(size=(n, real.features.shape[1])) * spread
        paths, digests = [f"grown/{start + i}.jpg" for i in range(n)], [f"{start + i:064x}" for i in range(n)]
        writer.append(values.astype(np.float32), real.labels[picked], paths, digests, [])
    writer.finish()
    return target


def subsample(source: Path, target: Path, rows: int, seed: int = 1) -> Path:
    """``source``'s feature folder with a seeded ``rows``-row sample of its (grown) training file."""
    import h5py

    from pyimagesearch_tl.store import HDF5FeatureWriter, read_meta

    target.mkdir(parents=True)
    for split in ("validation", "evaluation"):
        (target / f"{split}.h5").symlink_to((source / f"{split}.h5").resolve())
    with h5py.File(source / "training.h5", "r") as f:
        total = len(f["labels"])
        picked = np.sort(np.random.default_rng(seed).choice(total, rows, replace=False))
        values, labels = f["features"][picked], f["labels"][picked]
    writer = HDF5FeatureWriter(target / "training.h5", read_meta(source / "training.h5"), "sample", chunk_rows=1024)
    writer.append(values, labels, [f"grown/{i}.jpg" for i in picked], [f"{i:064x}" for i in picked], [])
    writer.finish()
    return target


@click.command()
@click.option("--rows", default=1_000_000, show_default=True, help="R: rows of the grown training file.")
@click.option("--subsample", "sample_rows", default=20_000, show_default=True, help="Rows of the in-memory fit.")
@click.option("--features", "features_dir", help="A feature folder with training, validation and evaluation .h5.")
def main(rows, sample_rows, features_dir):
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1] / "output") as scratch:
        scratch = Path(scratch)
        source = Path(features_dir) if features_dir else real_features(scratch)
        evaluation = source / "evaluation.h5"
        quarter, full = grown(source, scratch / "quarter", rows // 4), grown(source, scratch / "full", rows)
        size_gib = (full / "training.h5").stat().st_size / 2**30
        print(f"grown training file: {rows} rows, {size_gib:.2f} GiB")
        runs = {
            "quarter_1": child(quarter, scratch / "m_q1", "streaming", 1, evaluation),
            "full_1": child(full, scratch / "m_f1", "streaming", 1, evaluation),
            "full_2": child(full, scratch / "m_f2", "streaming", 2, evaluation),
        }
        sample = subsample(full, scratch / "sample", sample_rows)
        for classifier in ("sgd", "logreg"):
            runs[f"in_memory_{classifier}"] = child(
                sample, scratch / f"m_{classifier}", f"memory:{classifier}", 0, evaluation
            )
        for name, run in runs.items():
            print(f"{name}: {run['seconds']:.1f} s, peak RSS {run['peak_mib']:.0f} MiB, accuracy {run['accuracy']:.4f}")
        per_epoch = runs["full_2"]["seconds"] - runs["full_1"]["seconds"]
        ratio = runs["full_1"]["peak_mib"] / runs["quarter_1"]["peak_mib"]
        print(f"streaming seconds per epoch at {rows} rows: {per_epoch:.1f}")
        print(f"streaming peak RSS ratio {rows} / {rows // 4} rows: {ratio:.3f}")
        print(
            f"accuracy on the real evaluation photos: streaming (2 epochs) {runs['full_2']['accuracy']:.4f}, "
            f"in memory on {sample_rows} rows: sgd {runs['in_memory_sgd']['accuracy']:.4f}, "
            f"logreg {runs['in_memory_logreg']['accuracy']:.4f}"
        )
    save_results(
        "bench_streaming",
        dict(
            rows=rows,
            file_gib=round(size_gib, 2),
            seconds_per_epoch=round(per_epoch, 1),
            peak_mib={name: round(run["peak_mib"]) for name, run in runs.items()},
            peak_ratio_full_quarter=round(ratio, 3),
            seconds={name: round(run["seconds"], 1) for name, run in runs.items()},
            accuracy_streaming=round(runs["full_2"]["accuracy"], 4),
            accuracy_in_memory_subsample={c: round(runs[f"in_memory_{c}"]["accuracy"], 4) for c in ("sgd", "logreg")},
            subsample_rows=sample_rows,
        ),
    )


if __name__ == "__main__":
    main()
