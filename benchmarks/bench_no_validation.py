#!/usr/bin/env python
"""'Unknown' on a dataset with train/test lists only (as Food-101 and Oxford Pets ship): the kept share.

Flowers (5 classes) cut into a training split and a test split, no validation split, over several
seeded random splits, at each training share (a large and a small training split: with fewer rows than
the 1,280 features, distances depend on the rows a detector learnt from). For every detector, the share
of the test photos the model keeps as known (the goal is the configured 95%) when the threshold is
calibrated

* on the training rows themselves (what training did before held-out calibration),
* on 5-fold cross-fitted rows for every detector (what it did before leave-one-out), and
* as ``ptl train`` does now (``training.cross_fitted_detector``): leave-one-out in closed form where a
  detector has one (Mahalanobis), 5-fold cross-fitting for the others.

Features are extracted once (EfficientNet-Lite0) into ``output/bench_no_validation/``.

    python benchmarks/bench_no_validation.py [--per-class 300] [--train-share 0.5 --train-share 0.15] [--splits 5]
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results

ROOT = Path(__file__).resolve().parents[1]


def five_fold(kind, X, y, classes, classifier, seed):
    """The detector calibrated on 5-fold cross-fitted rows for every part (the method before leave-one-out)."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    from pyimagesearch_tl.bundle import decision_logits
    from pyimagesearch_tl.novelty import make_detector

    detector = make_detector(kind, 0.95)
    held = [np.zeros(len(y)) for _ in detector.components]
    for fitted, rows in StratifiedKFold(5, shuffle=True, random_state=seed).split(X, y):
        model = clone(classifier).fit(X[fitted], y[fitted])
        fold = make_detector(kind, 0.95)
        fold.learn(X[fitted], y[fitted], classes, decision_logits(model, X[fitted]))
        for column, part in zip(held, fold.components):
            column[rows] = part.familiarity(X[rows], decision_logits(model, X[rows]))
    detector.learn(X, y, classes, decision_logits(classifier, X))
    detector.set_threshold(detector.stack(held))
    return detector


@click.command()
@click.option("--per-class", default=300, show_default=True, help="Photos of each flower class.")
@click.option("--train-share", multiple=True, type=float, default=(0.5, 0.15), show_default=True)
@click.option("--splits", default=5, show_default=True, help="Seeded random train/test splits per share.")
def main(per_class, train_share, splits):
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import LabelEncoder

    from pyimagesearch_tl.bundle import Bundle
    from pyimagesearch_tl.classifiers import get_classifier, make_pipeline
    from pyimagesearch_tl.extraction import extract_dataset
    from pyimagesearch_tl.layouts import build_dataset
    from pyimagesearch_tl.novelty import fit_detector, list_detectors
    from pyimagesearch_tl.store import read_split
    from pyimagesearch_tl.training import cross_fitted_detector

    work = ROOT / "output" / "bench_no_validation"
    photos = work / "photos"
    if not photos.exists():
        for folder in sorted(p for p in (SHARED / "flowers").iterdir() if p.is_dir()):
            (photos / folder.name).mkdir(parents=True)
            for photo in sorted(folder.glob("*.jpg"))[:per_class]:
                (photos / folder.name / photo.name).symlink_to(photo)
    splits_names = ["training", "validation", "evaluation"]
    if not (work / "dataset").exists():
        build_dataset(photos, work / "dataset", splits=splits_names, fractions=[1.0, 0.0, 0.0])
    extract_dataset(work / "dataset", work / "features", splits=splits_names, backbone="efficientnet_lite0")
    every = read_split(work / "features", "training")
    names = list(every.meta.label_names)
    methods = ("training rows", "5-fold", "ptl train")
    figures = {}
    for share in train_share:
        results = {kind: {method: [] for method in methods} for kind in list_detectors()}
        for seed in range(splits):
            train, test = train_test_split(
                np.arange(len(every.labels)), train_size=share, stratify=every.labels, random_state=seed
            )
            X, y, X_test = every.features[train], every.labels[train], every.features[test]
            classifier = make_pipeline(get_classifier("logreg"), seed, None).set_params(clf__C=0.1).fit(X, y)
            bundle = Bundle(classifier, LabelEncoder().fit(names), every.meta, "logreg")
            train_set = type(every)(X, y, [], [], every.meta)
            for kind in list_detectors():
                logits = bundle.logits(X)
                detectors = (
                    fit_detector(kind, X, y, len(names), logits, X, logits),  # calibrated on its own rows
                    five_fold(kind, X, y, len(names), classifier, seed),
                    cross_fitted_detector(kind, bundle, train_set, classifier, 0.95, seed, "training"),
                )
                for method, detector in zip(methods, detectors):
                    results[kind][method].append(float(detector.is_known(X_test, bundle.logits(X_test)).mean()))
        print(
            f"{len(names)} flower classes, {len(every.labels)} photos, {share:.0%} training ({len(train)} rows) / "
            f"rest test, {splits} seeded splits; kept share of the test photos (goal 0.95), mean (lowest)"
        )
        print(f"{'detector':<22}" + "".join(f"{method:>18}" for method in methods))
        for kind, by in results.items():
            print(f"{kind:<22}" + "".join(f"{f'{np.mean(v):.3f} ({min(v):.3f})':>18}" for v in by.values()))
        figures[str(share)] = dict(
            training_rows=len(train),
            kept={kind: {k: [round(x, 4) for x in v] for k, v in by.items()} for kind, by in results.items()},
        )
    save_results("bench_no_validation", dict(photos=len(every.labels), splits=splits, shares=figures))


if __name__ == "__main__":
    main()
