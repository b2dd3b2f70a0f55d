"""Converted weights, made once per source checkpoint and kept in the user's cache folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..cache import cached_file, file_sha256


def converted_weights(name: str, checkpoint: Path, convert: Callable[[], object]) -> Path:
    """The cached Keras ``.weights.h5`` of ``checkpoint``, made by ``convert()`` on first use.

    ``convert`` returns the Keras model holding the converted weights. The cache file name carries
    the checkpoint's SHA-256 prefix, so a changed checkpoint never reuses a stale conversion; the
    file's own SHA-256 is recorded beside it and checked on every use
    (:func:`~pyimagesearch_tl.cache.cached_file`), so a file changed since is converted again.
    """
    relative = Path("weights") / f"{name}-{file_sha256(checkpoint)[:12]}.weights.h5"
    return cached_file(relative, convert, lambda model, path: model.save_weights(path))
