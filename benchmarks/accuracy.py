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

With ``--resizes``, the same for the ways an image meets the square input (squash, centre crop at the
backbone's crop share, letterbox; ``crop:1.0`` is a centre crop keeping another share of the shorter side),
each against squash (the mode of files made before resize modes existed); saved as ``accuracy-resize``.

    python benchmarks/accuracy.py --resizes squash,crop,crop:1.0,letterbox

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
from pyimagesearch_tl.images import Resize
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.store import feature_file, has_feature_file, read_features, read_split
from pyimagesearch_tl.training import train

DATASETS = ["cats_and_dogs_filtered", "hymenoptera_data", "flowers", "house_rooms"]
PRECISIONS = ["float32", "bfloat16", "int8"]
RESIZES = ["squash", "crop", "letterbox"]


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
@click.option(
    "--resizes",
    default=None,
    help="Comma-separated, e.g. squash,crop,letterbox: each dataset once per resize mode, compared with squash.",
)
@click.option("--runtime", default="auto", show_default=True, help="Where the backbone runs (see runtimes.py).")
@click.option(
    "--datasets", default=None, help="Comma-separated subset (default: all; --recipes: hymenoptera, flowers)."
)
@click.option("--recipes", is_flag=True, help="Compare backbones, mirrored views and combined folders instead.")
def main(data, backbone, work, precision, precisions, resizes, runtime, datasets, recipes):
    if recipes:
        return compare_recipes(Path(data), work, (datasets or "hymenoptera_data,flowers").split(","), runtime)
    config = load_config().replace(backbone=backbone, precision=precision, runtime=runtime)
    key, compared = "precision", None
    if precisions and resizes:
        raise click.UsageError("compare precisions or resize modes, one at a time")
    if precisions or resizes:
        key, allowed = ("precision", PRECISIONS) if precisions else ("resize", RESIZES)
        compared = [p.strip() for p in (precisions or resizes).split(",") if p.strip()]
        unknown = sorted({value.split(":")[0] for value in compared} - set(allowed))
        if unknown:
            raise click.BadParameter(f"{', '.join(unknown)}; choose from {', '.join(allowed)}", param_hint=f"--{key}s")
        reference = allowed[0]  # float32, squash
        compared = [reference] + [p for p in dict.fromkeys(compared) if p != reference]  # the reference first
    datasets = datasets or ",".join(DATASETS)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(work or scratch)
        for name in datasets.split(","):
            source = Path(data) / name
            if not source.is_dir():
                print(f"{name}: not found in {data}, skipped")
                continue
            rows += run_dataset(source, root / name, config, key, compared or [config.precision])
    if compared:
        variant = "" if runtime == "auto" and backbone is None else f"-{config.backbone}"
        variant += "" if runtime == "auto" else f"-{runtime}"
        return compare_variants(rows, config, key, compared, variant)
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


def run_dataset(source: Path, root: Path, config, key: str, values: list[str]) -> list[dict]:
    """Build ``source`` once into ``root``; per value of ``key`` (precision or resize, the first the reference),
    extract its features once, then train every classifier on them and evaluate each on the held-out split.
    One row per value and classifier."""
    splits = config.splits
    started = time.perf_counter()
    dataset = root / "dataset"
    report = build_dataset(source, dataset, splits=splits, fractions=config.split_fractions, seed=config.seed)
    built = time.perf_counter() - started
    rows, folders, best_c = [], {}, None
    for value in values:
        suffix = "" if value == values[0] else f"-{value}"
        features, models = root / f"features{suffix}", root / f"models{suffix}"
        started = time.perf_counter()
        settings = {"precision": config.precision, "resize": config.resize, key: _setting(key, value)}
        extract_dataset(
            dataset,
            features,
            splits=splits,
            backbone=config.backbone,
            batch_size=config.batch_size,
            runtime=config.runtime,
            progress=False,
            **settings,
        )
        prepared = built + time.perf_counter() - started
        folders[value] = features
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
            if value == values[0] and result.classifier == "logreg":
                best_c = result.best_params["C"]
            rows.append(
                dict(
                    dataset=source.name,
                    **{key: value},
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
                f"{source.name}: {value} {result.classifier}: accuracy {metrics['accuracy']:.4f}, "
                f"macro F1 {metrics['macro_f1']:.4f}",
                flush=True,
            )
    if len(values) > 1 and CV_REPEATS:
        paired = paired_cv(folders, [s for s in splits if has_feature_file(folders[values[0]], s)], best_c)
        for r in rows:
            r["cv"] = paired.get(r[key]) if r["classifier"] == "logreg" else None
    return rows


def _setting(key: str, value: str):
    """``crop:0.95`` is a centre crop keeping 0.95 of the shorter side (not the backbone's share); any
    other value is the setting itself."""
    if key == "resize" and ":" in value:
        mode, share = value.split(":", 1)
        return Resize(mode, float(share))
    return value


#: Paired cross-validation of --precisions and --resizes: repeats of stratified 5-fold over every labelled photo.
CV_REPEATS = 5


def paired_cv(folders: dict[str, Path], splits: list[str], c: float, seed: int = 0) -> dict[str, dict]:
    """Accuracy of every variant (``folders``' keys, the first the reference) in repeated stratified 5-fold
    cross-validation over all the dataset's labelled photos (every split), the same folds for all
    (standardised features, logistic regression at ``c``, the reference's grid-search choice), and each one's
    difference from the reference in points with a 95% paired bootstrap interval over photos (each photo's
    correctness averaged over the repeats). A held-out split of 45 photos moves 2.2 points per photo; this
    uses every photo, several times."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import RepeatedStratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    sets = {p: [read_split(folder, s) for s in splits] for p, folder in folders.items()}
    reference = next(iter(sets))
    paths = [path for part in sets[reference] for path in part.paths]
    labels = np.concatenate([part.labels for part in sets[reference]])
    correct = {}
    for precision, parts in sets.items():
        assert [path for part in parts for path in part.paths] == paths, "the variants' photos differ"
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
        difference = right - correct[reference]
        low, high = np.percentile(difference[resamples].mean(axis=1), [2.5, 97.5])
        result[precision] = dict(
            photos=len(labels),
            C=c,
            accuracy=float(right.mean()),
            **{f"vs_{reference}_points": round(100 * float(difference.mean()), 2)},
            interval_points=[round(100 * float(low), 2), round(100 * float(high), 2)],
        )
    return result


def compare_variants(rows: list[dict], config, key: str, values: list[str], variant: str) -> None:
    """Print each value of ``key``'s accuracy and macro F1 beside the first's (differences in points) and save
    them (the values' runtimes and quality gates too)."""
    from pyimagesearch_tl.runtimes import requested_runtime

    ref = values[0]
    runtimes = {p: requested_runtime(config.runtime, p) for p in values} if key == "precision" else {}
    reference = {(r["dataset"], r["classifier"]): r for r in rows if r[key] == ref}
    for r in rows:
        base = reference[r["dataset"], r["classifier"]]
        r[f"accuracy_vs_{ref}_points"] = round(100 * (r["accuracy"] - base["accuracy"]), 2)
        r[f"macro_f1_vs_{ref}_points"] = round(100 * (r["macro_f1"] - base["macro_f1"]), 2)
    print(
        f"\nbackbone: {config.backbone}; runtime {config.runtime}"
        + "".join(f", {p} -> {name}" for p, name in runtimes.items())
        + f"; differences against {ref} in points (accuracy x 100); quality gate: mean cosine / probe agreement"
    )
    print(
        f"{'dataset':<24} {'classifier':<11} {'test':>5} {key:<9} {'accuracy':>8} {'macro F1':>8} "
        f"{'d accuracy':>10} {'d macro F1':>10} {'cosine':>6} {'agree':>6} {'wall s':>7}"
    )
    first = {}  # datasets and classifiers in the order they ran, then each one's values in the order given
    for r in rows:
        first.setdefault((r["dataset"], r["classifier"]), len(first))
    order = {p: i for i, p in enumerate(values)}
    for r in sorted(rows, key=lambda r: (first[r["dataset"], r["classifier"]], order[r[key]])):
        gate = {k: f"{v:.4f}" for k, v in (r["quality"] or {}).items() if k in ("cosine", "agreement")}
        deltas = ["", ""]
        if r[key] != ref:
            deltas = [f"{r[f'{what}_vs_{ref}_points']:+.2f}" for what in ("accuracy", "macro_f1")]
        print(
            f"{r['dataset']:<24} {r['classifier']:<11} {r['test']:>5} {r[key]:<9} {r['accuracy']:>8.4f} "
            f"{r['macro_f1']:>8.4f} {deltas[0]:>10} {deltas[1]:>10} {gate.get('cosine', ''):>6} "
            f"{gate.get('agreement', ''):>6} {r['seconds']:>7.1f}"
        )
    summary = {}  # per value but the reference: the differences from float32 over every dataset and classifier
    for value in values[1:]:
        mine = [r for r in rows if r[key] == value]
        if not mine:
            continue
        summary[value] = {}
        for what in ("accuracy", "macro_f1"):
            points = [r[f"{what}_vs_{ref}_points"] for r in mine]
            summary[value][what] = dict(
                mean=round(sum(points) / len(points), 2), min=round(min(points), 2), max=round(max(points), 2)
            )
        accuracy, f1 = summary[value]["accuracy"], summary[value]["macro_f1"]
        print(
            f"{value} vs {ref} over {len(mine)} dataset x classifier rows, in points: accuracy "
            f"{accuracy['mean']:+.2f} on average ({accuracy['min']:+.2f} to {accuracy['max']:+.2f}), macro F1 "
            f"{f1['mean']:+.2f} ({f1['min']:+.2f} to {f1['max']:+.2f})"
        )
    cv_rows = [r for r in rows if r.get("cv")]
    if cv_rows:
        print(
            f"\npaired cross-validation ({CV_REPEATS} x stratified 5-fold over every labelled photo, the same folds "
            f"for every {key}; logistic regression at {ref}'s grid-search C): accuracy, and the difference "
            f"from {ref} in points with its 95% paired bootstrap interval"
        )
        print(f"{'dataset':<24} {'photos':>6} {'C':>7} {key:<9} {'accuracy':>8} {'d points':>8} {'interval':>16}")
        for r in sorted(cv_rows, key=lambda r: (first[r["dataset"], r["classifier"]], order[r[key]])):
            cv = r["cv"]
            interval = "" if r[key] == ref else "[{:+.2f}, {:+.2f}]".format(*cv["interval_points"])
            d = "" if r[key] == ref else f"{cv[f'vs_{ref}_points']:+.2f}"
            print(
                f"{r['dataset']:<24} {cv['photos']:>6} {cv['C']:>7g} {r[key]:<9} {cv['accuracy']:>8.4f} "
                f"{d:>8} {interval:>16}"
            )
    save_results(
        f"accuracy-{key}{variant}",
        dict(
            backbone=config.backbone,
            **{f"{key}s": values},
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
