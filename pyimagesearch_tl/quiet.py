"""TensorFlow's start-up lines, kept off stderr at the default verbosity on every CPU.

``TF_CPP_MIN_LOG_LEVEL`` silences TensorFlow's own C++ log, but not what its libraries print while
they load, before that setting is read: on CPUs where oneDNN is on by default (AVX-512 ones), TensorFlow
2.21 prints ``WARNING: All log messages before absl::InitializeLog() is called are written to STDERR``
and ``I0000 ... port.cc:153] oneDNN custom operations are on ...`` at import, twice, whatever the level.
Turning oneDNN off (``TF_ENABLE_ONEDNN_OPTS=0``) hides them but halves TensorFlow's speed there, so
instead the first import of ``tensorflow`` runs with the process's stderr (file descriptor 2) captured:
the info and warning lines of that log format are dropped, anything else (errors, Python tracebacks) is
written back. ``TF_CPP_MIN_LOG_LEVEL=0`` (``ptl --verbose``) lets everything through.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

#: The lines dropped: absl's notice that logging is not initialised, and info ("I") or warning ("W")
#: lines in the absl/glog format, ``I0000 00:00:1796137007.843687    1962 port.cc:153] ...``.
CHATTER = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [\w.\-/]+:\d+\] .*)$"
)


def verbose() -> bool:
    """True when the user asked for TensorFlow's own lines (``TF_CPP_MIN_LOG_LEVEL=0``)."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() == "0"


def filtered(captured: bytes) -> bytes:
    """``captured`` without the start-up chatter lines (see :data:`CHATTER`)."""
    return b"".join(line for line in captured.splitlines(keepends=True) if not CHATTER.match(line.rstrip(b"\r\n")))


class _QuietLoader(importlib.abc.Loader):
    """Runs the wrapped loader with stderr captured, then writes back what is not chatter."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # the module sees its real loader
        if verbose():
            return self.loader.exec_module(module)
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as capture:
            os.dup2(capture.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                kept = filtered(capture.read())
                if kept:
                    os.write(2, kept)


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
