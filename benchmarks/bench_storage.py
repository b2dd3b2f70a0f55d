#!/usr/bin/env python
"""Feature storage: write and read the same features as CSV and as HDF5 (float32 and float16).

Uses the product's own writers and readers (``pyimagesearch_tl.store``), batch by batch as
extraction writes them. The features default to 5,000 x 25,088 values (VGG16 with ``flatten``
pooling, as in PyImageSearch's Food-5K tutorial): ReLU-like synthetic values (half zeros), since
storage cost depends on the array's size and the text length of its numbers, not on their meaning;
``--features FILE`` uses a real feature file instead.

    python benchmarks/bench_storage.py [--rows 5000] [--width 25088] [--features output/features/training.h5]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
from benchmarks_common import save_results

from pyimagesearch_tl.store import CSVFeatureWriter, FeatureMeta, HDF5FeatureWriter, read_features


def _meta(width: int, dtype: str) -> FeatureMeta:
    return FeatureMeta(
        backbone="vgg16",
        weights="imagenet",
        pooling="flatten",
        input_size=224,
        preprocessing="caffe",
        decoder="bench",
        feature_dim=width,
        dtype=dtype,
        label_names=("food", "non_food"),
    )


def write(writer_class, path: Path, features: np.ndarray, labels: np.ndarray, dtype: str, batch: int = 32) -> float:
    started = time.perf_counter()
    writer = writer_class(path, _meta(features.shape[1], dtype), "bench", chunk_rows=batch)
    for start in range(0, len(features), batch):
        stop = min(start + batch, len(features))
        writer.append(
            features[start:stop],
            labels[start:stop],
            [f"img_{i}.jpg" for i in range(start, stop)],
            ["0" * 64] * (stop - start),
            [],
        )
    writer.finish()
    return time.perf_counter() - started


@click.command()
@click.option("--rows", default=5000, show_default=True)
@click.option("--width", default=25088, show_default=True)
@click.option("--features", "source", default=None, help="Use the rows of this real feature file instead.")
def main(rows, width, source):
    if source:
        real = read_features(source)
        features, labels = real.features.astype(np.float32), real.labels
        origin = f"real features from {source}"
    else:
        rng = np.random.default_rng(0)
        features = np.maximum(rng.normal(0.0, 1.0, size=(rows, width)), 0).astype(np.float32)
        labels = rng.integers(0, 2, rows)
        origin = "synthetic ReLU-like features"
    print(f"{features.shape[0]} x {features.shape[1]} {origin} ({features.nbytes / 2**20:.0f} MiB as float32)")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, writer_class, suffix, dtype in (
            ("csv", CSVFeatureWriter, ".csv", "float32"),
            ("hdf5 float32", HDF5FeatureWriter, ".h5", "float32"),
            ("hdf5 float16", HDF5FeatureWriter, ".h5", "float16"),
        ):
            path = Path(scratch) / f"{name.replace(' ', '_')}{suffix}"
            seconds_write = write(writer_class, path, features, labels, dtype)
            started = time.perf_counter()
            loaded = read_features(path)
            seconds_read = time.perf_counter() - started
            error = float(np.abs(loaded.features.astype(np.float32) - features).max())
            results[name] = (seconds_write, seconds_read, path.stat().st_size)
            print(
                f"{name:<13} write {seconds_write:7.2f} s  read {seconds_read:7.2f} s  "
                f"size {path.stat().st_size / 2**20:8.1f} MiB  max abs error {error:.2g}"
            )
    csv_write, csv_read, csv_size = results["csv"]
    for name in ("hdf5 float32", "hdf5 float16"):
        seconds_write, seconds_read, size = results[name]
        print(
            f"{name} vs csv: write {csv_write / seconds_write:.1f}x faster, "
            f"read {csv_read / seconds_read:.1f}x faster, "
            f"{csv_size / size:.1f}x smaller"
        )
    save_results(
        "bench_storage",
        dict(
            rows=int(features.shape[0]),
            width=int(features.shape[1]),
            origin=origin,
            formats={
                name: dict(write_s=round(w, 3), read_s=round(r, 3), mib=round(size / 2**20, 1))
                for name, (w, r, size) in results.items()
            },
            write_speedup_hdf5_vs_csv=round(csv_write / results["hdf5 float32"][0], 1),
            read_speedup_hdf5_vs_csv=round(csv_read / results["hdf5 float32"][1], 1),
        ),
    )


if __name__ == "__main__":
    main()
