"""One run at a time per output folder.

Every stage that writes a folder (build-dataset, extract, train, evaluate, finetune) holds a lock on
it while it runs: an OS file lock (the ``filelock`` library, ``flock`` on POSIX) on a hidden file. The
folder's path is resolved first, so every spelling of one folder (relative, through a symlink) takes
the same lock; a symlink loop is refused with one line naming it. Where the lock file goes:

* *beside* the folder, ``.<folder name>.ptl-lock``, as a rule, so it survives the folder itself being
  replaced (build-dataset swaps in a new dataset folder);
* *inside* it, ``<folder>/.ptl-lock``, when its parent is an existing folder that cannot be written
  (``os.access``) while the folder itself exists and can: a volume's mount point such as ``/output``
  in a container with a read-only root, or ``--output $HOME``. Such a folder cannot be replaced
  (that needs its parent writable), so the lock in it is as good. A stage that replaces its folder
  (``replaces_folder``) never locks inside it.

The choice depends only on what exists and on the permissions the run sees, so every run on a folder
makes the same one, and takes the same lock, as long as they see the same permissions (runs by two
users, only one of whom may write the parent, take different locks). A lock that can be made in
neither place (a part of the path is a file, or the parent and the folder are not writable) is
refused with one line naming the path at fault and the lock file(s) that could not be created.

The holder writes who it is next to the lock, so a second run can say which process to wait for. The
OS releases the lock when the holder dies, even by SIGKILL, so a stale lock file never blocks a later
run.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import inspect
import json
import os
import socket
import sys
from pathlib import Path
from typing import Callable, Iterator

from .atomic import atomic_write_json, obstacle, unwritable_reason
from .errors import PTLError

LOCK_SUFFIX = ".ptl-lock"


class FolderBusyError(PTLError):
    """Another run holds the output folder."""


def _resolved(folder: str | Path) -> Path:
    """``folder`` with its symlinks resolved as far as it exists; a symlink loop is a :class:`PTLError`."""
    try:
        return Path(folder).resolve()
    except (RuntimeError, OSError) as exc:  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) since
        raise PTLError(f"cannot write output folder {folder}: {obstacle(folder) or exc}") from None


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _beside(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _inside(folder: Path) -> Path:
    return folder / LOCK_SUFFIX


def lock_path(folder: str | Path, replaces_folder: bool = False) -> Path:
    """The lock file of ``folder``: hidden, beside it, or inside it where only it can be written.

    Symlinks are resolved (as far as the path exists: the folder need not exist yet), so an alias of
    a folder shares its lock. The lock is inside the folder when its parent exists and cannot be
    written while the folder exists and can, unless ``replaces_folder`` (see the module's description).

    Raises
    ------
    PTLError
        ``folder`` is, or goes through, a symlink loop.
    """
    folder = _resolved(folder)
    parent = folder.parent
    if not replaces_folder and parent.is_dir() and not _writable(parent) and folder.is_dir() and _writable(folder):
        return _inside(folder)
    return _beside(folder)


def _cannot_lock(folder: str | Path, path: Path, error: OSError, replaces_folder: bool) -> str:
    """The one line saying why the lock file ``path`` of ``folder`` could not be created."""
    resolved = _resolved(folder)
    parent, files = resolved.parent, str(path)
    if path == _inside(resolved):  # chosen as the folder seemed writable, and it was not after all
        reason = unwritable_reason(resolved, error)
    elif not replaces_folder and parent.is_dir() and not _writable(parent) and resolved.is_dir():
        # neither the parent nor the folder can be written (else the lock would be inside it)
        reason = f"{resolved} is not writable, nor is {parent}"
        files = f"{path} or {_inside(resolved)}"
    else:
        reason = unwritable_reason(parent, error)
        if replaces_folder and parent.is_dir() and not _writable(parent):
            reason += " (this stage builds the whole folder beside where it goes, then moves it in)"
    return f"cannot write output folder {folder}: {reason} (cannot create the lock file {files})"


def _holder(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        return f"{owner['command']} (pid {owner['pid']} on {owner['host']}, since {owner['since']})"
    except (OSError, ValueError, KeyError):  # the holder has not written it yet, or just removed it
        return "another run"


@contextlib.contextmanager
def output_lock(folder: str | Path, wait: bool = False, replaces_folder: bool = False) -> Iterator[None]:
    """Hold the lock of ``folder`` for the duration of the block.

    Parameters
    ----------
    folder : path
        The output folder (it need not exist yet; its parent is created).
    wait : bool
        Wait for the holder to finish instead of raising :class:`FolderBusyError` at once (saying so
        on stderr first, with the holder).
    replaces_folder : bool
        The run replaces the folder as a whole: its lock is always beside it (see :func:`lock_path`).

    Raises
    ------
    FolderBusyError
        Another run holds the folder and ``wait`` is False.
    PTLError
        The lock cannot be written (the message names the path at fault and the lock file), or
        ``folder`` is a symlink loop.
    """
    from filelock import FileLock, Timeout

    path = lock_path(folder, replaces_folder)
    owner_file = path.with_name(path.name + ".owner")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, is_singleton=True)  # the same folder locked twice in one process nests
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise FolderBusyError(
                    f"{folder} is in use by {_holder(owner_file)}; wait for it to finish, "
                    "or pass --wait to queue behind it"
                ) from None
            print(f"waiting for {folder}: in use by {_holder(owner_file)} ...", file=sys.stderr, flush=True)
            lock.acquire(timeout=-1)
    except OSError as exc:  # no folder can be made there, or no file written (Timeout is handled above)
        raise PTLError(_cannot_lock(folder, path, exc, replaces_folder)) from None
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            atomic_write_json(
                owner_file,
                dict(
                    command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300],
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    since=datetime.datetime.now().isoformat(timespec="seconds"),
                ),
            )
        yield
    finally:
        if outermost:
            owner_file.unlink(missing_ok=True)
        lock.release()


def locks_output(parameter: str, replaces_folder: bool = False) -> Callable:
    """Decorator: each call holds the lock of the folder passed as argument ``parameter``.

    The decorated function takes one more keyword, ``wait`` (default False): wait for another run
    holding the folder instead of raising :class:`FolderBusyError`. A folder of None locks nothing.
    ``replaces_folder``: the function replaces the folder as a whole (see :func:`output_lock`).
    """

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, wait: bool = False, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments.get(parameter)
            if folder is None:
                return function(*args, **kwargs)
            with output_lock(folder, wait, replaces_folder):
                return function(*args, **kwargs)

        return wrapper

    return decorate
