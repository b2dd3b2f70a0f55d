"""Grid search, refit and bundle saving for the registered classifiers, on stored feature files."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import BUNDLE_SUFFIX, Bundle, decision_logits
from .classifiers import get_classifier, list_classifiers, make_pipeline
from .errors import ConfigError, DatasetError, FeatureFileError
from .locks import locks_output
from .metrics import roc_auc
from .novelty import fit_detector, make_detector
from .quantization import read_network
from .store import (
    FeatureSet,
    check_same_layout,
    feature_file,
    feature_folders,
    has_feature_file,
    iter_chunks,
    read_labels,
    read_meta,
    read_split,
)

#: When training streams, the "unknown" detector learns from a seeded sample of the training rows: at
#: most 10,000 rows and 32 MiB of float32 features (6,553 rows of Lite0 features, 334 of 25,088-wide
#: ``flatten`` ones).
DETECTOR_SAMPLE_ROWS, DETECTOR_SAMPLE_BYTES = 10_000, 32 * 2**20
#: Folds of the cross-fitting that calibrates the "unknown" detector when there is no validation split.
CALIBRATION_FOLDS = 5


@dataclasses.dataclass
class TrainReport:
    classifier: str
    path: Path
    best_params: dict
    cv_score: float
    validation_accuracy: float | None
    validation_auc: float | None
    fit_seconds: float


def label_encoder(label_names: Sequence[str]):
    """The label encoder of the class names recorded in the feature files (their label indices point into them).

    Built from the names, never read from a file: a ``label_encoder.joblib`` left by an older version is a
    pickle, and unpickling runs whatever code it holds, so it is ignored.
    """
    from sklearn.preprocessing import LabelEncoder

    names = [str(name) for name in label_names]
    encoder = LabelEncoder().fit(names)
    if list(encoder.classes_) != names:  # the files' label indices would point at other classes
        raise FeatureFileError(f"the feature files' class names {names} are not sorted and distinct")
    return encoder


def _optional_feature_file(features_dir: Path, split: str | None) -> Path | None:
    """The finished feature file of ``split`` if there is one (the validation split is optional)."""
    return feature_file(features_dir, split) if split is not None and has_feature_file(features_dir, split) else None


def _optional_split(folders: list[Path], split: str | None) -> FeatureSet | None:
    """The features of ``split`` from every folder, or None when no folder has it; some but not all is an error."""
    having = [has_feature_file(folder, split) for folder in folders] if split is not None else [False]
    if not any(having):
        return None
    if not all(having):
        lacking = folders[having.index(False)]
        raise FeatureFileError(f"{lacking} has no {split!r} features but the other feature folders do")
    return read_split(folders, split)


def _check_trainable(labels: np.ndarray, names: Sequence[str], folds: int | None) -> None:
    counts = Counter(labels.tolist())
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


@locks_output("output_dir")
def train(
    features_dir: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    *,
    training_split: str,
    validation_split: str | None,
    classifier: str = "logreg",
    cv: str = "5",
    class_weight: str = "none",
    grids: dict | None = None,
    seed: int = 42,
    n_jobs: int = -1,
    unknown_keep: float = 0.95,
    unknown: str = "mahalanobis+energy",
) -> list[TrainReport]:
    """Grid-search, refit and save one bundle per classifier (``"all"``: every registered one).

    Parameters
    ----------
    features_dir : path or list of paths
        One feature folder, or several extracted from the same dataset (e.g. by two backbones): their
        vectors are concatenated row by row, matched by image path and content hash.
    unknown : str
        The "unknown" detector (a name of :data:`~pyimagesearch_tl.novelty.DETECTORS`), calibrated to keep
        ``unknown_keep`` of photos it did not learn from: the validation split, else the training split
        cross-fitted (:func:`cross_fitted_detector`).
    cv : str
        A number of stratified folds, or ``"validation"`` to use the validation split as the single
        held-out fold (the best model is then refit on training + validation).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold

    folders, output_dir = feature_folders(features_dir), Path(output_dir)
    features_dir = folders[0]  # named in messages (every folder's labels are checked equal)
    train_set = read_split(folders, training_split)
    validation_set = _optional_split(folders, validation_split)
    if validation_set is not None:
        check_same_layout(train_set.meta, validation_set.meta, f"the {validation_split!r} features")
    if cv == "validation" and validation_set is None:
        raise DatasetError(f"--cv validation needs features of the {validation_split!r} split in {features_dir}")
    folds = None if cv == "validation" else int(cv)
    _check_trainable(train_set.labels, train_set.meta.label_names, folds)
    encoder = label_encoder(train_set.meta.label_names)
    network = read_network(features_dir, train_set.meta)  # int8: before the work, not after it

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
            cv=splitter,
            scoring="accuracy",
            n_jobs=n_jobs,
            refit=True,
            error_score="raise",
        )
        started = time.perf_counter()
        with warnings.catch_warnings():
            # A grid candidate that does not converge in its iteration budget simply scores lower.
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(X, y)
        seconds = time.perf_counter() - started
        best = {key.removeprefix("clf__"): value for key, value in search.best_params_.items()}
        bundle = Bundle(
            search.best_estimator_,
            encoder,
            train_set.meta,
            name,
            network=network,
            info=dict(
                best_params=best,
                cv=cv,
                cv_score=float(search.best_score_),
                fit_seconds=seconds,
                training_images=int(len(y)),
                class_weight=class_weight,
                grid=grid,
            ),
        )
        # The "unknown" detector, fitted per classifier: some detectors read the classifier's evidence.
        if validation_set is not None:
            bundle.novelty = fit_detector(
                unknown,
                train_set.features,
                train_set.labels,
                len(encoder.classes_),
                bundle.logits(train_set.features),
                validation_set.features,
                bundle.logits(validation_set.features),
                unknown_keep,
                validation_split,
            )
        else:
            bundle.novelty = cross_fitted_detector(
                unknown, bundle, train_set, search.best_estimator_, unknown_keep, seed, training_split
            )
        bundle.info["unknown"] = unknown
        path = bundle.save(output_dir / f"{name}{BUNDLE_SUFFIX}")
        accuracy, auc = _validation_metrics(bundle, None if cv == "validation" else validation_set)
        reports.append(TrainReport(name, path, best, float(search.best_score_), accuracy, auc, seconds))
    return reports


def cross_fitted_detector(
    kind: str, bundle: Bundle, train_set: FeatureSet, estimator, keep: float, seed: int, training_split: str
):
    """Detector ``kind`` learnt from every training row, its threshold calibrated on rows it did not learn from.

    Without a validation split, each training row is scored by a detector that did not learn from it:
    in closed form where the detector has one (:meth:`~pyimagesearch_tl.novelty.Detector.held_out_familiarity`,
    leave-one-out), else by cross-fitting: the rows are cut into stratified folds (:data:`CALIBRATION_FOLDS`,
    fewer when a class is smaller), and each fold is scored by a detector learnt, and a copy of the chosen
    classifier fitted, on the other folds. Those held-out scores set the threshold of the detector learnt
    from all rows, as a validation split's would: distances of the very rows a detector learnt from are far
    smaller than those of new photos, so calibrating on them rejects many new photos.
    """
    from sklearn.base import clone
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    X, y, classes = train_set.features, train_set.labels, len(bundle.label_names)
    smallest = int(np.bincount(y, minlength=classes).min())
    if smallest < 3:  # a fold would leave a class with a single photo (or none) to learn from
        warnings.warn(
            f"a class has {smallest} {training_split!r} photos, too few to hold any out: the 'unknown' threshold "
            f"is set on the training photos themselves and will call many new photos unknown; add photos or a "
            f"validation split"
        )
        logits = bundle.logits(X)
        calibrated_on = f"{training_split} photos themselves (too few to hold any out)"
        return fit_detector(kind, X, y, classes, logits, X, logits, keep, calibrated_on)
    folds = min(CALIBRATION_FOLDS, smallest)
    parts = make_detector(kind, keep).components
    held = [part.held_out_familiarity(X, y, classes) for part in parts]
    refit = [i for i, scores in enumerate(held) if scores is None]
    for i in refit:
        held[i] = np.zeros(len(y))
    needs_logits = any(parts[i].uses_logits for i in refit)
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y) if refit else []
    for fitted_rows, held_rows in splits:
        fitted_logits = held_logits = None
        if needs_logits:
            with warnings.catch_warnings():  # as in the grid search: a copy that stops early still scores
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = clone(estimator).fit(X[fitted_rows], y[fitted_rows])
            fitted_logits, held_logits = decision_logits(model, X[fitted_rows]), decision_logits(model, X[held_rows])
        for i in refit:
            part = make_detector(parts[i].kind, keep)
            part.learn(X[fitted_rows], y[fitted_rows], classes, fitted_logits)
            held[i][held_rows] = part.familiarity(X[held_rows], held_logits)
    methods = [f"{folds}-fold cross-fitting" if i in refit else "leave-one-out" for i in range(len(parts))]
    if len(set(methods)) == 1:
        how = methods[0]
    else:
        how = " and ".join(f"{method} ({part.kind})" for method, part in zip(methods, parts))
    detector = make_detector(kind, keep, f"{training_split} photos held out by {how}")
    detector.learn(X, y, classes, bundle.logits(X))
    detector.set_threshold(detector.stack(held))
    return detector


# --- out-of-core training -------------------------------------------------------------------------


@locks_output("output_dir")
def train_streaming(
    features_dir: str | Path,
    output_dir: str | Path,
    *,
    training_split: str,
    validation_split: str | None,
    classifier: str = "sgd",
    class_weight: str = "none",
    grids: dict | None = None,
    seed: int = 42,
    epochs: int = 5,
    block_rows: int = 256,
    unknown_keep: float = 0.95,
    unknown: str = "mahalanobis+energy",
) -> TrainReport:
    """Train a ``partial_fit`` classifier over HDF5 blocks; memory does not grow with the row count.

    One pass fits the ``StandardScaler`` incrementally; then every candidate of the grid learns
    from the same reads, ``epochs`` times, blocks in a new seeded order each epoch and rows shuffled
    within each block. The candidate with the best accuracy on the validation split (streamed
    too; without one, every fifth training block is held out) is saved in a bundle like any other.
    The "unknown" detector learns from a seeded sample of the training rows of bounded size
    (:data:`DETECTOR_SAMPLE_ROWS`, :data:`DETECTOR_SAMPLE_BYTES`; drawn in the first pass, every class
    in it) and is calibrated over the selection blocks.
    """
    from sklearn.model_selection import ParameterGrid
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    streaming = [name for name in list_classifiers() if get_classifier(name).streaming]
    if classifier == "all":
        raise ConfigError(
            f"--streaming trains one classifier that learns incrementally ({', '.join(streaming)}), not {classifier!r}"
        )
    spec = get_classifier(classifier)
    if not spec.streaming:
        raise ConfigError(
            f"--streaming needs a classifier that learns incrementally ({', '.join(streaming)}), not {classifier!r}"
        )
    folders = feature_folders(features_dir)
    if len(folders) > 1:
        raise ConfigError("--streaming reads one feature folder; combined feature folders train in memory")
    features_dir, output_dir = folders[0], Path(output_dir)
    train_path = feature_file(features_dir, training_split)
    if train_path.suffix != ".h5":
        raise FeatureFileError(
            f"{train_path}: streaming training reads HDF5 feature files (extract with --format hdf5)"
        )
    meta, labels = read_meta(train_path), read_labels(train_path)
    _check_trainable(labels, meta.label_names, None)
    encoder = label_encoder(meta.label_names)
    network = read_network(features_dir, meta)  # int8: before the work, not after it
    validation_path = _optional_feature_file(features_dir, validation_split)
    if validation_path is not None:
        check_same_layout(meta, read_meta(validation_path), validation_path.name)
        train_blocks, held_out = list(range(-(-len(labels) // block_rows))), []
    else:  # every fifth block is held out; blocks small enough that there are at least five
        block_rows = max(1, min(block_rows, len(labels) // 5))
        blocks = list(range(-(-len(labels) // block_rows)))
        held_out = blocks[4::5]
        train_blocks = [b for b in blocks if b not in held_out]
        if not held_out:
            raise DatasetError(
                f"{train_path}: {len(labels)} images are too few to hold some out for the grid "
                f"search; give a validation split"
            )
    fitted = sum(min(block_rows, len(labels) - b * block_rows) for b in train_blocks)

    classes = np.arange(len(meta.label_names))
    weights = None
    if class_weight == "balanced":  # partial_fit cannot compute 'balanced' itself
        counts = np.bincount(labels, minlength=len(classes))
        weights = {int(c): len(labels) / (len(classes) * counts[c]) for c in classes}
    started = time.perf_counter()
    scaler = StandardScaler()

    # One pass fits the scaler and draws the seeded sample of training rows the "unknown" detector learns from.
    # It reads every row, held-out blocks and the validation file included: each block is checked as it is
    # read (iter_chunks), so a bad row is found before any candidate learns, not after the grid search.
    sample_rows = min(DETECTOR_SAMPLE_ROWS, DETECTOR_SAMPLE_BYTES // (4 * meta.feature_dim))
    sampling, share = np.random.default_rng(seed), min(1.0, sample_rows / max(fitted, 1))
    sample, sampled_classes = [], set()
    if validation_path is not None:
        for _ in iter_chunks(validation_path, block_rows):
            pass
    checked_only = set(held_out)
    for block, (X, y) in enumerate(iter_chunks(train_path, block_rows)):
        if block in checked_only:
            continue
        scaler.partial_fit(X)
        chosen = sampling.random(len(y)) < share
        for label in set(np.unique(y).tolist()) - sampled_classes:  # every class is in the sample
            chosen[np.flatnonzero(y == label)[0]] = True
        sampled_classes.update(np.unique(y[chosen]).tolist())
        sample.append((X[chosen], y[chosen]))
    grid = list(ParameterGrid((grids or {}).get(classifier) or spec.grid))
    candidates = [spec.make(seed, None).set_params(class_weight=weights, **params) for params in grid]
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for X, y in iter_chunks(train_path, block_rows, rng.permutation(train_blocks).tolist()):
            order = rng.permutation(len(y))
            X = scaler.transform(X)[order]
            for model in candidates:
                model.partial_fit(X, y[order], classes=classes)
    correct, seen = np.zeros(len(candidates)), 0

    def selection_blocks():
        if validation_path:
            return iter_chunks(validation_path, block_rows)
        return iter_chunks(train_path, block_rows, held_out)

    for X, y in selection_blocks():
        X = scaler.transform(X)
        correct += [np.sum(model.predict(X) == y) for model in candidates]
        seen += len(y)
    seconds = time.perf_counter() - started
    best = int(np.argmax(correct))
    score = float(correct[best] / seen) if seen else float("nan")
    pipeline = Pipeline([("scale", scaler), ("clf", candidates[best])])
    selection = validation_split if validation_path else "held-out training blocks"
    bundle = Bundle(
        pipeline,
        encoder,
        meta,
        classifier,
        network=network,
        info=dict(
            best_params=grid[best],
            cv=f"streaming, selected on {selection}",
            cv_score=score,
            fit_seconds=seconds,
            training_images=int(len(labels)),
            fitted_images=fitted,
            held_out_images=int(len(labels)) - fitted if held_out else 0,
            epochs=epochs,
            class_weight=class_weight,
            grid=(grids or {}).get(classifier) or spec.grid,
        ),
    )
    # The detector learns from the sample and sets its threshold over the selection blocks (one more pass).
    features, sample_labels = (np.concatenate(column) for column in zip(*sample))
    bundle.novelty = make_detector(unknown, unknown_keep, selection)
    bundle.novelty.learn(features, sample_labels, len(classes), bundle.logits(features))
    bundle.novelty.set_threshold(
        np.concatenate([bundle.novelty.raw_scores(X, bundle.logits(X)) for X, _ in selection_blocks()])
    )
    bundle.info.update(unknown=unknown, unknown_learned_from=int(len(sample_labels)))
    path = bundle.save(output_dir / f"{classifier}{BUNDLE_SUFFIX}")
    return TrainReport(classifier, path, grid[best], score, score if validation_path else None, None, seconds)
