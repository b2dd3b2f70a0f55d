"""Figures written as PNG files, without pyplot: a notebook's plotting backend is never touched.

Every plot of the package (confusion matrices, ROC curves, the comparison, learning curves) is a
:class:`matplotlib.figure.Figure` made here and written by :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path


def new_figure(**options):
    """A detached :class:`~matplotlib.figure.Figure` (``figsize`` and the like as for pyplot's)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def save_figure(figure, path: Path) -> str:
    """Write ``figure`` as PNG atomically; the path written."""
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    return str(path)
