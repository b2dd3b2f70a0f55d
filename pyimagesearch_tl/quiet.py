"""TensorFlow's start-up lines, kept off stderr at the default verbosity on every CPU.

``TF_CPP_MIN_LOG_LEVEL`` silences TensorFlow's own C++ log, but not what its libraries print while
they load, before that setting is read: on CPUs where oneDNN is on by default (AVX-512 ones), TensorFlow
2.21 prints ``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR``
and ``I0000 ... port.cc:153] oneDNN custom operations are on ...`` at import, twice, whatever the level.
Turning oneDNN off (``TF_ENABLE_ONEDNN_OPTS=0``) hides them but halves TensorFlow's speed there, so
instead the first import of ``tensorflow`` runs with the process's stderr (file descriptor 2) sent
through a small filter process that drops the lines of that log format below ``TF_CPP_MIN_LOG_LEVEL``
(default 2: info and warning lines) and passes everything else (errors, Python warnings and tracebacks)
on at once, in order. A separate process, so that what TensorFlow prints just before it aborts or
crashes still gets through. ``TF_CPP_MIN_LOG_LEVEL=0`` (``ptl --verbose``) lets everything through;
without a usable stderr (closed, or replaced in Python), nothing is filtered.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import os
import re
import subprocess
import sys

#: absl/glog lines: ``I0000 00:00:1796137007.843687    1962 port.cc:153] ...``; the first letter is the
#: severity (I, W, E, F), and absl's notice that logging is not initialised counts as a warning.
LOG_LINE = (
    r"^(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
    r"|([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.\-/]+:\d+\] )"
)
SEVERITIES = "IWEF"

#: The filter process: stdin to stdout, line by line, without the log lines (``argv[2]``) of the severities
#: in ``argv[1]``.
FILTER = """
import re, sys
dropped, pattern = sys.argv[1].encode(), re.compile(sys.argv[2].encode())
for line in sys.stdin.buffer:
    match = pattern.match(line)
    if match is None or (match.group(1) or b"W") not in dropped:
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


def set_default_log_level() -> None:
    """``TF_CPP_MIN_LOG_LEVEL=2`` unless it holds a level already: an empty or unreadable value, which
    TensorFlow reads as 0 (every line), counts as unset."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip()
    if not (level.isascii() and level.isdigit()):  # "²" is a digit to Python, not to TensorFlow
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"


def min_log_level() -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as a number (0: everything, 1: no info, 2: no warnings either, 3: no errors)."""
    try:
        return max(0, min(3, int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))))
    except ValueError:
        return 0


def filtered(captured: bytes, level: int = 2) -> bytes:
    """``captured`` as the filter process passes it on at ``level`` (for tests and callers that capture)."""
    pattern, dropped = re.compile(LOG_LINE.encode()), SEVERITIES[:level].encode()
    kept = []
    for line in captured.splitlines(keepends=True):
        match = pattern.match(line)
        if match is None or (match.group(1) or b"W") not in dropped:
            kept.append(line)
    return b"".join(kept)


def _usable_stderr() -> bool:
    if sys.stderr is None:
        return False
    try:
        os.fstat(2)
        return sys.stderr.fileno() == 2
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # closed, or replaced in Python
        return False


class _QuietLoader(importlib.abc.Loader):
    """Runs the wrapped loader with file descriptor 2 sent through the :data:`FILTER` process."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # the module sees its real loader
        level = min_log_level()
        if level == 0 or not _usable_stderr():
            return self.loader.exec_module(module)
        sys.stderr.flush()
        saved = os.dup(2)
        read, write = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-S", "-c", FILTER, SEVERITIES[:level], LOG_LINE],
                stdin=read,
                stdout=saved,
                stderr=saved,
            )
        except OSError:  # no process to spare: import unfiltered
            for fd in (read, write, saved):
                os.close(fd)
            return self.loader.exec_module(module)
        os.close(read)
        os.dup2(write, 2)
        os.close(write)
        try:
            self.loader.exec_module(module)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last writer closes: the filter passes on what is left, then ends
            os.close(saved)
            child.wait()


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as usual, the first time, and wraps its loader in :class:`_QuietLoader`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietTensorFlowFinder()


def install() -> None:
    """Make the first import of ``tensorflow`` in this process quiet (no-op once it is imported)."""
    if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
