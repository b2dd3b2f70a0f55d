"""The Python way in: the pipeline's stages as functions, for notebooks and scripts.

::

    import pyimagesearch_tl as ptl

    ds = ptl.build_dataset("photos/", "output/dataset")          # a Dataset
    feats = ptl.extract(ds, "output/features")                   # Features: one FeatureFile per split
    X, y = feats["training"].load()                              # NumPy arrays
    model = ptl.train(feats, "output/models", classifier="logreg")   # a Model (a bundle)
    model.evaluate(feats["validation"])["accuracy"]
    model.predict(["new.jpg"])[0].label
    ptl.load_model("output/models/logreg.skops")

Every function takes the same settings as the ``ptl`` command, as keyword overrides of the
configuration (``backbone="efficientnet_lite2"``, ``batch_size=16``, ...) or a whole
:class:`~pyimagesearch_tl.config.Config` (``config=``); a wrong value raises the same
:class:`~pyimagesearch_tl.errors.ConfigError`, with the same message, as the command line. The
``ptl`` subcommands call these functions and only print what they return.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .bundle import Bundle
from .config import Config, load_config
from .errors import ConfigError
from .layouts import BuildReport, read_manifest
from .store import FeatureMeta, FeatureSet, combine, feature_file, has_feature_file, read_features, read_meta

__all__ = [
    "audit",
    "Dataset",
    "FeatureFile",
    "Features",
    "Model",
    "build_dataset",
    "configure",
    "extract",
    "load_model",
    "load_predictor",
    "train",
]


def configure(config: Config | None = None, **overrides: Any) -> Config:
    """The configuration: ``config`` (default: the defaults) with ``overrides`` applied and validated.

    ``None`` values mean "not given", as an option left out on the command line.
    """
    return (config if config is not None else load_config()).replace(**overrides)


def _with(overrides: dict[str, Any], **given: Any) -> dict[str, Any]:
    """``overrides`` plus the folders given as arguments (an argument left out keeps the override)."""
    folders = {
        key: value if isinstance(value, list) else str(value) for key, value in given.items() if value is not None
    }
    return dict(overrides, **folders)


def _folder(value: Any) -> Path | list[str]:
    """A folder given as a path or as one of this module's results (which know their folder); a list
    of them (feature folders to combine) gives a list."""
    if isinstance(value, (list, tuple)):
        return [str(_folder(item)) for item in value]
    return Path(value.path if isinstance(value, (Dataset, Features)) else value)


# --- build-dataset -------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
    """A dataset folder written by :func:`build_dataset`: ``<split>/<class>/`` images and ``manifest.csv``.

    Attributes
    ----------
    path : Path
    report : BuildReport or None
        What the build did (layout, counts, skipped and duplicate images); None for a folder opened
        with :meth:`open`.
    """

    path: Path
    report: BuildReport | None = None

    @classmethod
    def open(cls, path: str | Path) -> "Dataset":
        """An existing dataset folder (checked: it must hold a manifest)."""
        dataset = cls(Path(path))
        dataset.manifest()
        return dataset

    def manifest(self) -> list[dict[str, str]]:
        """The manifest rows: path, split, label, sha256, width, height."""
        return read_manifest(self.path)

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and label."""
        counts: dict[str, dict[str, int]] = {}
        for row in self.manifest():
            split = counts.setdefault(row["split"], {})
            split[row["label"]] = split.get(row["label"], 0) + 1
        return counts


def build_dataset(
    input_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    wait: bool = False,
    **overrides: Any,
) -> Dataset:
    """Build ``<output_dir>/<split>/<class>/`` and ``manifest.csv`` from a folder of photos.

    Parameters
    ----------
    input_dir : path
        The photos: class folders (with or without split folders), Food-5K names, or a labels file.
    output_dir : path, optional
        Default: the configuration's ``dataset_dir``.
    config : Config, optional
    wait : bool
        Queue behind another run writing ``output_dir`` instead of refusing.
    **overrides
        Configuration keys: ``layout``, ``classes``, ``labels_file``, ``split_files``, ``exclude``, ``splits``,
        ``split_fractions``, ``seed``, ``link``, ``max_image_pixels``; and where the photos are checked and
        hashed: ``engine``, ``shard_size``, ``ray_address``, ``ray_cpus_per_worker``.
    """
    from .layouts import build_dataset as build

    config = configure(config, **_with(overrides, input_dir=input_dir, dataset_dir=output_dir))
    if not config.input_dir:
        raise ConfigError("no input folder: give --input DIR (or input_dir in the config file)")
    report = build(
        config.input_dir,
        config.dataset_dir,
        splits=config.splits,
        fractions=config.split_fractions,
        layout=config.layout,
        classes=config.classes,
        labels_file=config.labels_file,
        split_files=config.split_files,
        exclude=config.exclude,
        seed=config.seed,
        link=config.link,
        max_pixels=config.max_image_pixels,
        engine=config.engine,
        shard_size=config.shard_size,
        ray_address=config.ray_address,
        ray_cpus_per_worker=config.ray_cpus_per_worker,
        wait=wait,
    )
    return Dataset(Path(config.dataset_dir), report)


# --- extract -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureFile:
    """One split's finished feature file (``<split>.h5`` or ``.csv``)."""

    path: Path

    @property
    def split(self) -> str:
        return self.path.name.split(".")[0]

    @property
    def meta(self) -> FeatureMeta:
        """How the features were made (backbone, weights, pooling, decoder, label names, ...)."""
        return read_meta(self.path)

    @property
    def label_names(self) -> list[str]:
        return list(self.meta.label_names)

    def read(self) -> FeatureSet:
        """Features, labels, image paths, content hashes and metadata."""
        return read_features(self.path)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)``: the feature matrix and the integer labels (indices into :attr:`label_names`)."""
        features = self.read()
        return features.features, features.labels


@dataclasses.dataclass
class Features(Mapping):
    """A features folder written by :func:`extract`: a read-only mapping split -> :class:`FeatureFile`.

    Attributes
    ----------
    path : Path
    reports : list
        What each split's extraction did (:class:`~pyimagesearch_tl.extraction.SplitReport`); empty for
        a folder opened with :meth:`open`.
    """

    path: Path
    reports: list = dataclasses.field(default_factory=list)

    @classmethod
    def open(cls, path: str | Path) -> "Features":
        """An existing features folder (checked: it must hold at least one finished feature file)."""
        features = cls(Path(path))
        if not len(features):
            feature_file(path, "training")  # raises the precise error: missing, unfinished or empty
        return features

    def __getitem__(self, split: str) -> FeatureFile:
        return FeatureFile(feature_file(self.path, split))

    def __iter__(self) -> Iterator[str]:
        if not self.path.is_dir():
            return iter(())
        names = sorted({p.name.split(".")[0] for p in self.path.iterdir() if p.is_file()})
        return iter([name for name in names if has_feature_file(self.path, name)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def extract(
    dataset: Dataset | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    wait: bool = False,
    progress: bool = False,
    on_split: Callable | None = None,
    on_engine: Callable | None = None,
    **overrides: Any,
) -> Features:
    """Extract one feature file per split of ``dataset`` with a pretrained backbone.

    Reruns reuse what is done: an up-to-date split is not touched, unchanged images are not
    recomputed, an interrupted run resumes from its finished shards.

    Parameters
    ----------
    dataset : Dataset or path, optional
        Default: the configuration's ``dataset_dir``.
    output_dir : path, optional
        Default: the configuration's ``features_dir``.
    config : Config, optional
    wait : bool
        Queue behind another run writing ``output_dir`` instead of refusing.
    progress : bool
        Show a progress bar per split (on stderr).
    on_split, on_engine : callable, optional
        Called with each split's report as it finishes, and with the engine once it has started.
    **overrides
        Configuration keys: ``backbone``, ``weights``, ``pooling``, ``feature_format``, ``dtype``,
        ``precision``, ``batch_size``, ``runtime``, ``views``, ``resize``, ``engine``, ``shard_size``, ...
    """
    from .extraction import extract_dataset

    folder = None if dataset is None else _folder(dataset)
    config = configure(config, **_with(overrides, dataset_dir=folder, features_dir=output_dir))
    if isinstance(config.features_dir, list):
        raise ConfigError(
            "extract writes one feature folder; give one output folder per backbone and run it per folder"
        )
    reports = extract_dataset(
        config.dataset_dir,
        config.features_dir,
        splits=config.splits,
        backbone=config.backbone,
        weights=config.weights,
        pooling=config.pooling,
        feature_format=config.feature_format,
        dtype=config.dtype,
        precision=config.precision,
        batch_size=config.batch_size,
        max_pixels=config.max_image_pixels,
        runtime=config.runtime,
        views=config.views,
        resize=config.resize,
        engine=config.engine,
        ray_address=config.ray_address,
        ray_cpus_per_worker=config.ray_cpus_per_worker,
        shard_size=config.shard_size,
        wait=wait,
        progress=progress,
        on_split=on_split,
        on_engine=on_engine,
    )
    return Features(Path(config.features_dir), reports)


# --- train, evaluate, predict ------------------------------------------------------------------


class Model:
    """A trained model: a :class:`~pyimagesearch_tl.bundle.Bundle` with the calls a notebook wants.

    Attributes
    ----------
    bundle : Bundle
        Classifier, label encoder, feature layout, "unknown" detector, library versions.
    path : Path or None
        Where the bundle is saved.
    report : TrainReport or None
        The grid search's result when this model was just trained.
    """

    def __init__(self, bundle: Bundle, path: Path | None = None, report=None, config: Config | None = None):
        self.bundle, self.path, self.report = bundle, path, report
        self.config = config if config is not None else load_config()
        self._predictors: dict[int, Any] = {}

    def __repr__(self) -> str:
        return f"Model({self.bundle.name!r}, classes={self.label_names}, {self.bundle.meta.describe()})"

    @property
    def label_names(self) -> list[str]:
        return self.bundle.label_names

    def predictor(self, top_k: int = 3):
        """The :class:`~pyimagesearch_tl.prediction.Predictor` of this model (built once per ``top_k``)."""
        from .prediction import Predictor

        if top_k not in self._predictors:
            config = self.config
            self._predictors[top_k] = Predictor(
                self.bundle, config.batch_size, config.max_image_pixels, top_k, config.runtime
            )
        return self._predictors[top_k]

    def predict(self, images: Sequence[str | Path] | str | Path, top_k: int = 3) -> list:
        """Classify image files (and the images in folders), decoded and featurised exactly as in training.

        Returns
        -------
        list of Prediction
            One per image, in order: ``label`` (a class, ``"unknown"``, or None when the file could
            not be read, with ``error`` saying why), ``score``, ``top`` and ``familiarity``.
        """
        from .prediction import expand_paths

        files = expand_paths([images] if isinstance(images, (str, Path)) else images)
        return self.predictor(top_k).predict(files)

    def predict_many(
        self,
        images: Sequence[str | Path] | str | Path = (),
        output: str | Path | None = None,
        *,
        file_list: str | Path | None = None,
        top_k: int = 3,
        wait: bool = False,
        progress: bool = False,
        **overrides: Any,
    ):
        """Classify a photo archive of any size, as ``ptl predict`` does: in shards, on the configured engine
        (``engine="ray"`` for a Ray cluster), resumable when written to ``output``.

        Parameters
        ----------
        images : path, pattern or list of them
            Files, folders and glob patterns; ``file_list`` names more, one per line.
        output : path, optional
            ``*.csv``, ``*.parquet`` or ``*.json``, one row per photo (see
            :data:`~pyimagesearch_tl.bulk_prediction.COLUMNS`); the same call resumes an interrupted run.
        overrides
            ``engine``, ``shard_size``, ``ray_address``, ``ray_cpus_per_worker``, ``runtime``,
            ``batch_size``, ``max_image_pixels``: as in the configuration.

        Returns
        -------
        PredictReport
            Counts, skipped photos with their reasons, shards done and resumed, where it ran.
        """
        from .bulk_prediction import PredictionRun

        if self.path is None:
            raise ConfigError("predict_many reads the model from its file: save() it first")
        config = configure(self.config, **overrides)
        return PredictionRun.from_config(
            config,
            self.path,
            [images] if isinstance(images, (str, Path)) else images,
            output,
            file_list=file_list,
            top_k=top_k,
        ).execute(wait=wait, progress=progress)

    def evaluate(
        self,
        data: FeatureFile | FeatureSet | str | Path | Sequence[FeatureFile | str | Path],
        output_dir: str | Path | None = None,
        *,
        wait: bool = False,
    ) -> dict:
        """Accuracy, confusion matrix, classification report, ROC AUC and macro F1 on a feature file.

        ``data`` is a :class:`FeatureFile` (``features["evaluation"]``), its path, or a loaded
        feature set; its features must be made as the model's were (else a
        :class:`~pyimagesearch_tl.errors.BundleError` names the difference). With ``output_dir``,
        ``metrics.json`` and the plots are written there.
        """
        from .evaluation import evaluate

        if isinstance(data, (list, tuple)):  # one file per feature folder of a combined model
            files = [item if isinstance(item, FeatureFile) else FeatureFile(Path(item)) for item in data]
            split = files[0].split
            features = combine([f.read() for f in files], [str(f.path) for f in files])
        else:
            if isinstance(data, (str, Path)):
                data = FeatureFile(Path(data))
            split = data.split if isinstance(data, FeatureFile) else ""
            features = data.read() if isinstance(data, FeatureFile) else data
        return evaluate(self.bundle, features, output_dir, split, self.path, wait=wait)

    def save(self, path: str | Path) -> Path:
        """Write the bundle (atomically) to ``path``; :func:`load_model` reads it back."""
        self.path = self.bundle.save(path)
        return self.path


def audit(
    features: Features | str | Path | None = None,
    dataset: Dataset | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    wait: bool = False,
    **overrides: Any,
):
    """Find near-duplicate leaks, likely label errors and outliers in a features folder.

    Parameters
    ----------
    features : Features or path, optional
        Default: the configuration's ``features_dir``.
    dataset : Dataset or path, optional
        The dataset the features were extracted from (photos for calibration and contact sheets).
        Default: the configuration's ``dataset_dir``.
    output_dir : path, optional
        Where ``audit.csv``, ``audit.json`` and ``audit_<kind>.png`` go. Default: ``audit_dir``.

    Returns
    -------
    AuditReport
        ``rows`` (one dict per finding, as in audit.csv), ``summary`` (as audit.json), ``files``.
    """
    from .audit import audit as run_audit

    config = configure(
        config,
        **_with(
            overrides,
            features_dir=None if features is None else _folder(features),
            dataset_dir=None if dataset is None else _folder(dataset),
            audit_dir=output_dir,
        ),
    )
    if isinstance(config.features_dir, list):
        raise ConfigError("audit reads one feature folder")
    return run_audit(
        config.features_dir,
        config.dataset_dir,
        config.audit_dir,
        splits=config.splits,
        neighbour_search=config.neighbour_search,
        seed=config.seed,
        batch_size=config.batch_size,
        runtime=config.runtime,
        wait=wait,
    )


def load_model(
    path: str | Path, *, trust_pickle: bool = False, config: Config | None = None, **overrides: Any
) -> Model:
    """A model saved by :func:`train`, ``ptl train`` or ``ptl finetune``.

    ``trust_pickle=True`` also loads a bundle saved as a pickle (before ``.skops``), which runs any
    code the file holds: only for files from a source you trust (see :meth:`Bundle.load`).
    ``overrides`` set how it predicts (``runtime``, ``batch_size``, ``max_image_pixels``), never what.
    """
    return Model(Bundle.load(path, trust_pickle=trust_pickle), Path(path), config=configure(config, **overrides))


def load_predictor(
    path: str | Path, top_k: int = 3, *, trust_pickle: bool = False, config: Config | None = None, **overrides: Any
):
    """The predictor ``ptl predict`` and ``ptl serve`` use: of a bundle, or of an ``.onnx`` file from ``ptl export``.

    Parameters
    ----------
    path : str or Path
        A bundle (:func:`load_model`), or a file named ``*.onnx``: run in ONNX Runtime without importing
        TensorFlow (:class:`~pyimagesearch_tl.export.OnnxPredictor`: the label and top-k scores, never
        "unknown").
    top_k : int
        Classes listed per image.
    trust_pickle : bool
        As for :func:`load_model` (a bundle only).
    config, **overrides
        As for :func:`load_model`; an ``.onnx`` file takes ``runtime`` "auto" or "onnxruntime" only.

    Returns
    -------
    Predictor
        Its ``predict(paths)`` gives one :class:`~pyimagesearch_tl.prediction.Prediction` per image.
    """
    from .bulk_prediction import open_predictor

    config = configure(config, **overrides)
    return open_predictor(
        path,
        top_k,
        trust_pickle=trust_pickle,
        batch_size=config.batch_size,
        max_pixels=config.max_image_pixels,
        runtime=config.runtime,
    )


def train(
    features: Features | str | Path | None = None,
    output_dir: str | Path | None = None,
    *,
    config: Config | None = None,
    wait: bool = False,
    **overrides: Any,
) -> Model | dict[str, Model]:
    """Grid-search a classifier on the training split's features and save it as a bundle.

    Parameters
    ----------
    features : Features or path, or a list of them, optional
        Default: the configuration's ``features_dir``. Several folders extracted from the same
        dataset (e.g. by two backbones) are combined: their vectors are concatenated image by image.
    output_dir : path, optional
        Where ``<classifier>.skops`` goes. Default: the configuration's ``models_dir``.
    config : Config, optional
    wait : bool
        Queue behind another run writing ``output_dir`` instead of refusing.
    **overrides
        Configuration keys: ``classifier`` (a registered name, or ``"all"``), ``cv``, ``class_weight``,
        ``grids``, ``streaming``, ``unknown`` (the detector), ``unknown_keep``, ``seed``.

    Returns
    -------
    Model, or dict of name -> Model when ``classifier="all"``.
    """
    from .training import train as grid_search
    from .training import train_streaming

    given_cv = overrides.get("cv")
    folder = None if features is None else _folder(features)
    config = configure(config, **_with(overrides, features_dir=folder, models_dir=output_dir))
    if config.streaming and given_cv is not None:
        raise ConfigError(
            "--streaming selects on the validation split (or held-out training blocks); --cv does not apply to it"
        )
    splits = dict(training_split=config.split_for("training"), validation_split=config.split_for("validation"))
    common = dict(
        classifier=config.classifier,
        class_weight=config.class_weight,
        grids=config.grids,
        seed=config.seed,
        unknown_keep=config.unknown_keep,
        unknown=config.unknown,
        wait=wait,
        **splits,
    )
    if config.streaming:
        reports = [train_streaming(config.features_dir, config.models_dir, **common)]
    else:
        reports = grid_search(config.features_dir, config.models_dir, cv=config.cv, **common)
    models = {r.classifier: Model(Bundle.load(r.path), r.path, r, config) for r in reports}
    return models if config.classifier == "all" else models[config.classifier]
