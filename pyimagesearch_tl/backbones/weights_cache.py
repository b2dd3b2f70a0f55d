"""Converted weights, made once per source checkpoint and kept in the user's cache folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..atomic import atomic_path
from ..cache import cache_dir
from ..images import sha256_file


def converted_weights(name: str, checkpoint: Path, convert: Callable[[], object]) -> Path:
    """The cached Keras ``.weights.h5`` of ``checkpoint``, made by ``convert()`` on first use.

    ``convert`` returns the Keras model holding the converted weights. The cache file name carries
    the checkpoint's SHA-256 prefix, so a changed checkpoint never reuses a stale conversion; the
    file is written under a temporary name and renamed into place.
    """
    target = cache_dir() / "weights" / f"{name}-{sha256_file(checkpoint)[:12]}.weights.h5"
    if not target.exists():
        model = convert()
        with atomic_path(target) as partial:
            model.save_weights(partial)
    return target
