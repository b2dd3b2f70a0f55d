#!/usr/bin/env python
"""How well ``ptl audit`` finds planted near-duplicates and flipped labels on real photos, and what it costs.

On ``cats_and_dogs_filtered`` (2000 training, 1000 validation photos): 50 training photos are planted
into the validation split as four copies each (half size, JPEG quality 40, 10% crop, as they are), and
5% of the training labels are flipped (seeded). The script prints the recall of the planted pairs
and the share of reported leak pairs that were not planted, the precision and recall of the flipped
labels among the training split's label issues, what the audit reports on the unmodified data, where
it puts ``house_rooms``' label issues along the file order, and the audit's time and peak memory on
the largest feature file (the modified cats_and_dogs, 3200 rows).

    python benchmarks/bench_audit.py [--data ../shared/datasets]
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results

from pyimagesearch_tl import api
from pyimagesearch_tl.audit import edited_copies


def planted_copies(photo, folder, stem):
    """The photo as the audit's calibration edits it (half size, JPEG quality 40, 10% crop), and as it is."""
    for kind, copy in zip(("half", "q40", "crop"), edited_copies(photo)):
        (folder / f"{stem}_{kind}.jpg").write_bytes(copy.getvalue())
    shutil.copy(photo, folder / f"{stem}_orig.jpg")
    return [f"{stem}_{kind}.jpg" for kind in ("half", "q40", "crop", "orig")]


def audit_rows(source: Path, work: Path, **build) -> tuple[list[dict], dict, float, float]:
    dataset = api.build_dataset(source, work / "dataset", **build)
    features = api.extract(dataset, work / "features")
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = api.audit(features, dataset, work / "audit")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del before
    return report.rows, report.summary, seconds, peak


@click.command()
@click.option("--data", default=str(SHARED), show_default=True)
def main(data):
    data, rng = Path(data), np.random.default_rng(7)
    figures = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # unmodified cats_and_dogs
        rows, summary, _, _ = audit_rows(data / "cats_and_dogs_filtered", scratch / "clean")
        figures["unmodified cats_and_dogs"] = {k: sum(v.values()) for k, v in summary["counts"].items()}
        figures["unmodified label issues"] = [(r["split"], r["path"], r["label"], r["suggested_label"], r["score"])
                                              for r in rows if r["kind"] == "label"][:20]  # fmt: skip
        # planted copies and flipped labels
        source = scratch / "modified"
        train = {c: sorted((data / "cats_and_dogs_filtered" / "train" / c).glob("*.jpg")) for c in ("cats", "dogs")}
        every = [(c, p) for c, paths in train.items() for p in paths]
        flipped = {every[i][1].name for i in rng.choice(len(every), size=len(every) // 20, replace=False)}
        for label, paths in train.items():
            other = "dogs" if label == "cats" else "cats"
            for p in paths:
                target = source / "train" / (other if p.name in flipped else label)
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, target)
        shutil.copytree(data / "cats_and_dogs_filtered" / "validation", source / "validation")
        planted = {}
        clean = [(c, p) for c, p in every if p.name not in flipped]
        for label, photo in [clean[i] for i in rng.choice(len(clean), size=50, replace=False)]:
            for name in planted_copies(photo, source / "validation" / label, f"planted_{photo.stem}"):
                planted[name] = photo.name
        rows, summary, seconds, peak = audit_rows(source, scratch / "modified_run")
        leaks = {(r["path"].split("/")[-1], r["partner_path"].split("/")[-1]) for r in rows if r["kind"] == "leak"}
        found = leaks & set(planted.items())
        issues = {r["path"].split("/")[-1] for r in rows if r["kind"] == "label" and r["split"] == "training"}
        figures["planted"] = dict(
            pairs=len(planted),
            recall=len(found) / len(planted),
            reported_leak_pairs=len(leaks),
            unplanted_share=(len(leaks) - len(found)) / max(1, len(leaks)),
            unplanted=sorted(leaks - set(planted.items())),
            missed=sorted(set(planted.items()) - leaks),
            threshold=summary["duplicate_threshold"],
            pixel_threshold=summary["pixel_threshold"],
            calibration=summary["duplicate_calibration"],
        )
        figures["flipped"] = dict(
            flipped=len(flipped),
            reported=len(issues),
            precision=len(issues & flipped) / max(1, len(issues)),
            recall=len(issues & flipped) / len(flipped),
        )
        figures["cost"] = dict(
            rows=sum(summary["images"].values()), seconds=round(seconds, 1), peak_rss_mib=round(peak)
        )
        # house_rooms: where the label issues fall along the file order
        rows, summary, _, _ = audit_rows(data / "house_rooms", scratch / "rooms")
        order = sorted(
            (int("".join(ch for ch in Path(r["path"]).stem if ch.isdigit()) or 0), r["split"])
            for r in rows if r["kind"] == "label"
        )  # fmt: skip
        figures["house_rooms label issues by file number"] = [n for n, _ in order]
    for name, value in figures.items():
        print(f"{name}: {value}")
    save_results("bench_audit", figures)


if __name__ == "__main__":
    main()
