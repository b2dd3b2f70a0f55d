#!/usr/bin/env python
"""Peak memory (RSS) of extraction on N and 3N real photos, and of out-of-core training.

Each measurement runs ``ptl`` in a fresh child process that reports its own peak RSS, so one
stage's memory never hides another's.

* ``ptl extract`` on N and on 3N real photos (default N = 300): the peak should not grow with N,
  since decoding keeps a bounded number of batches in flight and features go to disk batch by batch.
* ``ptl train --classifier sgd --streaming`` on a 25,088-wide feature file (VGG16 ``flatten``
  width) of R and 2R rows (default R = 4,000: 383 MiB of features, as large as the memory target
  itself): the peak should not grow with R. (It was 431 MiB while the "unknown" detector was the
  centroid; the default Mahalanobis + energy detector learns from a sample of at most 32 MiB of rows,
  projected on 256 principal directions at this width, and the peak is about 680 MiB.)

    python benchmarks/bench_memory.py [--images 300] [--rows 4000] [--data DIR]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, real_photos, save_results


def peak_rss_mib(*ptl_args: str) -> float:
    """Run ``ptl ARGS`` in a child process; return its peak resident memory in MiB."""
    code = (
        "import resource, sys\n"
        "from pyimagesearch_tl.cli import cli\n"
        "try:\n"
        "    cli.main(sys.argv[1:], prog_name='ptl')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "else:\n"
        "    code = 0\n"
        "print(f'PEAK_RSS_KIB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *ptl_args], capture_output=True, text=True)
    if result.returncode != 0:
        raise click.ClickException(f"ptl {' '.join(ptl_args)} failed:\n{result.stdout}\n{result.stderr}")
    line = [text for text in result.stderr.splitlines() if text.startswith("PEAK_RSS_KIB=")][-1]
    return int(line.split("=")[1]) / 1024


def photo_dataset(data: Path, count: int, target: Path) -> Path:
    """A dataset folder (class folders of symlinks, one split) of ``count`` real photos."""
    for i, photo in enumerate(real_photos(data, count)):
        link = target / "training" / photo.parent.name / f"{i:05d}_{photo.name}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(photo.resolve())
    return target


def wide_feature_file(folder: Path, rows: int, width: int, seed: int) -> Path:
    """``training.h5`` and ``validation.h5`` of ``width`` ReLU-like features, written in blocks."""
    from pyimagesearch_tl.store import FeatureMeta, HDF5FeatureWriter

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, size=(2, width)).astype(np.float32)
    meta = FeatureMeta(
        backbone="vgg16",
        weights="imagenet",
        pooling="flatten",
        input_size=224,
        preprocessing="caffe",
        decoder="bench",
        feature_dim=width,
        dtype="float32",
        label_names=("food", "non_food"),
    )
    for split, count in (("training", rows), ("validation", max(rows // 10, 100))):
        writer = HDF5FeatureWriter(folder / f"{split}.h5", meta, "bench", chunk_rows=256)
        for start in range(0, count, 256):
            n = min(256, count - start)
            labels = rng.integers(0, 2, n)
            values = np.maximum(centres[labels] + rng.normal(0, 2, size=(n, width)), 0).astype(np.float32)
            writer.append(values, labels, [f"{start + i}.jpg" for i in range(n)], ["0" * 64] * n, [])
        writer.finish()
    return folder


@click.command()
@click.option("--images", default=300, show_default=True, help="N: extraction is measured on N and 3N photos.")
@click.option("--rows", default=4000, show_default=True, help="R: streaming training is measured on R and 2R rows.")
@click.option("--width", default=25088, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered"), show_default=True)
def main(images, rows, width, data):
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        extract = {}
        for n in (images, 3 * images):
            dataset = photo_dataset(Path(data), n, scratch / f"photos_{n}")
            extract[n] = peak_rss_mib("extract", "--dataset", str(dataset), "--output", str(scratch / f"features_{n}"))
            print(f"extract peak RSS, {n} images: {extract[n]:.0f} MiB")
        print(f"extract peak RSS ratio 3N/N: {extract[3 * images] / extract[images]:.3f}")

        stream = {}
        for r in (rows, 2 * rows):
            features = wide_feature_file(scratch / f"wide_{r}", r, width, seed=r)
            size = (features / "training.h5").stat().st_size / 2**20
            stream[r] = peak_rss_mib(
                "train",
                "--features",
                str(features),
                "--output",
                str(scratch / f"models_{r}"),
                "--classifier",
                "sgd",
                "--streaming",
            )
            print(f"streaming sgd peak RSS, {r} x {width} ({size:.0f} MiB file): {stream[r]:.0f} MiB")
        print(f"streaming sgd peak RSS ratio 2R/R: {stream[2 * rows] / stream[rows]:.3f}")
    save_results(
        "bench_memory",
        dict(
            extract_peak_mib={str(n): round(v) for n, v in extract.items()},
            extract_ratio_3n_n=round(extract[3 * images] / extract[images], 3),
            width=width,
            streaming_peak_mib={str(r): round(v) for r, v in stream.items()},
            streaming_ratio_2r_r=round(stream[2 * rows] / stream[rows], 3),
        ),
    )


if __name__ == "__main__":
    main()
