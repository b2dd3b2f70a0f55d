"""The user's cache folder: converted weights, converted networks, downloaded demo data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyimagesearch_tl`` (``~/.cache/pyimagesearch_tl`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyimagesearch_tl"
