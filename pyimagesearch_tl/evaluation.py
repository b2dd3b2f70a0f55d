"""Metrics and plots of a bundle on a split, and the comparison of every evaluated model of a run.

A bundle trained on stored features is evaluated on the split's feature file; a fine-tuned bundle,
whose backbone differs from the stored features, on the split's images (features made in memory by
its own backbone). Either way the result is ``<evaluation dir>/<model>/metrics.json`` with plots,
and :func:`compare` gathers those files into one table and one figure.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_json, atomic_write_text
from .backbones import FINETUNED
from .bundle import Bundle
from .errors import DatasetError
from .images import MAX_PIXELS
from .locks import locks_output
from .metrics import roc_auc
from .plots import new_figure, save_figure
from .store import FeatureSet, feature_folders, has_feature_file, read_split

METRICS = "metrics.json"


def default_split(
    bundle: Bundle, splits: Sequence[str | None], features_dir: str | Path, dataset_dir: str | Path
) -> str:
    """The first of ``splits`` (held-out, then validation) that has data for ``bundle``."""
    from .layouts import read_manifest

    candidates = [s for s in splits if s]
    if bundle.meta.weights == FINETUNED:
        present = {row["split"] for row in read_manifest(dataset_dir)}
        return next((s for s in candidates if s in present), candidates[0])
    first = feature_folders(features_dir)[0]
    return next((s for s in candidates if has_feature_file(first, s)), candidates[0])


def features_for(
    bundle: Bundle,
    split: str,
    features_dir: str | Path | Sequence[str | Path],
    dataset_dir: str | Path,
    batch_size: int = 32,
    max_pixels: int = MAX_PIXELS,
    runtime: str = "auto",
) -> tuple[FeatureSet, list[tuple[str, str]]]:
    """The features ``bundle`` is evaluated on, and the images skipped while making them.

    Stored features (``features_dir``, or one folder per part of a model trained on combined
    folders, in the same order) for bundles trained on them; for a fine-tuned bundle, the split's
    images in ``dataset_dir`` through the bundle's own backbone.
    """
    if bundle.meta.weights != FINETUNED:
        folders = feature_folders(features_dir)
        if len(folders) != len(bundle.meta.parts):
            raise DatasetError(
                f"this model was trained on {len(bundle.meta.parts)} feature folder(s) ({bundle.meta.backbone}); "
                f"give as many --features, in the same order (got {len(folders)})"
            )
        return read_split(folders, split), []
    from .features import check_labels, dataset_rows, extract_in_memory

    rows = dataset_rows(dataset_dir).get(split)
    if not rows:
        raise DatasetError(f"dataset {dataset_dir} has no {split!r} split to evaluate the fine-tuned model on")
    check_labels(rows, bundle.label_names, f"the {split!r} split of dataset {dataset_dir}")  # before the backbone
    extractor = bundle.feature_extractor(batch_size, max_pixels, runtime)
    extractor.expect(len(rows))
    return extract_in_memory(extractor, dataset_dir, rows)


@locks_output("output_dir")
def evaluate(
    bundle: Bundle,
    features: FeatureSet,
    output_dir: str | Path | None = None,
    split: str = "",
    model_path: str | Path | None = None,
) -> dict:
    """Classification report, confusion matrix, accuracy, ROC AUC (binary), macro F1, rank-1/5 (> 5 classes).

    With ``output_dir``, writes ``metrics.json``, ``confusion_matrix.png`` and (binary) ``roc_curve.png``.
    ``model_path`` (the bundle's file) adds its size to the metrics.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, top_k_accuracy_score

    bundle.check_features(features.meta, f"the {split or 'given'} features")
    names = bundle.label_names
    labels = list(range(len(names)))
    scores, kind = bundle.scores(features.features)
    predicted = scores.argmax(axis=1)
    metrics = {
        "model": bundle.name,
        "split": split,
        "images": int(len(features.labels)),
        "accuracy": float(accuracy_score(features.labels, predicted)),
        "classification_report": classification_report(
            features.labels, predicted, labels=labels, target_names=names, output_dict=True, zero_division=0
        ),
        "report_text": classification_report(
            features.labels, predicted, labels=labels, target_names=names, digits=4, zero_division=0
        ),
        "confusion_matrix": confusion_matrix(features.labels, predicted, labels=labels).tolist(),
        "labels": names,
        "score_kind": kind,
        "roc_auc": roc_auc(features.labels, scores, len(names)),
        "kind": "fine-tuned" if bundle.meta.weights == FINETUNED else "features + classifier",
        "backbone": bundle.meta.backbone,
        "train_seconds": bundle.info.get("fit_seconds"),
        "model_file": None if model_path is None else str(model_path),
        "model_bytes": None if model_path is None else Path(model_path).stat().st_size,
    }
    metrics["macro_f1"] = float(metrics["classification_report"]["macro avg"]["f1-score"])
    if bundle.novelty is not None:  # photos of the classes the "unknown" detector turns away
        known = bundle.novelty.is_known(features.features, bundle.logits(features.features))
        metrics["unknown"] = dict(
            detector=bundle.novelty.kind,
            calibration=bundle.novelty.calibration,
            keep=bundle.novelty.keep,
            called_unknown=int((~known).sum()),
            kept=float(known.mean()) if len(known) else None,
        )
    if len(names) > 5:
        metrics["rank1"] = metrics["accuracy"]
        metrics["rank5"] = float(top_k_accuracy_score(features.labels, scores, k=5, labels=labels))
    if output_dir is not None:
        output_dir = Path(output_dir)
        metrics["files"] = _plot(metrics, features.labels, scores, output_dir)
        atomic_write_json(output_dir / METRICS, metrics)
    return metrics


def _plot(metrics: dict, labels: np.ndarray, scores: np.ndarray, output_dir: Path) -> list[str]:
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    written = []
    names = metrics["labels"]
    figure = new_figure(figsize=(1.2 * len(names) + 3, 1.2 * len(names) + 2.5))
    axes = figure.subplots()
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=names).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45 if len(names) > 4 else "horizontal"
    )
    axes.set_title(f"{metrics['model']} on {metrics['split']}: accuracy {metrics['accuracy']:.4f}")
    written.append(save_figure(figure, output_dir / "confusion_matrix.png"))
    if len(names) == 2 and metrics["roc_auc"] is not None:
        figure = new_figure(figsize=(5, 5))
        axes = figure.subplots()
        RocCurveDisplay.from_predictions(labels, scores[:, 1], pos_label=1, name=metrics["model"], ax=axes)
        axes.set_title(f"ROC, positive class {names[1]!r}")
        written.append(save_figure(figure, output_dir / "roc_curve.png"))
    return written


# --- comparing every evaluated model of a run ------------------------------------------------------

#: Columns of ``comparison.csv``, in order.
COMPARISON_FIELDS = [
    "model",
    "kind",
    "backbone",
    "split",
    "images",
    "accuracy",
    "roc_auc",
    "macro_f1",
    "train_seconds",
    "model_mb",
    "metrics",
]


def compare(run_dir: str | Path) -> tuple[list[dict], list[str]]:
    """Gather every ``metrics.json`` below ``run_dir`` into ``comparison.{csv,json,png}`` there.

    Returns the rows (best accuracy first) and the files written. Models evaluated on different
    splits or image counts are still listed, with a ``warning`` naming the difference.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DatasetError(f"run folder {str(run_dir)!r} does not exist")
    found = sorted(run_dir.rglob(METRICS))
    if not found:
        raise DatasetError(f"no evaluated models below {run_dir}: run `ptl evaluate` first (it writes {METRICS})")
    everything = []
    for path in found:
        try:
            everything.append((path, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable metrics file ({exc})") from None
    rows = []
    for path, m in everything:
        size = m.get("model_bytes")
        rows.append(
            dict(
                model=Path(m["model_file"]).stem if m.get("model_file") else m.get("model"),
                kind=m.get("kind", ""),
                backbone=m.get("backbone", ""),
                split=m.get("split", ""),
                images=m.get("images"),
                accuracy=m.get("accuracy"),
                roc_auc=m.get("roc_auc"),
                macro_f1=m.get("macro_f1"),
                train_seconds=m.get("train_seconds"),
                model_mb=None if size is None else size / 2**20,
                metrics=str(path.relative_to(run_dir)),
            )
        )
    order = sorted(range(len(rows)), key=lambda i: -(rows[i]["accuracy"] or 0))
    rows, everything = [rows[i] for i in order], [everything[i] for i in order]
    written = [str(run_dir / "comparison.csv"), str(run_dir / "comparison.json")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COMPARISON_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(written[0], buffer.getvalue())
    atomic_write_json(written[1], rows)
    written.append(_plot_comparison(rows, [m for _, m in everything], run_dir / "comparison.png"))
    return rows, written


def comparison_warning(rows: list[dict]) -> str | None:
    """Why the rows are not directly comparable, if they are not (different splits or image counts)."""
    evaluated_on = {(r["split"], r["images"]) for r in rows}
    if len(evaluated_on) > 1:
        return "models were evaluated on different data: " + "; ".join(
            f"{s} ({n} images)" for s, n in sorted(evaluated_on, key=str)
        )
    return None


def _plot_comparison(rows: list[dict], metrics: list[dict], path: Path) -> str:
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(rows)
    figure = new_figure(figsize=(max(8, 3.6 * n), 8))
    grid = figure.add_gridspec(2, n, height_ratios=[1, 1.3])
    bars = figure.add_subplot(grid[0, :])
    scores = [("accuracy", "accuracy"), ("macro F1", "macro_f1")]
    if all(r["roc_auc"] is not None for r in rows):
        scores.append(("ROC AUC", "roc_auc"))
    width = 0.8 / len(scores)
    positions = np.arange(n)
    for k, (label, key) in enumerate(scores):
        values = [r[key] or 0 for r in rows]
        drawn = bars.bar(positions + (k - (len(scores) - 1) / 2) * width, values, width, label=label)
        bars.bar_label(drawn, fmt="%.3f", fontsize=7)
    bars.set_xticks(positions, [r["model"] for r in rows])
    low = min(min(r[key] or 0 for r in rows) for _, key in scores)
    bottom = max(0.0, low - 0.1)
    bars.set_ylim(bottom, 1 + 0.08 * (1 - bottom))  # room for the value labels
    bars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    bars.set_title(f"every evaluated model on {', '.join(sorted({str(r['split']) for r in rows}))}")
    for i, (row, m) in enumerate(zip(rows, metrics)):
        axes = figure.add_subplot(grid[1, i])
        ConfusionMatrixDisplay(np.array(m["confusion_matrix"]), display_labels=m["labels"]).plot(
            ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45 if len(m["labels"]) > 3 else "horizontal"
        )
        seconds = "-" if row["train_seconds"] is None else f"{row['train_seconds']:.0f} s"
        size = "-" if row["model_mb"] is None else f"{row['model_mb']:.1f} MB"
        axes.set_title(f"{row['model']}\nacc {row['accuracy']:.3f} · train {seconds} · {size}", fontsize=9)
    return save_figure(figure, path)
