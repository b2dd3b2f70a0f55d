#!/usr/bin/env python
"""The audit's near-duplicate search past 100,000 rows: exact against approximate (faiss inverted file).

Real features first: the flowers and cats_and_dogs_filtered photos of ``../shared/datasets`` extracted
with the default backbone (or ``--features DIR`` holding ``training.h5``, ... of one or more folders).
For each size N, N unit rows are drawn from them with Gaussian noise that keeps two copies of one
real row below the threshold (a crowd of look-alikes, as a large dataset has), and 1% of the rows get
a planted near-duplicate: a copy whose cosine similarity to its row is drawn uniformly between the
threshold + 0.01 and 0.995. The threshold (``--threshold``) is the one ``ptl audit`` calibrated on the
flowers photos (0.7666 here). Each search runs in a fresh child process reporting its seconds and
peak RSS (VmHWM, the search's rows included):

* approximate: :func:`pyimagesearch_tl.audit.approximate_pairs` on all N rows; the recall of the
  planted pairs, and of the pairs the exact search finds among the pairs of its first rows;
* exact: :func:`pyimagesearch_tl.audit.exact_pairs` on all N rows up to ``--exact-rows`` rows, else
  on the pairs of the first 2,048 rows only, its time scaled to N rows (printed as ``estimated``).

    python benchmarks/bench_audit_scale.py [--sizes 20000,100000,1000000] [--features DIR ...]
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

SAMPLE_ROWS = 2048  # the exact search's first rows, when it does not run on all of them

CHILD = """
import json, sys, time
import numpy as np
from pyimagesearch_tl.audit import approximate_pairs, exact_pairs

data, method, threshold, rows = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
unit = np.load(data)
start = time.perf_counter()
pairs = approximate_pairs(unit, threshold) if method == "approximate" else exact_pairs(unit, threshold, rows or None)
seconds = time.perf_counter() - start
peak_kib = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
print(json.dumps(dict(seconds=seconds, peak_mib=peak_kib / 1024, pairs=[[i, j] for i, j, _ in pairs])))
"""


def child(data: Path, method: str, threshold: float, rows: int = 0) -> dict:
    """One search in a fresh process: its seconds, peak RSS (MiB) and pairs."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), method, str(threshold), str(rows)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise click.ClickException(f"{method} search failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["pairs"] = {tuple(pair) for pair in result["pairs"]}
    return result


def real_features(scratch: Path) -> list[Path]:
    """The flowers and cats_and_dogs_filtered photos, built and extracted with the default backbone."""
    import pyimagesearch_tl as ptl

    folders = []
    for name in ("flowers", "cats_and_dogs_filtered"):
        dataset = ptl.build_dataset(SHARED / name, scratch / name / "dataset", split_fractions=[0.7, 0.15, 0.15]).path
        ptl.extract(dataset, scratch / name / "features")
        folders.append(scratch / name / "features")
    return folders


def unit_rows(folders: list[Path]) -> np.ndarray:
    from pyimagesearch_tl.audit import _unit
    from pyimagesearch_tl.store import read_features

    return _unit(np.concatenate([read_features(f).features for folder in folders for f in sorted(folder.glob("*.h5"))]))


def grown(real: np.ndarray, rows: int, threshold: float, seed: int = 0) -> tuple[np.ndarray, set]:
    """``rows`` unit rows: noisy copies of ``real`` (two copies of one row below ``threshold``) and 1% planted
    near-duplicates; the planted pairs ``(original, copy)``."""
    rng = np.random.default_rng(seed)
    planted_count = rows // 100
    width = real.shape[1]
    # noise of norm s: two copies of one row have a cosine of about 1 / (1 + s^2); keep it 0.05 below the threshold
    spread = np.sqrt(1 / (threshold - 0.05) - 1) / np.sqrt(width)
    background = np.empty((rows - planted_count, width), np.float32)
    for start in range(0, len(background), 65536):
        block = real[rng.integers(0, len(real), min(65536, len(background) - start))]
        noisy = block + rng.normal(size=block.shape).astype(np.float32) * np.float32(spread)
        background[start : start + len(block)] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    originals = rng.choice(len(background), planted_count, replace=False)
    cosines = rng.uniform(threshold + 0.01, 0.995, planted_count).astype(np.float32)
    away = rng.normal(size=(planted_count, width)).astype(np.float32)
    away -= np.sum(away * background[originals], axis=1, keepdims=True) * background[originals]
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    copies = background[originals] * cosines[:, None] + away * np.sqrt(1 - cosines**2)[:, None]
    unit = np.concatenate([background, copies.astype(np.float32)])
    planted = {(int(o), len(background) + k) for k, o in enumerate(originals)}
    return unit, planted


@click.command()
@click.option("--sizes", default="20000,100000,1000000", show_default=True, help="Row counts N, comma-separated.")
@click.option("--threshold", default=0.7666, show_default=True, help="The feature-similarity threshold.")
@click.option("--exact-rows", default=20_000, show_default=True, help="Largest N the exact search runs whole.")
@click.option("--features", "features_dirs", multiple=True, help="Feature folders of real photos (repeatable).")
def main(sizes, threshold, exact_rows, features_dirs):
    figures = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1] / "output") as scratch:
        scratch = Path(scratch)
        real = unit_rows([Path(f) for f in features_dirs] if features_dirs else real_features(scratch))
        print(f"real feature vectors: {len(real)} x {real.shape[1]}, threshold {threshold}")
        for rows in (int(size) for size in sizes.split(",")):
            unit, planted = grown(real, rows, threshold)
            np.save(scratch / "rows.npy", unit)
            del unit
            approximate = child(scratch / "rows.npy", "approximate", threshold)
            whole = rows <= exact_rows
            exact = child(scratch / "rows.npy", "exact", threshold, 0 if whole else SAMPLE_ROWS)
            sampled = approximate["pairs"] if whole else {(i, j) for i, j in approximate["pairs"] if i < SAMPLE_ROWS}
            exact_seconds = exact["seconds"] * (1 if whole else rows / SAMPLE_ROWS)
            figure = dict(
                approximate_seconds=round(approximate["seconds"], 1),
                approximate_peak_mib=round(approximate["peak_mib"]),
                exact_seconds=round(exact_seconds, 1),
                exact_estimated=not whole,
                exact_peak_mib=round(exact["peak_mib"]),
                planted_pairs=len(planted),
                planted_recall_approximate=round(len(planted & approximate["pairs"]) / len(planted), 4),
                exact_pairs_compared=len(exact["pairs"]),
                recall_vs_exact=round(len(exact["pairs"] & sampled) / max(1, len(exact["pairs"])), 4),
            )
            if whole:
                figure["planted_recall_exact"] = round(len(planted & exact["pairs"]) / len(planted), 4)
            figures[str(rows)] = figure
            what = "estimated from its first 2,048 rows" if not whole else "all rows"
            print(
                f"{rows:>9,} rows: approximate {figure['approximate_seconds']} s, "
                f"peak {figure['approximate_peak_mib']} MiB, planted recall {figure['planted_recall_approximate']}, "
                "recall vs exact "
                f"{figure['recall_vs_exact']} ({figure['exact_pairs_compared']} exact pairs); exact "
                f"{figure['exact_seconds']} s ({what}), peak {figure['exact_peak_mib']} MiB"
            )
    save_results("bench_audit_scale", dict(threshold=threshold, real_rows=len(real), sizes=figures))


if __name__ == "__main__":
    main()
