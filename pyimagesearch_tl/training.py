"""Grid search, refit and bundle saving for the registered classifiers, on stored feature files."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Bundle
from .classifiers import get_classifier, list_classifiers, make_pipeline
from .errors import DatasetError
from .features import LABEL_ENCODER
from .store import FeatureSet, check_same_layout, feature_file, read_features


@dataclasses.dataclass
class TrainReport:
    classifier: str
    path: Path
    best_params: dict
    cv_score: float
    validation_accuracy: float | None
    validation_auc: float | None
    fit_seconds: float


def load_label_encoder(features_dir: Path, label_names: Sequence[str]):
    """The saved label encoder, checked against the labels recorded in the feature files."""
    import joblib
    from sklearn.preprocessing import LabelEncoder

    path = features_dir / LABEL_ENCODER
    encoder = joblib.load(path) if path.is_file() else LabelEncoder().fit(list(label_names))
    if [str(c) for c in encoder.classes_] != list(label_names):
        raise DatasetError(f"{path} has classes {list(encoder.classes_)} but the feature files have {list(label_names)}")
    return encoder


def _check_trainable(train: FeatureSet, folds: int | None) -> None:
    counts = Counter(train.labels.tolist())
    names = train.meta.label_names
    empty = [names[i] for i in range(len(names)) if counts.get(i, 0) == 0]
    if empty:
        raise DatasetError(f"class {empty[0]!r} has no images in the training features")
    if len(counts) < 2:
        raise DatasetError("training needs at least two classes")
    if folds is not None:
        smallest = min(counts, key=counts.get)
        if counts[smallest] < folds:
            raise DatasetError(
                f"class {names[smallest]!r} has {counts[smallest]} training images, fewer than the {folds} "
                f"cross-validation folds; lower --cv or add images"
            )


def _validation_metrics(bundle: Bundle, features: FeatureSet | None) -> tuple[float | None, float | None]:
    if features is None or len(features.labels) == 0:
        return None, None
    from sklearn.metrics import accuracy_score

    scores, _ = bundle.scores(features.features)
    accuracy = float(accuracy_score(features.labels, scores.argmax(axis=1)))
    return accuracy, roc_auc(features.labels, scores, len(bundle.label_names))


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


def train(features_dir: str | Path, output_dir: str | Path, *, training_split: str, validation_split: str | None,
          classifier: str = "logreg", cv: str = "5", class_weight: str = "none", grids: dict | None = None,
          seed: int = 42, n_jobs: int = -1) -> list[TrainReport]:
    """Grid-search, refit and save one bundle per classifier (``"all"``: every registered one).

    Parameters
    ----------
    cv : str
        A number of stratified folds, or ``"validation"`` to use the validation split as the single
        held-out fold (the best model is then refit on training + validation).
    """
    from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold

    features_dir, output_dir = Path(features_dir), Path(output_dir)
    train_set = read_features(feature_file(features_dir, training_split))
    validation_set = None
    if validation_split is not None:
        try:
            path = feature_file(features_dir, validation_split)
        except Exception:
            path = None
        if path is not None:
            validation_set = read_features(path)
            check_same_layout(train_set.meta, validation_set.meta, f"{path.name}")
    if cv == "validation" and validation_set is None:
        raise DatasetError(f"--cv validation needs features of the {validation_split!r} split in {features_dir}")
    folds = None if cv == "validation" else int(cv)
    _check_trainable(train_set, folds)
    encoder = load_label_encoder(features_dir, train_set.meta.label_names)

    if cv == "validation":
        X = np.concatenate([train_set.features, validation_set.features])
        y = np.concatenate([train_set.labels, validation_set.labels])
        splitter = PredefinedSplit(np.r_[np.full(len(train_set.labels), -1), np.zeros(len(validation_set.labels))])
    else:
        X, y = train_set.features, train_set.labels
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)

    names = list_classifiers() if classifier == "all" else [classifier]
    reports = []
    for name in names:
        spec = get_classifier(name)
        grid = (grids or {}).get(name) or spec.grid
        search = GridSearchCV(
            make_pipeline(spec, seed, None if class_weight == "none" else class_weight),
            {f"clf__{param}": values for param, values in grid.items()},
            cv=splitter, scoring="accuracy", n_jobs=n_jobs, refit=True, error_score="raise",
        )
        started = time.perf_counter()
        search.fit(X, y)
        seconds = time.perf_counter() - started
        best = {key.removeprefix("clf__"): value for key, value in search.best_params_.items()}
        bundle = Bundle(search.best_estimator_, encoder, train_set.meta, name,
                        info=dict(best_params=best, cv=cv, cv_score=float(search.best_score_), fit_seconds=seconds,
                                  training_images=int(len(y)), class_weight=class_weight, grid=grid))
        path = bundle.save(output_dir / f"{name}.joblib")
        accuracy, auc = _validation_metrics(bundle, None if cv == "validation" else validation_set)
        reports.append(TrainReport(name, path, best, float(search.best_score_), accuracy, auc, seconds))
    return reports
