#!/usr/bin/env python
"""How well each "unknown" detector keeps in-distribution photos and rejects look-alikes and far photos.

Two models, each logistic regression on EfficientNet-Lite0 features with a stratified 75/15/10 split
(thresholds calibrated on the 15% validation part to keep 95%, rates measured on the 10% evaluation
part, which no detector saw):

* **near case**: ``flowers`` trained on daisy, dandelion and rose; sunflower and tulip photos are the
  look-alikes it must call unknown; the far photos are cats, dogs, ants and bees.
* **far case**: ``cats_and_dogs_filtered/train`` (cats vs dogs); no look-alikes are shared, the far
  photos are every ant and bee of ``hymenoptera_data`` and every flower.

For every detector of :data:`pyimagesearch_tl.novelty.DETECTORS`: the share of the evaluation photos
kept, the share of near and far photos called unknown at that threshold, and AUROC (evaluation photos
against near, and against far photos; 1.0 separates perfectly).

    python benchmarks/bench_unknown.py [--data ../shared/datasets] [--keep 0.95]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results
from sklearn.metrics import roc_auc_score

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.features import FeatureExtractor
from pyimagesearch_tl.images import is_image_name
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.novelty import DETECTORS, fit_detector
from pyimagesearch_tl.store import read_features
from pyimagesearch_tl.training import train

SPLITS = ["training", "validation", "evaluation"]


def features_of(extractor: FeatureExtractor, paths: list[Path]) -> np.ndarray:
    return np.concatenate([extractor.transform(batch.images) for batch in extractor.iter_batches(paths)])


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_name(p.name))


def model_on(source: Path, work: Path, classes: list[str] | None = None):
    build_dataset(source, work / "dataset", splits=SPLITS, fractions=[0.75, 0.15, 0.10], classes=classes or (),
                  link="symlink")  # fmt: skip
    extract_dataset(work / "dataset", work / "features", splits=SPLITS, backbone="efficientnet_lite0", progress=False)
    [report] = train(work / "features", work / "models", training_split="training", validation_split="validation")
    sets = {split: read_features(work / "features" / f"{split}.h5") for split in SPLITS}
    return Bundle.load(report.path), sets


def rates(bundle: Bundle, sets: dict, near: np.ndarray | None, far: np.ndarray, keep: float) -> list[dict]:
    training, validation, evaluation = (sets[s] for s in SPLITS)
    n_classes = len(bundle.label_names)
    rows = []
    for kind in DETECTORS:
        detector = fit_detector(
            kind,
            training.features,
            training.labels,
            n_classes,
            bundle.logits(training.features),
            validation.features,
            bundle.logits(validation.features),
            keep,
            "validation",
        )
        own = detector.familiarity(evaluation.features, bundle.logits(evaluation.features))
        row = dict(detector=kind, kept=float(np.mean(own >= detector.threshold)))
        for name, strangers in (("near", near), ("far", far)):
            if strangers is None:
                continue
            score = detector.familiarity(strangers, bundle.logits(strangers))
            row[f"{name}_unknown"] = float(np.mean(score < detector.threshold))
            truth = np.r_[np.ones(len(own)), np.zeros(len(score))]
            row[f"{name}_auroc"] = float(roc_auc_score(truth, np.r_[own, score]))
        rows.append(row)
    return rows


@click.command()
@click.option("--data", default=str(SHARED), show_default=True)
@click.option("--keep", default=0.95, show_default=True)
def main(data, keep):
    data = Path(data)
    extractor = FeatureExtractor("efficientnet_lite0")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bundle, sets = model_on(data / "flowers", scratch / "flowers", ["daisy", "dandelion", "rose"])
        near = features_of(extractor, images(data / "flowers" / "sunflower") + images(data / "flowers" / "tulip"))
        far = features_of(
            extractor, images(data / "cats_and_dogs_filtered" / "validation") + images(data / "hymenoptera_data")
        )
        rows = rates(bundle, sets, near, far, keep)
        results["near: flowers (daisy, dandelion, rose) vs sunflower, tulip"] = dict(
            evaluation=len(sets["evaluation"].labels), near=len(near), far=len(far), rows=rows
        )
        bundle, sets = model_on(data / "cats_and_dogs_filtered" / "train", scratch / "cats_dogs")
        far = features_of(extractor, images(data / "hymenoptera_data") + images(data / "flowers"))
        results["far: cats vs dogs vs ants, bees, flowers"] = dict(
            evaluation=len(sets["evaluation"].labels), near=0, far=len(far), rows=rates(bundle, sets, None, far, keep)
        )
    for case, result in results.items():
        print(f"\n{case} (evaluation {result['evaluation']}, near {result['near']}, far {result['far']}; keep {keep})")
        print(
            f"{'detector':<16} {'kept':>6} {'near unknown':>12} {'near AUROC':>10} {'far unknown':>11} {'far AUROC':>9}"
        )
        for r in result["rows"]:
            near = (
                f"{r['near_unknown']:>12.3f} {r['near_auroc']:>10.3f}"
                if "near_unknown" in r
                else f"{'-':>12} {'-':>10}"
            )
            print(f"{r['detector']:<16} {r['kept']:>6.3f} {near} {r['far_unknown']:>11.3f} {r['far_auroc']:>9.3f}")
    save_results("bench_unknown", dict(keep=keep, cases=results))


if __name__ == "__main__":
    main()
