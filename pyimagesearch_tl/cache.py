"""The user's cache folder: converted weights, converted networks, downloaded demo data.

Nothing read back from the cache is trusted. Every file this package converts into it goes through
:func:`cached_file`: it is stored with its SHA-256 beside it (``<file>.sha256``, in ``sha256sum``
format) and checked against it on every use; a file that does not match (changed, damaged, truncated,
or without a recorded SHA-256) is converted again, with a one-line note, and never used. Files are made
under a file lock (``<file>.lock``), so processes sharing the cache convert each one once.

A cache that cannot be written (read-only, full, not a folder: any ``OSError`` writing it) stops
nothing: the run writes what it converts to a temporary cache folder, removed when the process ends,
and says so in one line; files already valid in the cache are still read from it.

Hashing costs about 20-50 ms per 20 MB file (a converted EfficientNet-Lite0); :func:`file_sha256`
hashes a file once per process while it stays the same file (same inode, size, modification and change
times), and every new process hashes it again.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from .atomic import atomic_path, atomic_write_text

#: Suffix of the file holding a cached file's SHA-256.
SIDECAR = ".sha256"

_digests: dict[tuple, str] = {}  # file identity -> SHA-256, for this process
_temporary_caches: dict[Path, Path] = {}  # a cache folder that cannot be written -> this run's stand-in
_fallback_lock = threading.Lock()


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyimagesearch_tl`` (``~/.cache/pyimagesearch_tl`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyimagesearch_tl"


def open_regular(path: Path):
    """``path`` opened for binary reading, with its ``os.stat_result``; ``OSError`` unless a regular file
    (a FIFO is opened without blocking, then refused)."""
    handle = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    status = os.fstat(handle.fileno())
    if not stat.S_ISREG(status.st_mode):
        handle.close()
        raise OSError(0, "not a regular file", str(path))
    return handle, status


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the bytes of file ``path``, hashed once per process while the file stays the same.

    Raises
    ------
    OSError
        When ``path`` cannot be read or is not a regular file.
    """
    handle, before = open_regular(Path(path))
    identity = lambda s: (os.fspath(path), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)  # noqa: E731
    with handle:
        if identity(before) in _digests:
            return _digests[identity(before)]
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if identity(os.fstat(handle.fileno())) == identity(before):  # not written to while it was read
            _digests[identity(before)] = digest.hexdigest()
    return digest.hexdigest()


def recorded_sha256(path: str | Path) -> str | None:
    """The SHA-256 recorded for cached file ``path`` (:func:`record_sha256`); None if none is, or not one."""
    try:
        handle, _ = open_regular(Path(str(path) + SIDECAR))
        with handle:
            text = handle.read(200).decode("ascii")
    except (OSError, ValueError):
        return None
    digest = (text.split() or [""])[0]
    return digest if re.fullmatch("[0-9a-f]{64}", digest) else None


def record_sha256(path: str | Path) -> str:
    """Record the SHA-256 of file ``path`` beside it (``<path>.sha256``), written atomically; return it."""
    digest = file_sha256(path)
    atomic_write_text(str(path) + SIDECAR, f"{digest}  {Path(path).name}\n")
    return digest


def problem(path: Path) -> str | None:
    """What is wrong with cached file ``path``: None when its content matches its recorded SHA-256,
    ``""`` when it is missing, else a phrase (``"does not match its recorded SHA-256"``, ...)."""
    if not os.path.lexists(path):
        return ""
    recorded = recorded_sha256(path)
    if recorded is None:
        return "has no recorded SHA-256"
    try:
        actual = file_sha256(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return None if actual == recorded else "does not match its recorded SHA-256 (changed or damaged)"


class _Unwritable(Exception):
    """The cache folder refused a write: ``error``, the ``OSError`` it raised."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


def _writing(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except OSError as exc:
        raise _Unwritable(exc) from exc


def _places(home: Path) -> list[Path]:
    """Where cached files of cache folder ``home`` may be: it, and this run's temporary stand-in for it."""
    return [home] + ([_temporary_caches[home]] if home in _temporary_caches else [])


def cached(relative: str | Path) -> Path | None:
    """The cache's file ``relative`` when it is there and matches its recorded SHA-256 (in the cache
    folder, or in this run's temporary one), else None; nothing is converted."""
    for root in _places(cache_dir()):
        if problem(root / relative) is None:
            return root / relative
    return None


def cached_file(relative: str | Path, convert: Callable[[], Any], save: Callable[[Any, Path], None]) -> Path:
    """The cache's file ``relative``, its content checked against its recorded SHA-256; converted (and its
    SHA-256 recorded) when it is missing or does not match, with a one-line note in the second case.

    Parameters
    ----------
    relative : path
        The file's place in the cache folder, e.g. ``networks/<key>.onnx``.
    convert : callable
        Makes the content (a Keras model, an ONNX model): called at most once, and only when needed.
    save : callable
        ``save(content, path)`` writes the content to ``path``, a temporary file beside the cached one
        with the same suffixes, renamed into place once written.

    Returns
    -------
    Path
        The verified file: in the cache folder, or in this run's temporary cache folder when the cache
        folder cannot be written (a one-line note says so, the first time).
    """
    found = cached(relative)
    if found is not None:
        return found
    home = cache_dir()
    places = _places(home)
    content: list = []  # converted once, however many places it is written to

    def converted():
        if not content:
            content.append(convert())
        return content[0]

    try:
        return _make(places[-1] / relative, converted, save)
    except _Unwritable as exc:
        if len(places) > 1:  # the temporary cache cannot be written either
            raise exc.error from None
        fallback = _temporary_cache(home, exc.error)
    try:
        return _make(fallback / relative, converted, save)
    except _Unwritable as exc:
        raise exc.error from None


def _make(path: Path, converted: Callable[[], Any], save: Callable[[Any, Path], None]) -> Path:
    """Convert ``path`` under its lock, unless another process just did; :class:`_Unwritable` if the
    folder refuses the lock or the file."""
    from filelock import FileLock

    lock = FileLock(str(path) + ".lock")

    def take_lock():
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()

    _writing(take_lock)
    try:
        wrong = problem(path)
        if wrong is None:  # made by another process while this one waited for the lock
            return path
        if wrong:
            warnings.warn(f"cached {path} {wrong}; converting it again")
        content = converted()

        def write():
            with atomic_path(path) as temporary:
                save(content, temporary)
            record_sha256(path)

        _writing(write)
        return path
    finally:
        lock.release()


def _cause(error: OSError) -> str:
    """Why ``error`` happened, in a few words on one line."""
    text = error.strerror or str(error)
    number = error.errno
    if not number:  # HDF5 (h5py's errors) gives the C errno in its text only
        found = re.search(r"\berrno = (\d+)", text)
        number = int(found[1]) if found else 0
    return os.strerror(number) if number else (text.strip().splitlines() or [type(error).__name__])[0][:200]


def _temporary_cache(home: Path, error: OSError) -> Path:
    """This run's stand-in for cache folder ``home``, which cannot be written; made (and noted) once."""
    with _fallback_lock:
        if home not in _temporary_caches:
            folder = Path(tempfile.mkdtemp(prefix="ptl-cache-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _temporary_caches[home] = folder
            warnings.warn(
                f"cannot write the cache {home} ({_cause(error)}); this run caches in {folder}, removed when it ends"
            )
        return _temporary_caches[home]
