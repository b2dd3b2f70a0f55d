#!/usr/bin/env python
"""Accuracy of the default pipeline on every labelled dataset in ../shared/datasets.

For each dataset: build-dataset (its own splits, or a stratified 75/15/10 split), extract features
with the default backbone, grid-search logistic regression and a linear SVM (5 stratified folds on
the training split), and evaluate on the held-out split (``evaluation``, else ``validation``).
Prints one row per dataset and classifier: classes, train/test sizes, accuracy, ROC AUC (binary)
and wall time (build + extract + train + evaluate).

    python benchmarks/accuracy.py [--data ../shared/datasets] [--backbone efficientnet_lite0] [--work DIR]
        [--precision float32|bfloat16|int8] [--runtime auto|tensorflow|onnxruntime|openvino]
        [--datasets cats_and_dogs_filtered,flowers]

With ``--precisions``, each dataset is built once and its features are extracted once per
precision (int8: quantized on a seeded sample of its training photos; every reduced precision
passes the quality gate first, see pyimagesearch_tl/quantization.py), then trained and evaluated
as above. Prints, per dataset and classifier, the accuracy and macro F1 of each precision, their
difference from float32's in points (float32 is added when not listed) and the quality gate's
mean cosine and probe agreement; saved as ``accuracy-precision``.

    python benchmarks/accuracy.py --precisions float32,int8,bfloat16 [--datasets hymenoptera_data,flowers]

With ``--recipes``, compares instead the cheap levers on the same photos (logistic regression, 5-fold
grid search): lite0; lite2; lite0 with mirrored views; lite0+lite2 combined; lite0+lite2 combined,
each with mirrored views. Each feature folder is extracted once and reused by every recipe that
needs it; a recipe's wall time is its folders' extraction plus its training and evaluation.

    python benchmarks/accuracy.py --recipes [--datasets hymenoptera_data,flowers]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from benchmarks_common import save_results

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.config import load_config
from pyimagesearch_tl.evaluation import evaluate
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.store import feature_file, has_feature_file, read_features, read_split
from pyimagesearch_tl.training import train

DATASETS = ["cats_and_dogs_filtered", "hymenoptera_data", "flowers", "house_rooms"]
PRECISIONS = ["float32", "bfloat16", "int8"]


@click.command()
@click.option("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"), show_default=True)
@click.option("--backbone", default=None, help="Default: the config's default backbone.")
@click.option("--work", default=None, help="Keep the intermediate files here (default: a temporary folder).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="float32", show_default=True)
@click.option(
    "--precisions",
    default=None,
    help="Comma-separated, e.g. float32,int8,bfloat16: each dataset once per precision, compared with float32.",
)
@click.option("--runtime", default="auto", show_default=True, help="Where the backbone runs (see runtimes.py).")
@click.option(
    "--datasets", default=None, help="Comma-separated subset (default: all; --recipes: hymenoptera, flowers)."
)
@click.option("--recipes", is_flag=True, help="Compare backbones, mirrored views and combined folders instead.")
def main(data, backbone, work, precision, precisions, runtime, datasets, recipes):
    if recipes:
        return compare_recipes(Path(data), work, (datasets or "hymenoptera_data,flowers").split(","), runtime)
    compared = None
    if precisions:
        compared = [p.strip() for p in precisions.split(",") if p.strip()]
        unknown = sorted(set(compared) - set(PRECISIONS))
        if unknown:
            raise click.BadParameter(
                f"{', '.join(unknown)}; choose from {', '.join(PRECISIONS)}", param_hint="--precisions"
            )
        compared = ["float32"] + [p for p in dict.fromkeys(compared) if p != "float32"]  # the reference first
    datasets = datasets or ",".join(DATASETS)
    config = load_config().replace(backbone=backbone, precision=precision, runtime=runtime)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(work or scratch)
        for name in datasets.split(","):
            source = Path(data) / name
            if not source.is_dir():
                print(f"{name}: not found in {data}, skipped")
                continue
            rows += run_dataset(source, root / name, config, compared or [config.precision])
    if compared:
        variant = "" if runtime == "auto" and backbone is None else f"-{config.backbone}"
        variant += "" if runtime == "auto" else f"-{runtime}"
        return compare_precisions(rows, config, compared, variant)
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


def run_dataset(source: Path, root: Path, config, precisions: list[str]) -> list[dict]:
    """Build ``source`` once into ``root``; per precision, extract its features once, then train every classifier
    on them and evaluate each on the held-out split. One row per precision and classifier."""
    splits = config.splits
    started = time.perf_counter()
    dataset = root / "dataset"
    report = build_dataset(source, dataset, splits=splits, fractions=config.split_fractions, seed=config.seed)
    built = time.perf_counter() - started
    rows, folders, best_c = [], {}, None
    for precision in precisions:
        suffix = "" if precision == "float32" else f"-{precision}"
        features, models = root / f"features{suffix}", root / f"models{suffix}"
        started = time.perf_counter()
        extract_dataset(
            dataset,
            features,
            splits=splits,
            backbone=config.backbone,
            batch_size=config.batch_size,
            precision=precision,
            runtime=config.runtime,
            progress=False,
        )
        prepared = built + time.perf_counter() - started
        folders[precision] = features
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
            if precision == "float32" and result.classifier == "logreg":
                best_c = result.best_params["C"]
            rows.append(
                dict(
                    dataset=source.name,
                    precision=precision,
                    classes=len(test.meta.label_names),
                    train=sum(report.counts[splits[0]].values()),
                    test=len(test.labels),
                    test_split=test_split,
                    classifier=result.classifier,
                    accuracy=metrics["accuracy"],
                    macro_f1=metrics["macro_f1"],
                    auc=metrics["roc_auc"],
                    seconds=prepared + result.fit_seconds,
                    quality=json.loads(test.meta.quality) if test.meta.quality else None,
                )
            )
            print(
                f"{source.name}: {precision} {result.classifier}: accuracy {metrics['accuracy']:.4f}, "
                f"macro F1 {metrics['macro_f1']:.4f}",
                flush=True,
            )
    if len(precisions) > 1 and CV_REPEATS:
        paired = paired_cv(folders, [s for s in splits if has_feature_file(folders["float32"], s)], best_c)
        for r in rows:
            r["cv"] = paired.get(r["precision"]) if r["classifier"] == "logreg" else None
    return rows


#: Paired cross-validation of --precisions: repeats of stratified 5-fold over every labelled photo.
CV_REPEATS = 5


def paired_cv(folders: dict[str, Path], splits: list[str], c: float, seed: int = 0) -> dict[str, dict]:
    """Accuracy of every precision in repeated stratified 5-fold cross-validation over all the dataset's
    labelled photos (every split), the same folds for all (standardised features, logistic regression at
    ``c``, float32's grid-search choice), and each one's difference from float32 in points with a 95%
    paired bootstrap interval over photos (each photo's correctness averaged over the repeats). A held-out
    split of 45 photos moves 2.2 points per photo; this uses every photo, several times."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sets = {p: [read_split(folder, s) for s in splits] for p, folder in folders.items()}
    paths = [path for part in sets["float32"] for path in part.paths]
    labels = np.concatenate([part.labels for part in sets["float32"]])
    correct = {}
    for precision, parts in sets.items():
        assert [path for part in parts for path in part.paths] == paths, "the precisions' photos differ"
        features = np.concatenate([part.features for part in parts])
        right = np.zeros(len(labels))
        folds = RepeatedStratifiedKFold(n_splits=5, n_repeats=CV_REPEATS, random_state=seed)
        for train_rows, test_rows in folds.split(features, labels):
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
            model.fit(features[train_rows], labels[train_rows])
            right[test_rows] += model.predict(features[test_rows]) == labels[test_rows]
        correct[precision] = right / CV_REPEATS
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(labels), size=(2000, len(labels)))
    result = {}
    for precision, right in correct.items():
        difference = right - correct["float32"]
        low, high = np.percentile(difference[resamples].mean(axis=1), [2.5, 97.5])
        result[precision] = dict(
            photos=len(labels),
            C=c,
            accuracy=float(right.mean()),
            vs_float32_points=round(100 * float(difference.mean()), 2),
            interval_points=[round(100 * float(low), 2), round(100 * float(high), 2)],
        )
    return result


def compare_precisions(rows: list[dict], config, precisions: list[str], variant: str) -> None:
    """Print each precision's accuracy and macro F1 beside float32's (differences in points) and save them."""
    from pyimagesearch_tl.runtimes import requested_runtime

    runtimes = {p: requested_runtime(config.runtime, p) for p in precisions}  # float32's auto: settled per job
    reference = {(r["dataset"], r["classifier"]): r for r in rows if r["precision"] == "float32"}
    for r in rows:
        base = reference[r["dataset"], r["classifier"]]
        r["accuracy_vs_float32_points"] = round(100 * (r["accuracy"] - base["accuracy"]), 2)
        r["macro_f1_vs_float32_points"] = round(100 * (r["macro_f1"] - base["macro_f1"]), 2)
    print(
        f"\nbackbone: {config.backbone}; runtime {config.runtime}: "
        + ", ".join(f"{p} -> {name}" for p, name in runtimes.items())
        + "; differences against float32 in points (accuracy x 100); quality gate: mean cosine / probe agreement"
    )
    print(
        f"{'dataset':<24} {'classifier':<11} {'test':>5} {'precision':<9} {'accuracy':>8} {'macro F1':>8} "
        f"{'d accuracy':>10} {'d macro F1':>10} {'cosine':>6} {'agree':>6} {'wall s':>7}"
    )
    first = {}  # datasets and classifiers in the order they ran, then each one's precisions in the order given
    for r in rows:
        first.setdefault((r["dataset"], r["classifier"]), len(first))
    order = {p: i for i, p in enumerate(precisions)}
    for r in sorted(rows, key=lambda r: (first[r["dataset"], r["classifier"]], order[r["precision"]])):
        gate = {k: f"{v:.4f}" for k, v in (r["quality"] or {}).items() if k in ("cosine", "agreement")}
        deltas = ["", ""]
        if r["precision"] != "float32":
            deltas = [f"{r[f'{what}_vs_float32_points']:+.2f}" for what in ("accuracy", "macro_f1")]
        print(
            f"{r['dataset']:<24} {r['classifier']:<11} {r['test']:>5} {r['precision']:<9} {r['accuracy']:>8.4f} "
            f"{r['macro_f1']:>8.4f} {deltas[0]:>10} {deltas[1]:>10} {gate.get('cosine', ''):>6} "
            f"{gate.get('agreement', ''):>6} {r['seconds']:>7.1f}"
        )
    summary = {}  # per reduced precision: the differences from float32 over every dataset and classifier
    for precision in precisions[1:]:
        mine = [r for r in rows if r["precision"] == precision]
        if not mine:
            continue
        summary[precision] = {}
        for what in ("accuracy", "macro_f1"):
            points = [r[f"{what}_vs_float32_points"] for r in mine]
            summary[precision][what] = dict(
                mean=round(sum(points) / len(points), 2), min=round(min(points), 2), max=round(max(points), 2)
            )
        accuracy, f1 = summary[precision]["accuracy"], summary[precision]["macro_f1"]
        print(
            f"{precision} vs float32 over {len(mine)} dataset x classifier rows, in points: accuracy "
            f"{accuracy['mean']:+.2f} on average ({accuracy['min']:+.2f} to {accuracy['max']:+.2f}), macro F1 "
            f"{f1['mean']:+.2f} ({f1['min']:+.2f} to {f1['max']:+.2f})"
        )
    cv_rows = [r for r in rows if r.get("cv")]
    if cv_rows:
        print(
            f"\npaired cross-validation ({CV_REPEATS} x stratified 5-fold over every labelled photo, the same folds "
            "for every precision; logistic regression at float32's grid-search C): accuracy, and the difference "
            "from float32 in points with its 95% paired bootstrap interval"
        )
        print(
            f"{'dataset':<24} {'photos':>6} {'C':>7} {'precision':<9} {'accuracy':>8} {'d points':>8} {'interval':>16}"
        )
        for r in sorted(cv_rows, key=lambda r: (first[r["dataset"], r["classifier"]], order[r["precision"]])):
            cv = r["cv"]
            interval = "" if r["precision"] == "float32" else "[{:+.2f}, {:+.2f}]".format(*cv["interval_points"])
            d = "" if r["precision"] == "float32" else f"{cv['vs_float32_points']:+.2f}"
            print(
                f"{r['dataset']:<24} {cv['photos']:>6} {cv['C']:>7g} {r['precision']:<9} {cv['accuracy']:>8.4f} "
                f"{d:>8} {interval:>16}"
            )
    save_results(
        f"accuracy-precision{variant}",
        dict(
            backbone=config.backbone,
            precisions=precisions,
            runtime=config.runtime,
            runtimes=runtimes,
            cv="5",
            summary=summary,
            rows=rows,
        ),
    )


#: Feature folders: (backbone, views).
FOLDERS = {
    "lite0": ("efficientnet_lite0", 1),
    "lite0 mirrored": ("efficientnet_lite0", 2),
    "lite2": ("efficientnet_lite2", 1),
    "lite2 mirrored": ("efficientnet_lite2", 2),
}
#: Recipes: the feature folders whose vectors are combined.
RECIPES = {
    "lite0 (default)": ["lite0"],
    "lite2": ["lite2"],
    "lite0, mirrored views": ["lite0 mirrored"],
    "lite0 + lite2": ["lite0", "lite2"],
    "lite0 + lite2, mirrored views": ["lite0 mirrored", "lite2 mirrored"],
}


def compare_recipes(data: Path, work: str | None, datasets: list[str], runtime: str) -> None:
    config = load_config().replace(runtime=runtime)
    splits = config.splits
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(work or scratch)
        for name in datasets:
            source = data / name
            if not source.is_dir():
                print(f"{name}: not found in {data}, skipped")
                continue
            dataset = root / name / "dataset"
            started = time.perf_counter()
            report = build_dataset(source, dataset, splits=splits, fractions=config.split_fractions, seed=config.seed)
            build_seconds = time.perf_counter() - started
            extract_seconds = {}
            for folder, (backbone, views) in FOLDERS.items():
                started = time.perf_counter()
                extract_dataset(
                    dataset,
                    root / name / folder,
                    splits=splits,
                    backbone=backbone,
                    views=views,
                    batch_size=config.batch_size,
                    runtime=config.runtime,
                    progress=False,
                )
                extract_seconds[folder] = time.perf_counter() - started
                print(f"{name}: extracted {folder} in {extract_seconds[folder]:.1f} s", flush=True)
            folders = {folder: root / name / folder for folder in FOLDERS}
            test_split = next(s for s in (splits[2], splits[1]) if has_feature_file(folders["lite0"], s))
            for recipe, parts in RECIPES.items():
                started = time.perf_counter()
                (result,) = train(
                    [folders[p] for p in parts],
                    root / name / "models" / recipe.replace(" ", "_").replace(",", ""),
                    training_split=splits[0],
                    validation_split=splits[1],
                    classifier="logreg",
                    cv="5",
                    seed=config.seed,
                )
                test = read_split([folders[p] for p in parts], test_split)
                metrics = evaluate(Bundle.load(result.path), test, split=test_split)
                train_seconds = time.perf_counter() - started
                rows.append(
                    dict(
                        dataset=name,
                        recipe=recipe,
                        train=sum(report.counts[splits[0]].values()),
                        test=len(test.labels),
                        test_split=test_split,
                        accuracy=metrics["accuracy"],
                        macro_f1=metrics["macro_f1"],
                        extract_seconds=round(sum(extract_seconds[p] for p in parts), 1),
                        train_seconds=round(train_seconds, 1),
                        seconds=round(build_seconds + sum(extract_seconds[p] for p in parts) + train_seconds, 1),
                    )
                )
                print(f"{name}: {recipe}: accuracy {metrics['accuracy']:.4f} ({rows[-1]['seconds']} s)", flush=True)
    print(
        f"\n{'dataset':<18} {'recipe':<32} {'test':>5} {'accuracy':>8} {'macro F1':>8} {'extract s':>9} {'wall s':>7}"
    )
    for r in rows:
        print(
            f"{r['dataset']:<18} {r['recipe']:<32} {r['test']:>5} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} "
            f"{r['extract_seconds']:>9.1f} {r['seconds']:>7.1f}"
        )
    save_results("accuracy-recipes", dict(classifier="logreg", cv="5", runtime=config.runtime, rows=rows))


if __name__ == "__main__":
    main()
