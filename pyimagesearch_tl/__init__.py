"""pyimagesearch_tl: transfer learning by feature extraction.

The package mirrors the pipeline, one module per arrow of the data flow::

    photos ──layouts──▶ dataset/<split>/<class>/ + manifest.csv
           ──images──▶ backbones ──features/store──▶ <split>.h5
           ──classifiers/training──▶ bundle ──evaluation / prediction──▶ metrics, labels
"""

from ._version import __version__

__all__ = ["__version__"]
