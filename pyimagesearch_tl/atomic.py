"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one. Bundles, label encoders,
metrics, manifests and finished feature files are all written through :func:`atomic_path`.
:func:`check_writable` tells, before a long job, whether its output file can be written at all, and
creates nothing doing so.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import PTLError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Permissions of the files written here: what ``open()`` would give (``mkstemp`` makes them 0600).
FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    The temporary name keeps ``target``'s suffix (some writers check it, e.g. Keras' ``.weights.h5``).
    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix="".join(target.suffixes), dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    os.chmod(temporary, FILE_MODE)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def nearest_existing(place: str | Path) -> Path:
    """The deepest part of path ``place`` that exists (a symlink counts, even a broken or looping one)."""
    place = Path(place)
    while not os.path.lexists(place) and place != place.parent:
        place = place.parent
    return place


def obstacle(place: str | Path) -> str | None:
    """Why nothing can be written in folder ``place``, judged without writing anything, naming the
    path at fault; None when the deepest part of ``place`` that exists is a writable folder (the
    missing rest can then be created in it).
    """
    existing = nearest_existing(place)
    try:
        mode = os.stat(existing).st_mode
    except OSError as exc:  # a symlink that leads nowhere
        if exc.errno == errno.ELOOP:
            return f"{existing} is a symlink loop"
        if exc.errno == errno.ENOENT:
            return f"{existing} is a broken symlink"
        return f"{exc.strerror or type(exc).__name__}: {existing}"
    if not stat.S_ISDIR(mode):
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def unwritable_reason(place: str | Path, error: OSError) -> str:
    """Why nothing can be written in folder ``place`` (``error`` is what trying raised), naming the path at fault."""
    return obstacle(place) or f"{error.strerror or type(error).__name__}: {error.filename or place}"


def check_writable(target: str | Path) -> Path:
    """Make sure file ``target`` can be written, before the work that produces it, creating nothing.

    The deepest existing part of its folder must be a writable folder (no part of the path a file, a
    broken symlink or a symlink loop): a temporary file is made and removed there. The missing
    folders are left to the writer (:func:`atomic_path` creates them), so a run that fails after the
    check leaves no empty folder behind. A target that cannot be written raises
    :class:`~pyimagesearch_tl.errors.PTLError`, one line naming the path at fault.
    """
    target = Path(target)
    if target.is_dir():
        raise PTLError(f"cannot write {target}: it is a folder")
    reason = obstacle(target.parent)
    if reason is None:
        place = nearest_existing(target.parent)
        try:
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=place)
            os.close(handle)
            os.unlink(name)
        except OSError as exc:
            reason = unwritable_reason(place, exc)
    if reason is not None:
        raise PTLError(f"cannot write {target}: {reason}")
    return target


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as temporary:
        temporary.write_text(text, encoding="utf-8")


def atomic_write_json(target: str | Path, data: Any) -> None:
    atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(target: str | Path, fields: Sequence[str], rows: Iterable[dict[str, Any]]) -> None:
    with atomic_path(target) as temporary:
        # File names that are not valid UTF-8 survive as their original bytes (surrogateescape).
        with temporary.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(fields))
            writer.writeheader()
            writer.writerows(rows)


def atomic_joblib_dump(target: str | Path, value: Any) -> None:
    import joblib

    with atomic_path(target) as temporary:
        joblib.dump(value, temporary)
