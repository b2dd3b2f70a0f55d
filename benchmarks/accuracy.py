#!/usr/bin/env python
"""Accuracy of the default pipeline on every labelled dataset in ../shared/datasets.

For each dataset: build-dataset (its own splits, or a stratified 75/15/10 split), extract features
with the default backbone, grid-search logistic regression and a linear SVM (5 stratified folds on
the training split), and evaluate on the held-out split (``evaluation``, else ``validation``).
Prints one row per dataset and classifier: classes, train/test sizes, accuracy, ROC AUC (binary)
and wall time (build + extract + train + evaluate).

    python benchmarks/accuracy.py [--data ../shared/datasets] [--backbone efficientnet_lite0] [--work DIR]
        [--precision float32|bfloat16] [--runtime auto|tensorflow|onnxruntime|openvino]
        [--datasets cats_and_dogs_filtered,flowers]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import save_results

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.config import load_config
from pyimagesearch_tl.evaluation import evaluate
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.store import feature_file, has_feature_file, read_features
from pyimagesearch_tl.training import train

DATASETS = ["cats_and_dogs_filtered", "hymenoptera_data", "flowers", "house_rooms"]


@click.command()
@click.option("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"), show_default=True)
@click.option("--backbone", default=None, help="Default: the config's default backbone.")
@click.option("--work", default=None, help="Keep the intermediate files here (default: a temporary folder).")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--runtime", default="auto", show_default=True, help="Where the backbone runs (see runtimes.py).")
@click.option("--datasets", default=",".join(DATASETS), show_default=True, help="Comma-separated subset.")
def main(data, backbone, work, precision, runtime, datasets):
    config = load_config().replace(backbone=backbone, precision=precision, runtime=runtime)
    splits = config.splits
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(work or scratch)
        for name in datasets.split(","):
            source = Path(data) / name
            if not source.is_dir():
                print(f"{name}: not found in {data}, skipped")
                continue
            started = time.perf_counter()
            dataset, features, models = root / name / "dataset", root / name / "features", root / name / "models"
            report = build_dataset(source, dataset, splits=splits, fractions=config.split_fractions, seed=config.seed)
            extract_dataset(
                dataset,
                features,
                splits=splits,
                backbone=config.backbone,
                batch_size=config.batch_size,
                precision=config.precision,
                runtime=config.runtime,
                progress=False,
            )
            prepared = time.perf_counter() - started
            test_split = next(s for s in (splits[2], splits[1]) if has_feature_file(features, s))
            test = read_features(feature_file(features, test_split))
            for result in train(
                features,
                models,
                training_split=splits[0],
                validation_split=splits[1],
                classifier="all",
                cv="5",
                seed=config.seed,
            ):
                metrics = evaluate(Bundle.load(result.path), test, split=test_split)
                rows.append(
                    dict(
                        dataset=name,
                        classes=len(test.meta.label_names),
                        train=sum(report.counts[splits[0]].values()),
                        test=len(test.labels),
                        test_split=test_split,
                        classifier=result.classifier,
                        accuracy=metrics["accuracy"],
                        auc=metrics["roc_auc"],
                        seconds=prepared + result.fit_seconds,
                    )
                )
    print(f"\nbackbone: {config.backbone} ({config.precision}, runtime {config.runtime})")
    print(
        f"{'dataset':<24} {'classes':>7} {'train':>6} {'test':>5} {'test split':<11} {'classifier':<11} "
        f"{'accuracy':>8} {'roc_auc':>7} {'wall s':>7}"
    )
    for r in rows:
        auc = "-" if r["auc"] is None else f"{r['auc']:.4f}"
        print(
            f"{r['dataset']:<24} {r['classes']:>7} {r['train']:>6} {r['test']:>5} {r['test_split']:<11} "
            f"{r['classifier']:<11} {r['accuracy']:>8.4f} {auc:>7} {r['seconds']:>7.1f}"
        )
    variant = "" if (precision, runtime) == ("float32", "auto") and backbone is None else f"-{config.backbone}"
    variant += "" if precision == "float32" else f"-{precision}"
    variant += "" if runtime == "auto" else f"-{runtime}"
    save_results(
        f"accuracy{variant}",
        dict(backbone=config.backbone, precision=config.precision, runtime=config.runtime, cv="5", rows=rows),
    )


if __name__ == "__main__":
    main()
