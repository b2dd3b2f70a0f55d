"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

A crash leaves either the old file or the new one, never half of one. Bundles, label encoders,
metrics, manifests and finished feature files are all written through :func:`atomic_path`.
:func:`check_writable` tells, before a long job, whether its output file can be written at all, and
creates nothing doing so.

A write that fails (disk full, read-only folder, a folder removed under the run) raises
:class:`OutputError`, an ``OSError`` naming the output and the cause (:func:`writing`), which the
command line prints as one line (:func:`describe_os_error`). Temporary files are named
``.<target name>.ptl-tmp-<pid>-<host>-<random><suffixes>`` (:data:`TEMPORARY`): one left by a writer
that was killed is known by that name and by its process being gone, and the next write into its
folder removes it (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import shutil
import socket
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


#: This package's temporary files: ``.<target name>.ptl-tmp-<pid>-<host>-<random><suffixes>``, ``pid`` the
#: writing process, ``host`` the first 8 hex digits of the SHA-256 of its machine's name.
TEMPORARY = re.compile(r"\..+\.ptl-tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-")
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

#: Errors only writing raises: whatever they name, the output cannot be written.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class OutputError(OSError):
    """An output could not be written: ``filename`` names it (or the folder at fault), ``strerror`` the cause."""


def describe_os_error(exc: OSError) -> str:
    """``exc`` as one line naming the path and the cause: ``cannot write <path>: <cause>`` for an output.

    Parameters
    ----------
    exc : OSError
        An :class:`OutputError`, or any ``OSError`` (one of :data:`WRITE_ERRNOS` is an output's too).

    Returns
    -------
    str
        E.g. ``cannot write models/logreg.skops: No space left on device``.
    """
    cause = _cause(exc)
    if isinstance(exc, OutputError) or exc.errno in WRITE_ERRNOS:
        return f"cannot write {exc.filename or 'the output'}: {cause}"
    return f"{exc.filename}: {cause}" if exc.filename else cause


def _cause(exc: OSError) -> str:
    """The first line of what went wrong (HDF5's messages run over several)."""
    return (str(exc.strerror or exc).splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def writing(target: str | Path, *temporaries: str | Path) -> Iterator[None]:
    """Raise an ``OSError`` of writing ``target`` that arises inside as an :class:`OutputError` naming it.

    Parameters
    ----------
    target : path
        The output being written.
    *temporaries : path
        Other names of the output while it is written (e.g. ``<split>.h5.partial``).

    Raises
    ------
    OutputError
        For an error that names no file, one of ``temporaries`` or one of this package's temporary
        files (:data:`TEMPORARY`): naming ``target``, with the error's ``errno`` and cause. An error
        that names another file (a folder that cannot be made) is raised as it is.
    """
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        named = None if exc.filename is None else str(exc.filename)
        if named is None or named in {str(t) for t in temporaries} or TEMPORARY.match(os.path.basename(named)):
            raise OutputError(exc.errno, _cause(exc), str(target)) from exc
        raise


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``; return them.

    A file is one of this package's temporary files by its name (:data:`TEMPORARY`), and stale when
    it was made on this machine by a process that no longer runs. Files of any other name, of other
    machines (a shared folder) or of running processes are never touched; on a system without POSIX
    processes nothing is removed.
    """
    removed: list[Path] = []
    if os.name != "posix":
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = TEMPORARY.match(name)
        if match and match["host"] == _HOST and not _running(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):  # another writer removed it first
                os.unlink(Path(folder, name))
                removed.append(Path(folder, name))
    return removed


def remove_entry(path: str | Path) -> None:
    """Remove whatever is at ``path``, a name only this package uses (a part or shard file, a staging folder
    beside a locked output): a file, a special file, a link (itself, never what it points to), or a folder
    with its contents (links inside it removed, never followed). Nothing there: nothing to do."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _new_temporary(target: Path, folder: Path) -> Path:
    """A new empty file in ``folder`` named as a temporary file of ``target`` (:data:`TEMPORARY`)."""
    handle, name = tempfile.mkstemp(
        prefix=f".{target.name}.ptl-tmp-{os.getpid()}-{_HOST}-", suffix="".join(target.suffixes), dir=folder
    )
    os.close(handle)
    return Path(name)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically.

    The temporary name keeps ``target``'s suffix (some writers check it, e.g. Keras' ``.weights.h5``).
    On an exception the temporary file is removed and ``target`` is left untouched; an ``OSError`` is
    raised as an :class:`OutputError` naming ``target`` (:func:`writing`). Temporary files that killed
    writers left in the folder are removed first (:func:`remove_stale_temporaries`).
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent)
        temporary = _new_temporary(target, target.parent)
    try:
        with writing(target, temporary):
            os.chmod(temporary, FILE_MODE)
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
            os.unlink(_new_temporary(target, place))
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
