"""Scores of predictions against labels, shared by training, evaluation and fine-tuning."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray, n_classes: int) -> float | None:
    """ROC AUC: binary from the positive-class score, else one-vs-rest macro (needs probabilities)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return None
    if n_classes == 2:
        return float(roc_auc_score(labels, scores[:, 1]))
    if len(present) < n_classes or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
        return None
    return float(roc_auc_score(labels, scores, multi_class="ovr", labels=list(range(n_classes))))
