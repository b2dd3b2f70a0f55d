"""Metrics and plots of a bundle on a split's stored features."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write_json
from .bundle import Bundle
from .store import FeatureSet
from .training import roc_auc


def evaluate(bundle: Bundle, features: FeatureSet, output_dir: str | Path | None = None, split: str = "") -> dict:
    """Classification report, confusion matrix, accuracy, ROC AUC (binary) and rank-1/5 (> 5 classes).

    With ``output_dir``, writes ``metrics.json``, ``confusion_matrix.png`` and (binary) ``roc_curve.png``.
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
        "classification_report": classification_report(features.labels, predicted, labels=labels,
                                                       target_names=names, output_dict=True, zero_division=0),
        "report_text": classification_report(features.labels, predicted, labels=labels, target_names=names,
                                             digits=4, zero_division=0),
        "confusion_matrix": confusion_matrix(features.labels, predicted, labels=labels).tolist(),
        "labels": names,
        "score_kind": kind,
        "roc_auc": roc_auc(features.labels, scores, len(names)),
    }
    if len(names) > 5:
        metrics["rank1"] = metrics["accuracy"]
        metrics["rank5"] = float(top_k_accuracy_score(features.labels, scores, k=5, labels=labels))
    if output_dir is not None:
        output_dir = Path(output_dir)
        metrics["files"] = _plot(metrics, features.labels, scores, output_dir)
        atomic_write_json(output_dir / "metrics.json", metrics)
    return metrics


def _plot(metrics: dict, labels: np.ndarray, scores: np.ndarray, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    written = []
    names = metrics["labels"]
    figure, axes = plt.subplots(figsize=(1.2 * len(names) + 3, 1.2 * len(names) + 2.5))
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=names).plot(
        ax=axes, cmap="Blues", colorbar=False, xticks_rotation=45 if len(names) > 4 else "horizontal")
    axes.set_title(f"{metrics['model']} on {metrics['split']}: accuracy {metrics['accuracy']:.4f}")
    written.append(_save(figure, output_dir / "confusion_matrix.png"))
    if len(names) == 2 and metrics["roc_auc"] is not None:
        figure, axes = plt.subplots(figsize=(5, 5))
        RocCurveDisplay.from_predictions(labels, scores[:, 1], pos_label=1, name=metrics["model"], ax=axes)
        axes.set_title(f"ROC, positive class {names[1]!r}")
        written.append(_save(figure, output_dir / "roc_curve.png"))
    return written


def _save(figure, path: Path) -> str:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return str(path)
