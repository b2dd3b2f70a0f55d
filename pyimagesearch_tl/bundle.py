"""Model bundles: everything prediction needs, in one file, written atomically.

A bundle holds the fitted classifier, the label encoder, the :class:`~pyimagesearch_tl.store.FeatureMeta`
of the features it was trained on (backbone, weights, pooling, input size, preprocessing, decoder),
the grid-search result and the library versions. Prediction rebuilds the backbone from the bundle,
never from defaults.

A bundle file (``<name>.skops``, :data:`BUNDLE_SUFFIX`) is written with ``skops.io``: a zip of JSON and
NumPy arrays that names the type of every object in it. Loading builds only the types skops trusts by
default (built-in containers and numbers, NumPy arrays, scikit-learn's estimators) and this package's
own (:func:`trusted_types`); a file naming any other type is refused, naming it, before anything in it
is built, so a bundle cannot run code by being loaded. What it holds is then checked field by field
(:class:`Bundle`'s fields say what each must be).

Bundles saved before skops are joblib pickles, and unpickling runs whatever code the file holds: they
are loaded only when asked with ``trust_pickle=True`` (``--trust-pickle`` on the command line), and
``ptl convert-bundle --trust-pickle`` re-saves one as skops. The format is told by the content (a zip
is skops, a pickle opcode a pickle; a zip cut short, or anything else, is refused as such), never by the
file's name.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import platform
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._version import __version__
from .atomic import atomic_path
from .errors import BundleError, FeatureFileError
from .novelty import Detector
from .quantization import network_problem
from .store import CombinedMeta, FeatureMeta

FORMAT_VERSION = 1
#: The name ending of bundle files (``<classifier>.skops``, ``finetune.skops``).
BUNDLE_SUFFIX = ".skops"
#: The one entry of a bundle file: its fields, by name.
PAYLOAD_KEY = "pyimagesearch_tl_bundle"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour a bundle depends on (read without importing them)."""
    from importlib import metadata

    versions = {"pyimagesearch_tl": __version__, "python": platform.python_version()}
    for name in ("numpy", "scikit-learn", "skops", "keras", "h5py", "tensorflow", "tensorflow-cpu"):
        try:
            versions[name.replace("-cpu", "")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _subclasses(base: type) -> set[type]:
    found = set()
    for subclass in base.__subclasses__():
        found |= {subclass} | _subclasses(subclass)
    return found


def _type_name(kind: type) -> str:
    """A type's name as skops writes it in a file: ``module.Name``."""
    return f"{kind.__module__}.{kind.__name__}"


def trusted_types() -> list[type]:
    """The types a bundle may hold besides those skops trusts by default.

    Derived, not listed: the estimator of every entry of the classifier registry
    (:func:`~pyimagesearch_tl.classifiers.list_classifiers`; scikit-learn's are trusted by default
    anyway, a registered one from elsewhere is trusted here), every :class:`~pyimagesearch_tl.novelty.Detector`
    subclass (the detectors of :data:`~pyimagesearch_tl.novelty.DETECTORS`, the combination that
    holds two of them, and the older classes still read from old bundles), plus the three types no
    registry holds: :class:`~pyimagesearch_tl.classifiers.DenseHead` (a fine-tuned network's head),
    :class:`~pyimagesearch_tl.store.FeatureMeta` and :class:`~pyimagesearch_tl.store.CombinedMeta`.
    """
    from .classifiers import DenseHead, get_classifier, list_classifiers

    estimators = {type(get_classifier(name).make(0, None)) for name in list_classifiers()}
    kinds = estimators | _subclasses(Detector) | {DenseHead, FeatureMeta, CombinedMeta}
    return sorted(kinds, key=_type_name)


def _untrusted(data: bytes | None = None, file: Path | None = None) -> list[str]:
    """The types named in a skops file or its bytes that a bundle may not hold, sorted."""
    import skops.io

    trusted = {_type_name(kind) for kind in trusted_types()}
    return sorted(set(skops.io.get_untrusted_types(data=data, file=file)) - trusted)


def _read_skops(path: Path) -> Any:
    """What the skops file ``path`` holds, built only if every type it names is trusted."""
    import skops.io
    from skops.io.exceptions import UntrustedTypesFoundException

    _check_unpacked_size(path)
    try:
        return skops.io.load(path, trusted=trusted_types())
    except zipfile.BadZipFile as exc:  # its directory reads, an entry does not
        raise BundleError(f"{path}: {DAMAGED} ({exc})") from None
    except UntrustedTypesFoundException:
        raise BundleError(
            f"{path}: refused: it holds types a model bundle never holds ({', '.join(_untrusted(file=path))}); "
            "nothing in it was loaded"
        ) from None
    except Exception as exc:
        raise BundleError(f"{path}: not a readable model bundle ({type(exc).__name__}: {exc})") from None


#: A bundle unpacks to at most this many times its size on disk, plus :data:`UNPACKED_SLACK` bytes: its
#: arrays barely compress, so only a zip bomb (a schema of gigabytes of blanks) comes near it.
UNPACKED_RATIO, UNPACKED_SLACK = 16, 64 * 2**20


def _check_unpacked_size(path: Path) -> None:
    """Refuse a zip whose members would unpack to far more than a bundle of its size holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(member.file_size for member in archive.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: not a readable model bundle ({exc})") from None
    if unpacked > UNPACKED_RATIO * path.stat().st_size + UNPACKED_SLACK:
        raise BundleError(
            f"{path}: refused: it would unpack to {unpacked / 2**20:.0f} MiB from {path.stat().st_size / 2**20:.1f} "
            "MiB on disk, far more than a model bundle holds (a zip bomb?); nothing in it was loaded"
        )


DAMAGED = f"a damaged {BUNDLE_SUFFIX} bundle, nothing in it was loaded: copy it again whole, or train again"
#: How each format's files begin: a zip's first entry (skops), a pickle's protocol opcode (2 and later, as
#: joblib wrote bundles before skops).
ZIP_SIGNATURE, PICKLE_SIGNATURE = b"PK\x03\x04", b"\x80"


def _format(path: Path) -> str:
    """``"skops"`` or ``"pickle"``, told by the content; a zip cut short, or neither format, is a :class:`BundleError`
    (never passed to the pickle reader, whose refusal would suggest trusting it)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(ZIP_SIGNATURE))
    except OSError as exc:
        raise BundleError(f"{path}: not a readable model bundle ({exc})") from None
    if zipfile.is_zipfile(path):
        return "skops"
    if head.startswith(ZIP_SIGNATURE):
        raise BundleError(f"{path}: {DAMAGED} (a zip archive cut short)")
    if head.startswith(PICKLE_SIGNATURE):
        return "pickle"
    raise BundleError(
        f"{path}: not a model bundle (neither a {BUNDLE_SUFFIX} archive nor a pickle bundle of an earlier version)"
    )


def _read_pickle(path: Path, trust_pickle: bool) -> Any:
    """What the pickle ``path`` holds, when its reader trusts it (unpickling runs the code it holds)."""
    import joblib

    if not trust_pickle:
        raise BundleError(
            f"{path} is not a {BUNDLE_SUFFIX} bundle: read as a pickle (how bundles were saved before), it could run "
            "any code it holds, so it is refused. If you trust its source, load it with --trust-pickle "
            f"(trust_pickle=True in Python), or convert it once: ptl convert-bundle --trust-pickle --model {path}"
        )
    try:
        return joblib.load(path)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable model bundle ({type(exc).__name__}: {exc})") from None


def _field(check: Callable[[Any], bool], must_be: str, **options) -> Any:
    """A :class:`Bundle` field with what a loaded bundle's value must be (``check``, and in words)."""
    return dataclasses.field(metadata={"check": check, "must_be": must_be}, **options)


def _is_classifier(value) -> bool:
    return hasattr(value, "predict") and (hasattr(value, "predict_proba") or hasattr(value, "decision_function"))


def _is_label_encoder(value) -> bool:
    from sklearn.preprocessing import LabelEncoder

    return isinstance(value, LabelEncoder) and hasattr(value, "classes_")


def _is_weights(value) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(array, np.ndarray) for array in value))


def _is_versions(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


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
    novelty : Detector or None
        Decides when an image belongs to none of the classes ("unknown").
    backbone_weights : list of ndarray or None
        A fine-tuned backbone's weights (``meta.weights == "finetuned"``); None when the backbone's
        weights are named by ``meta`` (ImageNet, random or a local file).
    network : bytes or None
        int8 features: the quantized network that made them (its SHA-256 is ``meta.network_sha256``).
    versions : dict of str to str
        The library versions it was saved with (:func:`library_versions`).
    created : str
        When it was made (ISO 8601, UTC).
    format_version : int
        :data:`FORMAT_VERSION` of the fields: a file of another one is refused.
    """

    classifier: Any = _field(_is_classifier, "a fitted classifier (with predict_proba or decision_function)")
    label_encoder: Any = _field(_is_label_encoder, "a fitted LabelEncoder")
    meta: FeatureMeta | CombinedMeta = _field(
        lambda value: isinstance(value, (FeatureMeta, CombinedMeta)), "a FeatureMeta or CombinedMeta"
    )
    name: str = _field(lambda value: isinstance(value, str), "a str")
    info: dict = _field(lambda value: isinstance(value, dict), "a dict", default_factory=dict)
    novelty: Any = _field(
        lambda value: value is None or isinstance(value, Detector), "a Detector or None", default=None
    )
    backbone_weights: list | None = _field(_is_weights, "a list of arrays or None", default=None)
    network: bytes | None = _field(
        lambda value: value is None or isinstance(value, bytes), "bytes or None", default=None
    )
    versions: dict = _field(_is_versions, "a dict of str to str", default_factory=library_versions)
    created: str = _field(
        lambda value: isinstance(value, str),
        "a str",
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    format_version: int = _field(lambda value: type(value) is int, "an int", default=FORMAT_VERSION)

    @property
    def label_names(self) -> list[str]:
        return [str(c) for c in self.label_encoder.classes_]

    def save(self, path: str | Path) -> Path:
        """Write the bundle to ``path`` as a skops file, atomically (whatever the name's ending).

        Refused with a :class:`BundleError` when it holds a type :meth:`load` would refuse (an estimator
        from outside the registries), so that no bundle is saved that cannot be loaded.
        """
        import skops.io

        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        try:
            data = skops.io.dumps({PAYLOAD_KEY: fields})
        except Exception as exc:  # a type skops cannot write
            raise BundleError(f"cannot save {path}: {type(exc).__name__}: {exc}") from None
        untrusted = _untrusted(data=data)
        if untrusted:
            raise BundleError(
                f"cannot save {path}: it holds types a bundle may not hold ({', '.join(untrusted)}), "
                "so it could not be loaded again"
            )
        with atomic_path(path) as temporary:
            temporary.write_bytes(data)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, *, trust_pickle: bool = False) -> "Bundle":
        """Load a bundle and check what it holds; warn when it was saved with other library versions.

        Parameters
        ----------
        path : str or Path
            A skops bundle (a zip), or an older pickle bundle (told by the content, never the name).
        trust_pickle : bool
            Load a pickle bundle, whose loading runs any code it holds: only for files from a trusted
            source. Without it, a pickle is refused with a :class:`BundleError` saying how to convert it.

        Raises
        ------
        BundleError
            The file is missing, unreadable, a pickle not trusted, a skops file naming a type a bundle
            never holds (nothing in it is built), or holds other fields than :class:`Bundle`'s (missing,
            extra, of the wrong type, of another :data:`FORMAT_VERSION`).
        """
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"model bundle {str(path)!r} does not exist")
        payload = _read_skops(path) if _format(path) == "skops" else _read_pickle(path, trust_pickle)
        bundle = cls(**cls._checked_fields(payload, path))
        bundle._check_scores(path)
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

    @classmethod
    def _checked_fields(cls, payload: Any, path: Path) -> dict:
        """The fields in ``payload``, exactly :class:`Bundle`'s and each what it must be, or a :class:`BundleError`."""
        if not isinstance(payload, dict):
            kind = type(payload).__name__
            raise BundleError(f"{path}: not a pyimagesearch_tl model bundle (it holds an object of type {kind})")
        if set(payload) != {PAYLOAD_KEY}:
            raise BundleError(
                f"{path}: not a pyimagesearch_tl model bundle (its entries are {sorted(map(str, payload))}; "
                f"a bundle has one, {PAYLOAD_KEY!r})"
            )
        fields = payload[PAYLOAD_KEY]
        if not isinstance(fields, dict):
            raise BundleError(f"{path}: not a valid model bundle: its fields are a {type(fields).__name__}, not a dict")
        if fields.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:  # a missing one is named below
            raise BundleError(
                f"{path}: bundle format {fields['format_version']!r} is not supported "
                f"(this version reads {FORMAT_VERSION})"
            )
        declared = {field.name: field for field in dataclasses.fields(cls)}
        optional = {name for name, field in declared.items() if field.default is not dataclasses.MISSING}
        fields = dict(fields)
        for name in optional - set(fields):  # a field added after the bundle was saved: its default
            fields[name] = declared[name].default
        missing, extra = sorted(set(declared) - set(fields)), sorted(map(str, set(fields) - set(declared)))
        if missing or extra:
            problems = [f"missing field(s) {', '.join(missing)}"] if missing else []
            problems += [f"unexpected field(s) {', '.join(extra)}"] if extra else []
            raise BundleError(f"{path}: not a valid model bundle: {'; '.join(problems)}")
        for name, field in declared.items():
            if not field.metadata["check"](fields[name]):
                raise BundleError(
                    f"{path}: not a valid model bundle: field {name!r} is a {type(fields[name]).__name__}, "
                    f"not {field.metadata['must_be']}"
                )
        cls._check_consistent(fields, path)
        return fields

    @staticmethod
    def _check_consistent(fields: dict, path: Path) -> None:
        """The fields agree with each other: the feature layout is one a feature file may hold (the same
        checks and bounds, so a bundle cannot ask for a 200000-pixel input), and the label encoder, the
        layout and the classifier name the same number of classes and features."""
        meta = fields["meta"]
        try:
            for part in meta.parts:
                FeatureMeta.from_attrs(part.to_attrs(), path)
        except FeatureFileError as exc:
            raise BundleError(str(exc).replace("its metadata", "its feature layout")) from None
        names = [str(c) for c in fields["label_encoder"].classes_]
        problems = []
        if names != list(meta.label_names):
            problems.append(f"its label encoder names {names} but its feature layout {list(meta.label_names)}")
        classifier = fields["classifier"]
        classes = getattr(classifier, "classes_", None)
        if classes is not None and len(classes) != len(names):
            problems.append(f"its classifier knows {len(classes)} classes, not {len(names)}")
        width = getattr(classifier, "n_features_in_", None)
        if width is not None and width != meta.feature_dim:
            problems.append(f"its classifier takes {width} features, not the layout's {meta.feature_dim}")
        network = fields.get("network")
        if "int8" in meta.precision and len(meta.parts) > 1:
            problems.append("its int8 feature layout is combined with another (int8 takes one feature folder)")
        elif meta.precision == "int8" and (
            network is None or hashlib.sha256(network).hexdigest() != meta.network_sha256
        ):
            problems.append("its quantized network is missing or not the one its int8 feature layout names")
        elif meta.precision == "int8":
            problem = network_problem(network, meta.input_size, meta.feature_dim)
            problems += [f"its quantized network {problem}"] if problem else []
        elif network is not None:
            problems.append(f"it carries a quantized network but its feature layout is {meta.precision}")
        if problems:
            raise BundleError(f"{path}: not a valid model bundle: {'; '.join(problems)}")

    def _check_scores(self, path: Path) -> None:
        """Score one vector of the feature layout, as prediction will: a classifier or detector whose insides
        do not fit the layout (arrays of another width, a threshold that is not a number) is refused here,
        in one line, not with a traceback at the first photo."""
        probe = np.zeros((1, self.meta.feature_dim), self.meta.dtype)
        try:
            scores, _ = self.scores(probe)
            logits = self.logits(probe)
            if self.novelty is not None:
                self.novelty.assess(probe, logits)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise BundleError(
                f"{path}: not a valid model bundle: it cannot score a feature vector ({reason})"
            ) from None
        if np.shape(scores) != (1, len(self.label_names)):
            raise BundleError(
                f"{path}: not a valid model bundle: it gives {np.shape(scores)[-1]} scores "
                f"for {len(self.label_names)} classes"
            )

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
                        part, batch_size, max_pixels or MAX_PIXELS, self.backbone_weights, runtime, self.network
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
