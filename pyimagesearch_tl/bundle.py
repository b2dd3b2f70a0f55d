"""Model bundles: everything prediction needs, in one file, written atomically.

A bundle holds the fitted classifier, the label encoder, the :class:`~pyimagesearch_tl.store.FeatureMeta`
of the features it was trained on (backbone, weights, pooling, input size, preprocessing, decoder),
the grid-search result and the library versions. Prediction rebuilds the backbone from the bundle,
never from defaults.

.. warning::
   A bundle is a pickle (joblib). Loading one can run arbitrary code: load only bundles from a
   source you trust, exactly as with any scikit-learn model file.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .atomic import atomic_joblib_dump
from .errors import BundleError
from .store import CombinedMeta, FeatureMeta

FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a bundle depends on (read without importing them)."""
    from importlib import metadata

    versions = {"pyimagesearch_tl": __version__, "python": platform.python_version()}
    for name in ("numpy", "scikit-learn", "keras", "h5py", "tensorflow", "tensorflow-cpu"):
        try:
            versions[name.replace("-cpu", "")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclasses.dataclass
class Bundle:
    """A trained model and what it needs to predict.

    Attributes
    ----------
    classifier : estimator
        Fitted scikit-learn estimator (a pipeline) taking the feature vectors.
    label_encoder : sklearn.preprocessing.LabelEncoder
        Maps class indices to names.
    meta : FeatureMeta or CombinedMeta
        How the training features were made (one extractor, or several concatenated); prediction
        must make them the same way.
    name : str
        The classifier's registry name.
    info : dict
        Grid-search results (best parameters, CV score), fit time and the like.
    novelty : NoveltyDetector or None
        Decides when an image belongs to none of the classes ("unknown").
    backbone_weights : list of ndarray or None
        A fine-tuned backbone's weights (``meta.weights == "finetuned"``); None when the backbone's
        weights are named by ``meta`` (ImageNet, random or a local file).
    """

    classifier: Any
    label_encoder: Any
    meta: FeatureMeta | CombinedMeta
    name: str
    info: dict = dataclasses.field(default_factory=dict)
    novelty: Any = None
    backbone_weights: list | None = None
    versions: dict = dataclasses.field(default_factory=library_versions)
    created: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    format_version: int = FORMAT_VERSION

    @property
    def label_names(self) -> list[str]:
        return [str(c) for c in self.label_encoder.classes_]

    def save(self, path: str | Path) -> Path:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        atomic_joblib_dump(path, {"pyimagesearch_tl_bundle": fields})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Load a bundle; warn when it was saved with other library versions. Trusted files only."""
        import joblib

        path = Path(path)
        if not path.is_file():
            raise BundleError(f"model bundle {str(path)!r} does not exist")
        try:
            payload = joblib.load(path)
        except Exception as exc:
            raise BundleError(f"{path}: not a readable model bundle ({type(exc).__name__}: {exc})") from None
        if not isinstance(payload, dict) or "pyimagesearch_tl_bundle" not in payload:
            raise BundleError(f"{path}: not a pyimagesearch_tl model bundle")
        fields = payload["pyimagesearch_tl_bundle"]
        if fields.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{path}: bundle format {fields.get('format_version')} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        bundle = cls(**fields)
        current = library_versions()
        for library in ("scikit-learn", "numpy", "keras", "pyimagesearch_tl"):
            saved = bundle.versions.get(library)
            if saved and saved != current.get(library):
                warnings.warn(
                    f"{path.name} was saved with {library} {saved}; this is {library} {current.get(library)}. "
                    "Predictions may differ; retrain if in doubt.",
                    stacklevel=2,
                )
        return bundle

    # --- predicting from features ---------------------------------------------------------------

    @property
    def score_kind(self) -> str:
        """What :meth:`scores` gives: ``"probability"`` or ``"decision"`` (values of the decision function)."""
        return "probability" if hasattr(self.classifier, "predict_proba") else "decision"

    def scores(self, features: np.ndarray) -> tuple[np.ndarray, str]:
        """Per-class scores ``(n, classes)`` and their kind (:attr:`score_kind`)."""
        features = np.asarray(features, dtype=self.meta.dtype)
        if self.score_kind == "probability":
            return self.classifier.predict_proba(features), "probability"
        decision = self.classifier.decision_function(features)
        if decision.ndim == 1:
            decision = np.column_stack([-decision, decision])
        return decision, "decision"

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The classifier's per-class scores before any softmax, ``(n, classes)``: what the detectors that
        read the classifier's evidence (energy) use. A binary decision ``d`` becomes ``[-d/2, d/2]``, whose
        softmax is the classifier's own probability."""
        return decision_logits(self.classifier, np.asarray(features, dtype=self.meta.dtype))

    def feature_extractor(self, batch_size: int = 32, max_pixels: int | None = None, runtime: str = "auto"):
        """Rebuild the :class:`~pyimagesearch_tl.features.FeatureExtractor` this bundle was trained on.

        Built from the bundle's feature meta (and its fine-tuned backbone weights, if any), never from
        the configuration; refused with a :class:`BundleError` when it cannot be rebuilt or would
        make features of another layout.
        """
        from .errors import ConfigError
        from .features import CombinedExtractor, FeatureExtractor
        from .images import MAX_PIXELS

        parts = []
        for part in self.meta.parts:  # one extractor, or one per feature folder of a combined model
            try:
                parts.append(
                    FeatureExtractor.from_meta(
                        part, batch_size, max_pixels or MAX_PIXELS, self.backbone_weights, runtime
                    )
                )
            except ConfigError:  # a runtime that is not installed: the user's choice, not the bundle's fault
                raise
            except Exception as exc:  # unknown backbone, weights file gone or not downloadable, ...
                raise BundleError(
                    f"cannot rebuild the feature extractor {part.describe()} of this bundle: {exc}"
                ) from None
        extractor = parts[0] if len(parts) == 1 else CombinedExtractor(parts)
        self.check_features(extractor.meta, "the rebuilt feature extractor")
        return extractor

    def check_features(self, meta: FeatureMeta | CombinedMeta, what: str) -> None:
        """Refuse features made differently from the training features."""
        from .errors import FeatureFileError
        from .store import check_same_layout

        try:
            check_same_layout(self.meta, meta, what)
        except FeatureFileError as exc:
            raise BundleError(f"{exc} (the model was trained on {self.meta.describe()})") from None


def decision_logits(classifier, features: np.ndarray) -> np.ndarray:
    """``classifier``'s per-class scores before any softmax, ``(n, classes)`` (see :meth:`Bundle.logits`)."""
    decision = classifier.decision_function(features)
    return np.column_stack([-decision / 2, decision / 2]) if decision.ndim == 1 else decision
