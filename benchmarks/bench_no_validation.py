#!/usr/bin/env python
"""'Unknown' on a dataset with train/test lists only (as Food-101 and Oxford Pets ship): the kept share.

Flowers (5 classes) cut into a training split and a test split, no validation split, over several
seeded random splits. For every detector, the share of the test photos the model keeps as known
(the goal is the configured 95%) when the threshold is calibrated

* on the training rows themselves (what training did before cross-fitting), and
* on cross-fitted training rows (``training.cross_fitted_detector``, what ``ptl train`` does now).

Features are extracted once (EfficientNet-Lite0) into ``output/bench_no_validation/``.

    python benchmarks/bench_no_validation.py [--per-class 300] [--train-share 0.5] [--splits 3]
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results

ROOT = Path(__file__).resolve().parents[1]


@click.command()
@click.option("--per-class", default=300, show_default=True, help="Photos of each flower class.")
@click.option("--train-share", default=0.5, show_default=True)
@click.option("--splits", default=3, show_default=True, help="Seeded random train/test splits.")
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
    results = {kind: {"training rows": [], "cross-fitted": []} for kind in list_detectors()}
    for seed in range(splits):
        train, test = train_test_split(
            np.arange(len(every.labels)), train_size=train_share, stratify=every.labels, random_state=seed
        )
        X, y, X_test = every.features[train], every.labels[train], every.features[test]
        classifier = make_pipeline(get_classifier("logreg"), seed, None).set_params(clf__C=0.1).fit(X, y)
        bundle = Bundle(classifier, LabelEncoder().fit(names), every.meta, "logreg")
        train_set = type(every)(X, y, [], [], every.meta)
        for kind in list_detectors():
            logits = bundle.logits(X)
            before = fit_detector(kind, X, y, len(names), logits, X, logits)  # calibrated on its own rows
            after = cross_fitted_detector(kind, bundle, train_set, classifier, 0.95, seed, "training")
            for name, detector in (("training rows", before), ("cross-fitted", after)):
                results[kind][name].append(float(detector.is_known(X_test, bundle.logits(X_test)).mean()))
    print(
        f"{len(names)} flower classes, {len(every.labels)} photos, {train_share:.0%} training / rest test, "
        f"{splits} seeded splits; kept share of the test photos (goal 0.95), mean (lowest)"
    )
    print(f"{'detector':<22} {'calibrated on training rows':>28} {'cross-fitted':>16}")
    for kind, by in results.items():
        cells = [f"{np.mean(v):.3f} ({min(v):.3f})" for v in by.values()]
        print(f"{kind:<22} {cells[0]:>28} {cells[1]:>16}")
    save_results(
        "bench_no_validation",
        dict(
            photos=len(every.labels),
            train_share=train_share,
            splits=splits,
            kept={kind: {k: [round(x, 4) for x in v] for k, v in by.items()} for kind, by in results.items()},
        ),
    )


if __name__ == "__main__":
    main()
