#!/usr/bin/env python
"""Feature extraction + logistic regression versus two-stage fine-tuning, on real photos, on this CPU.

For each dataset: build the dataset once, then

* **features + logreg**: extract features with the default backbone, grid-search logistic
  regression (5 stratified folds on the training split);
* **fine-tuning**: ``ptl finetune`` with the default settings (new head on the frozen backbone,
  then the last blocks unfrozen), early-stopped on the validation split;

and evaluate both on the same held-out split. Prints accuracy, ROC AUC (binary) or macro F1 and
the wall time of each approach (dataset building excluded: both share it).

hymenoptera_data ships ``train`` and ``val`` only; its ``val`` folder is used as the held-out test
set here, so early stopping never sees it (fine-tuning holds 15% of ``train`` out instead).

    python benchmarks/finetune.py [--datasets hymenoptera_data,flowers] [--work DIR]
        [--head-epochs N] [--finetune-epochs N] [--unfreeze-blocks K] [--augment light]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
from benchmarks_common import SHARED, save_results

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.config import load_config
from pyimagesearch_tl.evaluation import evaluate, features_for
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.finetune import FinetuneSettings, finetune
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.training import train


def source_folder(data: Path, name: str, scratch: Path) -> Path:
    """The dataset as build-dataset should see it: hymenoptera's ``val`` becomes the test split."""
    source = data / name
    if (source / "val").is_dir() and not (source / "test").exists():
        view = scratch / f"{name}_view"
        view.mkdir(parents=True, exist_ok=True)
        for link, target in (("train", source / "train"), ("test", source / "val")):
            if not (view / link).exists():
                os.symlink(target, view / link)
        return view
    return source


def measure(bundle_path: Path, config, split: str, dataset: Path, features: Path) -> dict:
    bundle = Bundle.load(bundle_path)
    test, _ = features_for(bundle, split, features, dataset, config.batch_size)
    return evaluate(bundle, test, split=split)


@click.command()
@click.option("--data", default=str(SHARED), show_default=True)
@click.option("--datasets", default="hymenoptera_data,flowers", show_default=True)
@click.option("--work", default=None, help="Keep the intermediate files here (default: a temporary folder).")
@click.option("--head-epochs", type=int)
@click.option("--finetune-epochs", type=int)
@click.option("--unfreeze-blocks", type=int)
@click.option("--finetune-lr", type=float)
@click.option("--augment", type=click.Choice(["none", "light", "strong"]))
def main(data, datasets, work, **overrides):
    config = load_config().replace(**overrides)
    settings = FinetuneSettings.from_config(config)
    training_split, validation_split, test_split = config.splits
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(work or scratch)
        for name in datasets.split(","):
            if not (Path(data) / name).is_dir():
                print(f"{name}: not found in {data}, skipped")
                continue
            dataset, features, models = root / name / "dataset", root / name / "features", root / name / "models"
            report = build_dataset(
                source_folder(Path(data), name, root),
                dataset,
                splits=config.splits,
                fractions=config.split_fractions,
                seed=config.seed,
            )
            sizes = {split: sum(counts.values()) for split, counts in report.counts.items()}

            started = time.perf_counter()
            extract_dataset(
                dataset,
                features,
                splits=config.splits,
                backbone=config.backbone,
                batch_size=config.batch_size,
                progress=False,
            )
            (result,) = train(
                features,
                models,
                training_split=training_split,
                validation_split=validation_split,
                classifier="logreg",
                cv="5",
                seed=config.seed,
            )
            baseline_seconds = time.perf_counter() - started
            rows.append(
                (
                    name,
                    "features + logreg",
                    sizes,
                    measure(result.path, config, test_split, dataset, features),
                    baseline_seconds,
                    "",
                )
            )

            started = time.perf_counter()
            tuned = finetune(
                dataset,
                root / name / "finetune",
                settings,
                training_split=training_split,
                validation_split=validation_split,
                on_epoch=lambda stage, epoch, logs: print(
                    f"  {name} {stage} epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items())),
                    flush=True,
                ),
            )
            tuned_seconds = time.perf_counter() - started
            stages = tuned.history["stages"]
            detail = (
                f"epochs {'+'.join(str(s['epochs_run']) for s in stages)}, best epoch {tuned.history['best']['epoch']} "
                f"({tuned.history['best']['stage']}), unfroze {','.join(tuned.unfrozen)}"
            )
            rows.append(
                (
                    name,
                    "fine-tuning",
                    sizes,
                    measure(tuned.bundle_path, config, test_split, dataset, features),
                    tuned_seconds,
                    detail,
                )
            )

    print(
        f"\nbackbone {config.backbone}; fine-tuning: head {settings.head_epochs} epochs at {settings.head_lr:g}, "
        f"then {settings.finetune_epochs} at {settings.finetune_lr:g} with the last {settings.unfreeze_blocks} blocks, "
        f"augment {settings.augment}, patience {settings.patience}, batch {settings.batch_size}; {os.cpu_count()} CPUs"
    )
    print(
        f"{'dataset':<18} {'approach':<18} {'train':>5} {'val':>4} {'test':>4} {'accuracy':>8} {'roc_auc':>7} "
        f"{'macro_f1':>8} {'wall s':>7}  notes"
    )
    for name, approach, sizes, metrics, seconds, detail in rows:
        auc = "-" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}"
        print(
            f"{name:<18} {approach:<18} {sizes.get(training_split, 0):>5} {sizes.get(validation_split, 0):>4} "
            f"{metrics['images']:>4} {metrics['accuracy']:>8.4f} {auc:>7} {metrics['macro_f1']:>8.4f} "
            f"{seconds:>7.1f}  {detail}"
        )
    save_results(
        "finetune",
        dict(
            backbone=config.backbone,
            settings={k: v for k, v in vars(settings).items() if k not in ("weights", "backbone")},
            rows=[
                dict(
                    dataset=name,
                    approach=approach,
                    train=sizes.get(training_split, 0),
                    validation=sizes.get(validation_split, 0),
                    test=metrics["images"],
                    accuracy=metrics["accuracy"],
                    roc_auc=metrics["roc_auc"],
                    macro_f1=metrics["macro_f1"],
                    seconds=round(seconds, 1),
                    detail=detail,
                )
                for name, approach, sizes, metrics, seconds, detail in rows
            ],
        ),
    )


if __name__ == "__main__":
    main()
