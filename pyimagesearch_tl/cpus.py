"""How many CPUs this process may run on: the thread count of decoding and of every runtime.

``os.cpu_count()`` counts the machine's CPUs; a process limited to fewer (a container's cpuset,
``taskset``, a Ray worker, a pinned test worker) would start that many threads on its few CPUs, and
runtimes that spin while waiting for their threads (OpenVINO, ONNX Runtime, oneDNN) then lose most of
their time to each other. The CPUs of the process's affinity mask are what it may use.
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The number of CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux: every CPU of the machine
        return os.cpu_count() or 1
