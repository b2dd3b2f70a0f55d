"""pyimagesearch_tl: transfer learning by feature extraction.

From Python (the ``ptl`` command calls the same functions)::

    import pyimagesearch_tl as ptl

    ds = ptl.build_dataset("photos/", "output/dataset")
    feats = ptl.extract(ds, "output/features")
    X, y = feats["training"].load()
    model = ptl.train(feats, "output/models", classifier="logreg")
    model.evaluate(feats["validation"])
    model.predict(["new.jpg"])

or as a scikit-learn transformer: ``make_pipeline(ptl.ImageFeatures(), StandardScaler(), LogisticRegression())``.

The package mirrors the pipeline, one module per arrow of the data flow (README, "Project layout")::

    photos ──layouts──▶ dataset/<split>/<class>/ + manifest.csv
           ──images──▶ backbones ──features/extraction/store──▶ <split>.h5
           ──classifiers/training──▶ bundle ──evaluation / prediction──▶ metrics, labels
"""

# TensorFlow's C++ log lines go to stderr before any of ours: its level is set before TensorFlow is
# first imported (an explicit TF_CPP_MIN_LOG_LEVEL wins), and the lines its libraries print while they
# load, whatever the level, are filtered out of that first import (see quiet.py).
from . import quiet

quiet.set_default_log_level()
quiet.install()

from ._version import __version__  # noqa: E402
from .api import (  # noqa: E402
    Dataset,
    FeatureFile,
    Features,
    Model,
    audit,
    build_dataset,
    configure,
    extract,
    load_model,
    train,
)
from .config import Config, load_config  # noqa: E402
from .errors import BundleError, ConfigError, DatasetError, FeatureFileError, ImageError, PTLError  # noqa: E402


def __getattr__(name):
    # The estimators import scikit-learn; load them when asked for, not on every import of the package.
    if name in ("ImageFeatures", "UnknownDetector"):
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'pyimagesearch_tl' has no attribute {name!r}")


__all__ = [
    "BundleError",
    "Config",
    "ConfigError",
    "Dataset",
    "DatasetError",
    "FeatureFile",
    "FeatureFileError",
    "Features",
    "ImageError",
    "ImageFeatures",
    "Model",
    "PTLError",
    "__version__",
    "audit",
    "build_dataset",
    "configure",
    "extract",
    "load_model",
    "load_config",
    "train",
    "UnknownDetector",
]
