"""Images to feature vectors as a scikit-learn transformer, for pipelines, grid searches and cross-validation.

::

    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.linear_model import LogisticRegression
    import pyimagesearch_tl as ptl

    model = make_pipeline(ptl.ImageFeatures(), StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(paths, labels)            # image file paths (or a uint8 array of images)
    model.predict(["new.jpg"])

In a ``ColumnTransformer`` it takes the column of paths of a data frame, selected as a list
(``ColumnTransformer([("image", ptl.ImageFeatures(), ["path"])])``, a one-column DataFrame) or by
name (``"path"``, a Series).

The transformer follows scikit-learn's estimator rules: the constructor only stores its parameters,
``fit`` validates them and the input, ``transform`` before ``fit`` raises ``NotFittedError``. The
backbone is built when first needed and is never pickled with the estimator (a pickled pipeline
stays small and rebuilds it on first use). Built backbones are shared between clones with the same
parameters, so a grid search over the classifier builds the backbone once, even when its fits
run in several threads at once.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .config import DEFAULTS, Config
from .errors import ImageError
from .images import resize_pixels


@functools.lru_cache(maxsize=2)
def _extractor(
    backbone: str, weights: str, pooling: str, batch_size: int, max_pixels: int, runtime: str, views: int, resize
):
    """The built backbone for these parameters; call it holding ``_BUILDING`` (see :func:`_shared_extractor`)."""
    from .features import FeatureExtractor

    return FeatureExtractor(
        backbone, weights, pooling, batch_size, max_pixels, runtime=runtime, views=views, resize=resize
    )


#: ``lru_cache`` does not stop two threads that miss at once from both building the backbone (seconds
#: and hundreds of MB each), as the fits of a threaded grid search or a server's first requests do.
_BUILDING = threading.Lock()


def _shared_extractor(*parameters):
    """:func:`_extractor` under a lock: one build per parameters, whatever the number of threads."""
    with _BUILDING:
        return _extractor(*parameters)


def _one_column(X: Any) -> Any:
    """The image paths of a one-column table (what a ``ColumnTransformer`` passes): a pandas Series or
    one-column DataFrame (or any table with ``columns``), or a 2-D ``(n, 1)`` array, as a 1-D array.
    Anything else is returned as it is."""
    columns = getattr(X, "columns", None)
    if columns is not None and hasattr(X, "shape"):  # a data frame
        if len(columns) != 1:
            raise ValueError(
                f"ImageFeatures takes one column of image file paths; got a {type(X).__name__} with "
                f"{len(columns)} columns {[str(c) for c in columns]}: select the paths column only, "
                "e.g. ColumnTransformer([('images', ImageFeatures(), ['path'])])"
            )
        return np.asarray(X).reshape(-1)
    if hasattr(X, "to_numpy") and getattr(X, "ndim", None) == 1:  # a Series
        return X.to_numpy()
    if isinstance(X, np.ndarray) and X.dtype != np.uint8 and X.ndim == 2 and X.shape[1] == 1:
        return X.reshape(-1)
    return X


def _as_images(X: Any) -> tuple[str, Any]:
    """``("paths", list of str)`` or ``("pixels", uint8 array (n, h, w, 3))``; anything else is a ValueError.

    Paths may come as a list, a 1-D array, a pandas Series, a one-column DataFrame or an ``(n, 1)``
    array; a table of several columns is refused.
    """
    if hasattr(X, "tocsr") or hasattr(X, "todense"):
        raise TypeError("ImageFeatures does not take sparse input: give image file paths or a uint8 image array")
    if isinstance(X, np.ndarray) and X.dtype == np.uint8:
        if X.ndim != 4 or X.shape[-1] != 3 or 0 in X.shape:
            raise ValueError(f"ImageFeatures takes uint8 images of shape (n, height, width, 3); got shape {X.shape}")
        return "pixels", X
    column = _one_column(X)
    items = list(column) if isinstance(column, (list, tuple, np.ndarray)) else None
    if items and all(isinstance(item, (str, Path)) for item in items):
        return "paths", [str(item) for item in items]
    shown = f"{X.dtype} array of shape {X.shape}" if isinstance(X, np.ndarray) else type(X).__name__
    raise ValueError(
        f"ImageFeatures takes a non-empty list of image file paths or a uint8 array of images "
        f"(n, height, width, 3); got {shown}"
    )


class ImageFeatures(TransformerMixin, BaseEstimator):
    """The pooled features of a pretrained backbone for each image.

    Parameters
    ----------
    backbone : str
        A registered backbone (``ptl backbones`` lists them); the default is the offline one.
    weights : str
        ``"imagenet"``, ``"none"`` (random, for tests) or a path to a weights file.
    pooling : {"avg", "max", "flatten"}
    batch_size : int
    runtime : {"auto", "tensorflow", "onnxruntime", "openvino"}
        Where the network runs (same features within 1e-4 in each).
    max_image_pixels : int
        Larger images are refused as decompression bombs.
    views : {1, 2}
        2: average each image's features with those of its left-right mirror.
    resize : {"squash", "crop", "letterbox"} or None
        How images (files or arrays) meet the square input; None: the backbone's own.

    Attributes
    ----------
    meta_ : FeatureMeta
        How the features are made (backbone, weights, input size, preprocessing, decoder, ...).
    n_features_out_ : int
        Length of each feature vector.
    """

    def __init__(
        self,
        backbone: str = DEFAULTS["backbone"],
        weights: str = DEFAULTS["weights"],
        pooling: str = DEFAULTS["pooling"],
        batch_size: int = DEFAULTS["batch_size"],
        runtime: str = DEFAULTS["runtime"],
        max_image_pixels: int = DEFAULTS["max_image_pixels"],
        views: int = DEFAULTS["views"],
        resize: str | None = DEFAULTS["resize"],
    ):
        self.backbone = backbone
        self.weights = weights
        self.pooling = pooling
        self.batch_size = batch_size
        self.runtime = runtime
        self.max_image_pixels = max_image_pixels
        self.views = views
        self.resize = resize

    def _network(self):
        return _shared_extractor(
            self.backbone,
            self.weights,
            self.pooling,
            self.batch_size,
            self.max_image_pixels,
            self.runtime,
            self.views,
            self.resize,
        )

    def fit(self, X, y=None):
        """Check the parameters and the images' form, and build the backbone. Nothing is learnt.

        Raises
        ------
        ConfigError
            A parameter the configuration would refuse, with the same message.
        ValueError
            ``X`` is neither image paths nor a uint8 image array.
        """
        Config(dict(DEFAULTS)).replace(
            backbone=self.backbone,
            weights=self.weights,
            pooling=self.pooling,
            batch_size=self.batch_size,
            runtime=self.runtime,
            max_image_pixels=self.max_image_pixels,
            views=self.views,
            resize=self.resize,
        )
        _as_images(X)
        self.meta_ = self._network().meta
        self.n_features_out_ = self.meta_.feature_dim
        return self

    def transform(self, X) -> np.ndarray:
        """Feature matrix ``(n_images, n_features_out_)``, float32, one row per image in order.

        Raises
        ------
        ImageError
            An image file that cannot be decoded (the row cannot be left out of a transform).
        """
        check_is_fitted(self, "meta_")
        kind, images = _as_images(X)
        network = self._network()
        size = network.input_size
        if kind == "pixels":
            rows = [
                network.transform(
                    np.stack(
                        [
                            resize_pixels(image, size, network.resize)
                            for image in images[start : start + self.batch_size]
                        ]
                    )
                )
                for start in range(0, len(images), self.batch_size)
            ]
            return np.concatenate(rows)
        features = np.zeros((len(images), self.n_features_out_), np.float32)
        for batch in network.iter_batches(images):
            if batch.skipped:
                index, reason = batch.skipped[0]
                raise ImageError(f"{images[index]}: {reason}")
            features[batch.indices] = network.transform(batch.images)
        return features

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``<backbone>_<pooling>_<i>`` for each feature."""
        check_is_fitted(self, "meta_")
        return np.asarray([f"{self.backbone}_{self.pooling}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False  # images, not a numeric table
        tags.input_tags.string = True  # file paths
        tags.requires_fit = True
        return tags


class UnknownDetector(OutlierMixin, BaseEstimator):
    """A registered "unknown" detector as a scikit-learn outlier estimator, on feature vectors.

    The detectors ``ptl train --unknown`` fits into a bundle (:data:`~pyimagesearch_tl.novelty.DETECTORS`),
    with scikit-learn's outlier vocabulary: :meth:`score_samples` is each row's familiarity (higher: more
    like the training rows), :attr:`offset_` the threshold, :meth:`decision_function` their difference and
    :meth:`predict` +1 for a known row, -1 for an unknown one. The threshold keeps a ``keep`` share of the
    calibration rows, as in a bundle.

    ``y`` holds the rows' class labels (the classes a detector such as ``mahalanobis`` measures distances
    to), not scikit-learn's +1/-1 inlier marks: every row of ``X`` is in-distribution. ``calibration`` rows
    are used as given: in a pipeline, they do not go through the steps before this one. There is no
    ``score``: how well unknowns are told apart needs photos of other classes (``benchmarks/bench_unknown.py``).

    Parameters
    ----------
    detector : str
        A registered detector (``ptl list detectors``); the default scores the features alone (those with
        ``energy`` score a classifier's logits, passed as ``logits=``).
    keep : float
        Share of the calibration rows that come out known, in (0, 1].

    Attributes
    ----------
    detector_ : Detector
        The fitted detector, as a bundle would hold it.
    offset_ : float
        The threshold on :meth:`score_samples`.
    classes_ : ndarray
        The class labels ``y`` had (one unnamed class when fitted without ``y``).
    n_features_in_ : int
    """

    def __init__(self, detector: str = "mahalanobis", keep: float = DEFAULTS["unknown_keep"]):
        self.detector = detector
        self.keep = keep

    def fit(self, X, y=None, *, calibration=None, logits=None, calibration_logits=None):
        """Learn from the training rows ``X`` (of classes ``y``; None: one class), then set the threshold on
        ``calibration`` (in-distribution rows held out from ``X``; default: ``X`` itself, as scikit-learn's
        outlier estimators do). Detectors that score a classifier's logits (``energy``) need ``logits``
        for ``X`` (and ``calibration_logits`` for ``calibration``), e.g. :meth:`Bundle.logits`."""
        from sklearn.preprocessing import LabelEncoder
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import validate_data

        from .novelty import make_detector

        Config(dict(DEFAULTS)).replace(unknown=self.detector, unknown_keep=self.keep)  # the config's own messages
        if y is None:
            X = validate_data(self, X, dtype=np.float64)
            y = np.zeros(len(X), dtype=int)
        else:
            X, y = validate_data(self, X, y, dtype=np.float64)
            check_classification_targets(y)  # class labels: a continuous y is refused, not made into classes
        if len(X) < 2:
            raise ValueError(f"UnknownDetector needs at least 2 samples, got {len(X)} sample")
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        detector = make_detector(
            self.detector, self.keep, "calibration rows" if calibration is not None else "fit rows"
        )
        if calibration is not None:
            calibration = validate_data(self, calibration, dtype=np.float64, reset=False)
        logits = self._checked_logits(detector, logits, X, "logits", "X")
        if calibration is not None:
            calibration_logits = self._checked_logits(
                detector, calibration_logits, calibration, "calibration_logits", "calibration"
            )
        elif calibration_logits is not None:
            raise ValueError("calibration_logits without calibration: pass the calibration rows they belong to")
        self.detector_ = detector.fit(
            X,
            encoder.transform(y),
            n_classes=len(self.classes_),
            logits=logits,
            calibration=calibration,
            calibration_logits=calibration_logits,
        )
        self.offset_ = float(self.detector_.offset_)
        return self

    def _checked_logits(self, detector, logits, rows: np.ndarray, name: str, of: str):
        """``logits`` as a float64 ``(len(rows), classes)`` array of finite values, or None for a detector that
        does not score them (a ValueError naming the argument otherwise)."""
        from .novelty import list_detectors, make_detector

        if not detector.uses_logits:
            return None
        if logits is None:
            plain = [kind for kind in list_detectors() if not make_detector(kind).uses_logits]
            raise ValueError(
                f"detector {self.detector!r} scores a classifier's logits: pass {name}= for {of}, or choose one "
                f"that scores the features alone: {', '.join(plain)}"
            )
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2 or len(logits) != len(rows) or logits.shape[1] < 2:
            raise ValueError(
                f"{name} must be of shape ({len(rows)}, classes), one row per row of {of}; got {logits.shape}"
            )
        if not np.isfinite(logits).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        return logits

    def score_samples(self, X, logits=None) -> np.ndarray:
        """Each row's familiarity (higher: more like the training rows)."""
        from sklearn.utils.validation import validate_data

        check_is_fitted(self, "detector_")
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return np.asarray(
            self.detector_.score_samples(X, self._checked_logits(self.detector_, logits, X, "logits", "X")),
            dtype=np.float64,
        )

    def decision_function(self, X, logits=None) -> np.ndarray:
        """:meth:`score_samples` minus :attr:`offset_`: 0 or more for a known row, below 0 for an unknown one."""
        return self.score_samples(X, logits) - self.offset_

    def predict(self, X, logits=None) -> np.ndarray:
        """+1 for a known row, -1 for an unknown one."""
        return np.where(self.decision_function(X, logits) >= 0, 1, -1)

    def fit_predict(self, X, y=None, **fit_params) -> np.ndarray:
        """:meth:`fit`, then :meth:`predict` on ``X`` (with the ``logits`` given to ``fit``)."""
        return self.fit(X, y, **fit_params).predict(X, fit_params.get("logits"))
