"""The classifier registry: one entry per scikit-learn estimator, with its grid-search grid.

The default grids span the values that win on standardised CNN features; a larger ``C`` for the
linear SVM overfits them and takes minutes to converge (measured on 3,238 flower images: 53 s at
C=1 against 1 s at C=1e-3). Override a grid with ``[grids.<name>]`` in the config file.

Adding a classifier is one :func:`register` call. Every entry is a pipeline of a
``StandardScaler`` (CNN features span very different ranges; scaling makes the solvers converge
fast) and the estimator; grid keys name the estimator's own parameters (``C``), not the pipeline's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .registry import Registry


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """A registered classifier.

    Attributes
    ----------
    name : str
        Registry key used by ``--classifier``.
    make : callable
        ``make(seed, class_weight)`` returning an unfitted estimator.
    grid : dict
        Default grid: estimator parameter -> candidate values.
    streaming : bool
        True when the estimator learns incrementally (``partial_fit``), so it can be trained on
        feature files larger than memory (``ptl train --streaming``).
    """

    name: str
    make: Callable[[int, str | None], Any]
    grid: dict[str, list]
    streaming: bool = False


#: The classifiers, by name (see :mod:`pyimagesearch_tl.registry`).
CLASSIFIERS: Registry[ClassifierSpec] = Registry("classifier", "classifiers")


def register(spec: ClassifierSpec, description: str) -> ClassifierSpec:
    """Add ``spec`` to :data:`CLASSIFIERS` (names are unique)."""
    return CLASSIFIERS.register(spec.name, spec, description=description)


def list_classifiers() -> list[str]:
    return CLASSIFIERS.names()


def get_classifier(name: str) -> ClassifierSpec:
    """The registered classifier ``name``; the error lists the valid names."""
    return CLASSIFIERS.get(name)


def make_pipeline(spec: ClassifierSpec, seed: int, class_weight: str | None):
    """``StandardScaler`` -> estimator, the step named ``clf`` (grid keys get the ``clf__`` prefix)."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline([("scale", StandardScaler()), ("clf", spec.make(seed, class_weight))])


def _logreg(seed, class_weight):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, class_weight=class_weight, random_state=seed)


def _linear_svm(seed, class_weight):
    from sklearn.svm import LinearSVC

    # "auto" solves the primal when there are more images than features (faster there).
    return LinearSVC(dual="auto", max_iter=5000, class_weight=class_weight, random_state=seed)


def _sgd(seed, class_weight):
    from sklearn.linear_model import SGDClassifier

    # In memory, 50 epochs are plenty on standardised CNN features; streaming passes its own epochs.
    return SGDClassifier(loss="log_loss", max_iter=50, tol=1e-3, class_weight=class_weight, random_state=seed)


register(
    ClassifierSpec("logreg", _logreg, {"C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]}),
    "logistic regression (lbfgs), class probabilities; the default",
)
register(
    ClassifierSpec("linear-svm", _linear_svm, {"C": [1e-5, 1e-4, 1e-3, 1e-2]}),
    "linear support vector machine (liblinear), decision values",
)
register(
    ClassifierSpec("sgd", _sgd, {"loss": ["log_loss", "hinge"], "alpha": [1e-4, 1e-3, 1e-2]}, streaming=True),
    "linear model by stochastic gradient descent; learns file blocks one by one (train --streaming)",
)


class DenseHead:
    """The softmax head of a fine-tuned network, as a classifier on its pooled features.

    Fine-tuning (:mod:`pyimagesearch_tl.finetune`) trains ``BatchNorm -> Dropout -> Dense softmax``
    on the pooled backbone output. At inference the batch normalisation is an affine map and
    dropout is the identity, so both fold into the dense layer: ``softmax(x @ kernel + bias)``.
    Holding that in NumPy lets a fine-tuned bundle predict, evaluate and serve through the same
    code as the scikit-learn bundles.

    It is a scikit-learn classifier that is fitted when made (``is_classifier`` is true, ``clone``,
    ``get_params`` and ``score`` work) without inheriting from ``sklearn.base``, so that importing
    this module, which ``import pyimagesearch_tl`` does, does not import scikit-learn.

    Parameters
    ----------
    kernel : ndarray of shape (n_features, n_classes)
    bias : ndarray of shape (n_classes,)

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        ``0 .. n_classes - 1``: the label encoder's codes of the bundle's classes.
    """

    #: What ``is_classifier`` reads in scikit-learn before 1.6 (later versions read the tags).
    _estimator_type = "classifier"

    def __init__(self, kernel, bias):
        import numpy as np

        # Arrays kept as given when already float32 (clone requires it; an unpickled array's dtype is an
        # equal but distinct object, for which np.asarray(..., dtype=np.float32) returns a new view).
        kernel, bias = np.asarray(kernel), np.asarray(bias)
        self.kernel = kernel if kernel.dtype == np.float32 else kernel.astype(np.float32)
        self.bias = bias if bias.dtype == np.float32 else bias.astype(np.float32)
        if self.kernel.ndim != 2 or self.bias.shape != (self.kernel.shape[1],):
            raise ValueError(f"kernel {self.kernel.shape} and bias {self.bias.shape} do not fit together")
        self.classes_ = np.arange(self.kernel.shape[1])

    @classmethod
    def from_layers(cls, dense_weights, batchnorm_weights=None, epsilon: float = 1e-3) -> "DenseHead":
        """Fold ``[gamma, beta, moving_mean, moving_variance]`` of a BatchNormalization layer
        (optional) into the ``[kernel, bias]`` of the Dense layer after it."""
        kernel, bias = dense_weights
        if batchnorm_weights is not None:
            gamma, beta, mean, variance = batchnorm_weights
            scale = gamma / (variance + epsilon) ** 0.5
            kernel, bias = kernel * scale[:, None], bias + (beta - mean * scale) @ kernel
        return cls(kernel, bias)

    def decision_function(self, features):
        """The head's logits (what the softmax turns into probabilities)."""
        import numpy as np

        return np.asarray(features, dtype=np.float32) @ self.kernel + self.bias

    def predict_proba(self, features):
        from scipy.special import softmax

        return softmax(self.decision_function(features), axis=1)

    def predict(self, features):
        return self.classes_[self.predict_proba(features).argmax(axis=1)]

    def score(self, features, labels, sample_weight=None) -> float:
        """Accuracy on ``features`` of the true ``labels`` (class codes), as every scikit-learn classifier."""
        from sklearn.metrics import accuracy_score

        return float(accuracy_score(labels, self.predict(features), sample_weight=sample_weight))

    def get_params(self, deep: bool = True) -> dict:
        return {"kernel": self.kernel, "bias": self.bias}

    def set_params(self, **params) -> "DenseHead":
        unknown = sorted(set(params) - {"kernel", "bias"})
        if unknown:
            raise ValueError(f"DenseHead has no parameter(s) {unknown}; it has ['bias', 'kernel']")
        self.__init__(**{**self.get_params(), **params})
        return self

    def __sklearn_tags__(self):
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(
            estimator_type="classifier", target_tags=TargetTags(required=True), classifier_tags=ClassifierTags()
        )

    def __repr__(self) -> str:
        return f"DenseHead(features={self.kernel.shape[0]}, classes={self.kernel.shape[1]})"
