#!/usr/bin/env python
"""How well each "unknown" detector keeps in-distribution photos and rejects look-alikes and far photos.

Two models, each logistic regression (``ptl train``'s grid search) on EfficientNet-Lite0 features:

* **near case**: ``flowers`` trained on daisy, dandelion and rose; sunflower and tulip photos are the
  look-alikes it must call unknown; the far photos are cats, dogs, ants and bees.
* **far case**: ``cats_and_dogs_filtered/train`` (cats vs dogs); no look-alikes are shared, the far
  photos are every ant and bee of ``hymenoptera_data`` and every flower.

Each dataset's features are extracted once, then split ``--splits`` times at random (stratified
75% training / 15% validation / 10% evaluation, a new seed each time): a model is trained per split,
every detector of :data:`pyimagesearch_tl.novelty.DETECTORS` is calibrated on the validation part to
keep ``--keep`` and measured on the evaluation part, which no detector saw. One split's evaluation
part is small (259 flowers, 200 pets), so its kept share alone wanders by +-1.5 points; the table
gives the mean over the splits (and the lowest kept share). Per detector: the share of evaluation
photos kept, the share of near and far photos called unknown, and AUROC (evaluation photos against
near, and against far photos; 1.0 separates perfectly).

``--finetune-epochs N`` also fine-tunes Lite0 on the flowers dataset as ``build-dataset`` split it
(N epochs of head, then N with the last blocks unfrozen) and measures every detector on the
fine-tuned features and logits, beside a model on the frozen features of the same split.

    python benchmarks/bench_unknown.py [--data ../shared/datasets] [--keep 0.95] [--splits 5]
                                       [--finetune-epochs 3]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, save_results
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.config import load_config
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.features import FeatureExtractor, dataset_rows, extract_in_memory
from pyimagesearch_tl.finetune import FinetuneSettings, finetune
from pyimagesearch_tl.images import is_image_name
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.novelty import DETECTORS, fit_detector
from pyimagesearch_tl.store import FeatureSet, HDF5FeatureWriter, read_features
from pyimagesearch_tl.training import train

SPLITS = ["training", "validation", "evaluation"]
FRACTIONS = [0.75, 0.15, 0.10]


def features_of(extractor: FeatureExtractor, paths: list[Path]) -> np.ndarray:
    return np.concatenate([extractor.transform(batch.images) for batch in extractor.iter_batches(paths)])


def images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_name(p.name))


def extracted(source: Path, work: Path, classes: list[str] | None = None) -> dict[str, FeatureSet]:
    """``source`` built into a dataset (75/15/10) and its features extracted once, by split."""
    build_dataset(source, work / "dataset", splits=SPLITS, fractions=FRACTIONS, classes=classes or (), link="symlink")
    extract_dataset(work / "dataset", work / "features", splits=SPLITS, backbone="efficientnet_lite0", progress=False)
    return {split: read_features(work / "features" / f"{split}.h5") for split in SPLITS}


def resplit(sets: dict[str, FeatureSet], seed: int, folder: Path) -> dict[str, FeatureSet]:
    """All rows of ``sets`` split again at random (stratified 75/15/10, ``seed``), written as feature files."""
    features = np.concatenate([sets[s].features for s in SPLITS])
    labels = np.concatenate([sets[s].labels for s in SPLITS])
    paths = sum((sets[s].paths for s in SPLITS), [])
    digests = sum((sets[s].sha256 for s in SPLITS), [])
    rows = np.arange(len(labels))
    training, rest = train_test_split(rows, train_size=FRACTIONS[0], stratify=labels, random_state=seed)
    validation, evaluation = train_test_split(rest, train_size=0.6, stratify=labels[rest], random_state=seed)
    folder.mkdir(parents=True)
    split = {}
    for name, chosen in zip(SPLITS, (training, validation, evaluation)):
        meta = sets["training"].meta
        writer = HDF5FeatureWriter(folder / f"{name}.h5", meta, fingerprint=f"{name}, split seed {seed}")
        writer.append(features[chosen], labels[chosen], [paths[i] for i in chosen], [digests[i] for i in chosen], [])
        writer.finish()
        split[name] = read_features(folder / f"{name}.h5")
    return split


def rates(bundle: Bundle, sets: dict, near: np.ndarray | None, far: np.ndarray, keep: float) -> list[dict]:
    """Every detector fitted on ``sets`` (and ``bundle``'s logits), measured on evaluation, near and far."""
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


def over_splits(sets, near, far, keep: float, splits: int, work: Path) -> dict:
    """:func:`rates` on ``splits`` random splits: the mean of each figure, and the lowest kept share."""
    runs = []
    for seed in range(splits):
        split = resplit(sets, seed, work / f"split{seed}")
        [report] = train(work / f"split{seed}", work / f"models{seed}", training_split="training",
                         validation_split="validation")  # fmt: skip
        runs.append(rates(Bundle.load(report.path), split, near, far, keep))
    rows = []
    for per_detector in zip(*runs):
        row = {key: float(np.mean([r[key] for r in per_detector])) for key in per_detector[0] if key != "detector"}
        rows.append(dict(detector=per_detector[0]["detector"], kept_lowest=min(r["kept"] for r in per_detector), **row))
    return dict(evaluation=len(split["evaluation"].labels), near=0 if near is None else len(near), far=len(far),
                splits=splits, rows=rows)  # fmt: skip


def finetuned(work: Path, sets: dict, near_paths, far_paths, keep: float, epochs: int) -> dict:
    """Fine-tune Lite0 on the dataset in ``work`` and measure every detector on its features and logits."""
    config = load_config().replace(backbone="efficientnet_lite0", head_epochs=epochs, finetune_epochs=epochs)
    started = time.perf_counter()
    report = finetune(work / "dataset", work / "finetune", FinetuneSettings.from_config(config))
    seconds = time.perf_counter() - started
    bundle = Bundle.load(report.bundle_path)
    extractor = bundle.feature_extractor()
    manifest = dataset_rows(work / "dataset")
    tuned = {split: extract_in_memory(extractor, work / "dataset", manifest[split])[0] for split in SPLITS}
    near, far = features_of(extractor, near_paths), features_of(extractor, far_paths)
    [frozen] = train(work / "features", work / "models", training_split="training", validation_split="validation")
    frozen_bundle = Bundle.load(frozen.path)
    frozen_near, frozen_far = (features_of(FeatureExtractor("efficientnet_lite0"), p) for p in (near_paths, far_paths))
    accuracy = {
        name: float(np.mean(b.logits(s["evaluation"].features).argmax(axis=1) == s["evaluation"].labels))
        for name, b, s in (("fine-tuned", bundle, tuned), ("frozen", frozen_bundle, sets))
    }
    return dict(
        epochs=f"{epochs}+{epochs}",
        seconds=round(seconds, 1),
        evaluation=len(tuned["evaluation"].labels),
        near=len(near),
        far=len(far),
        accuracy=accuracy,
        finetuned=rates(bundle, tuned, near, far, keep),
        frozen=rates(frozen_bundle, sets, frozen_near, frozen_far, keep),
    )


def show(case: str, result: dict, keep: float) -> None:
    print(f"\n{case} (evaluation {result['evaluation']}, near {result['near']}, far {result['far']}; keep {keep}; "
          f"mean of {result['splits']} splits)")  # fmt: skip
    print(f"{'detector':<20} {'kept':>6} {'lowest':>6} {'near unknown':>12} {'near AUROC':>10} {'far unknown':>11} "
          f"{'far AUROC':>9}")  # fmt: skip
    for r in result["rows"]:
        near = f"{r['near_unknown']:>12.3f} {r['near_auroc']:>10.3f}" if "near_unknown" in r else f"{'-':>12} {'-':>10}"
        print(f"{r['detector']:<20} {r['kept']:>6.3f} {r['kept_lowest']:>6.3f} {near} {r['far_unknown']:>11.3f} "
              f"{r['far_auroc']:>9.3f}")  # fmt: skip


@click.command()
@click.option("--data", default=str(SHARED), show_default=True)
@click.option("--keep", default=0.95, show_default=True)
@click.option("--splits", default=5, show_default=True, help="Random training/validation/evaluation splits.")
@click.option("--finetune-epochs", default=0, show_default=True, help="Also measure a fine-tuned flowers model.")
def main(data, keep, splits, finetune_epochs):
    data = Path(data)
    extractor = FeatureExtractor("efficientnet_lite0")
    results, tuned = {}, None
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        flowers = extracted(data / "flowers", scratch / "flowers", ["daisy", "dandelion", "rose"])
        near_paths = images(data / "flowers" / "sunflower") + images(data / "flowers" / "tulip")
        far_paths = images(data / "cats_and_dogs_filtered" / "validation") + images(data / "hymenoptera_data")
        near, far = features_of(extractor, near_paths), features_of(extractor, far_paths)
        results["near: flowers (daisy, dandelion, rose) vs sunflower, tulip"] = over_splits(
            flowers, near, far, keep, splits, scratch / "flowers"
        )
        pets = extracted(data / "cats_and_dogs_filtered" / "train", scratch / "cats_dogs")
        far = features_of(extractor, images(data / "hymenoptera_data") + images(data / "flowers"))
        results["far: cats vs dogs vs ants, bees, flowers"] = over_splits(
            pets, None, far, keep, splits, scratch / "cats_dogs"
        )
        for case, result in results.items():
            show(case, result, keep)
        save_results("bench_unknown", dict(keep=keep, cases=results, finetuned=None))  # kept if fine-tuning fails
        if finetune_epochs:
            tuned = finetuned(scratch / "flowers", flowers, near_paths, far_paths, keep, finetune_epochs)
    if tuned:
        print(f"\nflowers, fine-tuned {tuned['epochs']} epochs ({tuned['seconds']} s) vs frozen, dataset split; "
              f"accuracy {tuned['accuracy']}")  # fmt: skip
        for which in ("frozen", "finetuned"):
            for r in tuned[which]:
                print(
                    f"{which:<10} {r['detector']:<20} kept {r['kept']:.3f} near {r['near_unknown']:.3f} "
                    f"(AUROC {r['near_auroc']:.3f}) far {r['far_unknown']:.3f} (AUROC {r['far_auroc']:.3f})"
                )
        save_results("bench_unknown", dict(keep=keep, cases=results, finetuned=tuned))


if __name__ == "__main__":
    main()
