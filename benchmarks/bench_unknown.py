#!/usr/bin/env python
"""How well "unknown" works: in-distribution photos kept versus out-of-distribution photos rejected.

Trains a cats-vs-dogs model on cats_and_dogs_filtered/train (a stratified 75/15/10 split; the
threshold is calibrated on its validation part to keep 95%), then predicts
* in-distribution photos it never saw: the evaluation part and the 1,000 photos of
  cats_and_dogs_filtered/validation (share kept, and accuracy on the kept ones);
* out-of-distribution photos: every ant and bee photo of hymenoptera_data and every flower photo
  (share answered "unknown"), side by side with a threshold on the top-class probability set to keep
  the same share of the same validation images.

    python benchmarks/bench_unknown.py [--data ../shared/datasets] [--keep 0.95]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.features import FeatureExtractor
from pyimagesearch_tl.images import is_image_name
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.store import read_features
from pyimagesearch_tl.training import train

SPLITS = ["training", "validation", "evaluation"]


def features_of(extractor: FeatureExtractor, paths: list[Path]) -> np.ndarray:
    blocks = [extractor.transform(batch.images) for batch in extractor.iter_batches(paths)]
    return np.concatenate(blocks)


@click.command()
@click.option("--data", default=str(SHARED), show_default=True)
@click.option("--keep", default=0.95, show_default=True)
def main(data, keep):
    data = Path(data)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        build_dataset(
            data / "cats_and_dogs_filtered" / "train",
            scratch / "dataset",
            splits=SPLITS,
            fractions=[0.75, 0.15, 0.10],
            link="symlink",
        )
        extract_dataset(
            scratch / "dataset", scratch / "features", splits=SPLITS, backbone="efficientnet_lite0", progress=False
        )
        [report] = train(
            scratch / "features",
            scratch / "models",
            training_split="training",
            validation_split="validation",
            unknown_keep=keep,
        )
        bundle = Bundle.load(report.path)
        validation = read_features(scratch / "features" / "validation.h5")
        held_out = read_features(scratch / "features" / "evaluation.h5")
    extractor = FeatureExtractor.from_meta(bundle.meta)
    unseen_paths = sorted((data / "cats_and_dogs_filtered" / "validation").glob("*/*.jpg"))
    unseen = features_of(extractor, unseen_paths)
    unseen_labels = np.array([bundle.label_names.index(p.parent.name) for p in unseen_paths])
    strangers = {
        "ants and bees (hymenoptera_data)": sorted(
            p for p in (data / "hymenoptera_data").rglob("*") if is_image_name(p)
        ),
        "flowers": sorted((data / "flowers").glob("*/*.jpg")),
    }

    probability_threshold = np.quantile(bundle.scores(validation.features)[0].max(axis=1), 1 - keep, method="lower")

    def kept(features: np.ndarray) -> tuple[float, float]:
        by_centroid = bundle.novelty.is_known(features).mean()
        by_probability = (bundle.scores(features)[0].max(axis=1) >= probability_threshold).mean()
        return float(by_centroid), float(by_probability)

    print(f"cats-vs-dogs logreg, {len(validation.labels)} validation photos set the thresholds (keep {keep:.0%})")
    print(f"{'photos':<34} {'count':>6} {'centroid similarity':>20} {'top-class probability':>22}")
    rows = []
    for name, features, labels in (
        ("held-out cats and dogs (evaluation)", held_out.features, held_out.labels),
        ("unseen cats and dogs (validation/)", unseen, unseen_labels),
    ):
        centroid, probability = kept(features)
        known = bundle.novelty.is_known(features)
        accuracy = (bundle.scores(features[known])[0].argmax(axis=1) == labels[known]).mean()
        print(
            f"{name:<34} {len(features):>6} {'kept ' + format(centroid, '.3f'):>20} "
            f"{'kept ' + format(probability, '.3f'):>22}"
            f"   accuracy on kept {accuracy:.4f}"
        )
        rows.append(
            dict(
                photos=name,
                count=len(features),
                kept_centroid=centroid,
                kept_probability=probability,
                accuracy_on_kept=float(accuracy),
            )
        )
    for name, paths in strangers.items():
        centroid, probability = kept(features_of(extractor, paths))
        print(
            f"{name:<34} {len(paths):>6} {'unknown ' + format(1 - centroid, '.3f'):>20} "
            f"{'unknown ' + format(1 - probability, '.3f'):>22}"
        )
        rows.append(dict(photos=name, count=len(paths), kept_centroid=centroid, kept_probability=probability))
    save_results(
        "bench_unknown", dict(model="cats-vs-dogs logreg", keep=keep, calibration=len(validation.labels), rows=rows)
    )


if __name__ == "__main__":
    main()
