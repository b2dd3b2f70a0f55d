"""One run at a time per output folder.

Every stage that writes a folder (build-dataset, extract, train, evaluate, finetune) holds a lock on
it while it runs: an OS file lock (the ``filelock`` library, ``flock`` on POSIX) on a hidden file
*beside* the folder, ``.<folder name>.ptl-lock``, so it survives the folder itself being replaced
(build-dataset swaps in a new dataset folder). The folder's path is resolved first, so every spelling
of one folder (relative, through a symlink) takes the same lock. The holder writes who it is next to
the lock, so a second run can say which process to wait for. The OS releases the lock when the holder
dies, even by SIGKILL, so a stale lock file never blocks a later run. A lock that cannot be written
there (the parent is a file, or not writable) is refused with one line naming the path at fault.
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

from .atomic import atomic_write_json, unwritable_reason
from .errors import PTLError

LOCK_SUFFIX = ".ptl-lock"


class FolderBusyError(PTLError):
    """Another run holds the output folder."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: hidden, beside it.

    Symlinks are resolved (as far as the path exists: the folder need not exist yet), so an alias of
    a folder shares its lock.
    """
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _holder(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        return f"{owner['command']} (pid {owner['pid']} on {owner['host']}, since {owner['since']})"
    except (OSError, ValueError, KeyError):  # the holder has not written it yet, or just removed it
        return "another run"


@contextlib.contextmanager
def output_lock(folder: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold the lock of ``folder`` for the duration of the block.

    Parameters
    ----------
    folder : path
        The output folder (it need not exist yet; its parent is created).
    wait : bool
        Wait for the holder to finish instead of raising :class:`FolderBusyError` at once (saying so
        on stderr first, with the holder).

    Raises
    ------
    FolderBusyError
        Another run holds the folder and ``wait`` is False.
    PTLError
        The lock cannot be written beside the folder (the message names the path at fault).
    """
    from filelock import FileLock, Timeout

    path = lock_path(folder)
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
        raise PTLError(f"cannot write output folder {folder}: {unwritable_reason(path.parent, exc)}") from None
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


def locks_output(parameter: str) -> Callable:
    """Decorator: each call holds the lock of the folder passed as argument ``parameter``.

    The decorated function takes one more keyword, ``wait`` (default False): wait for another run
    holding the folder instead of raising :class:`FolderBusyError`. A folder of None locks nothing.
    """

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, wait: bool = False, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments.get(parameter)
            if folder is None:
                return function(*args, **kwargs)
            with output_lock(folder, wait):
                return function(*args, **kwargs)

        return wrapper

    return decorate
