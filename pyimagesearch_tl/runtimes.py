"""Where the backbone runs: TensorFlow (the reference), ONNX Runtime or OpenVINO.

The network is always defined (and fine-tuned) in Keras. For the other runtimes, the extractor's
whole forward pass -- uint8 pixels, preprocessing, backbone, pooling, float32 features -- is exported
once to ONNX with tf2onnx and cached in ``$XDG_CACHE_HOME/pyimagesearch_tl/networks/<key>.onnx``; the
key is a digest of the weights themselves, the input size, the pooling, the preprocessing, the
precision and the converter's version, so any change makes a new conversion.

The first time a runtime runs a cached network, its features of the job's first real images are
compared with TensorFlow's (max absolute difference at most :data:`PARITY_ATOL`) and it is timed on
them; the verdict is stored beside the network (``<key>.json``). A runtime asked for by name that
fails the check is refused with a clear message; ``auto`` uses the fastest runtime that passed,
TensorFlow included. A network that tf2onnx cannot convert runs in TensorFlow, with a one-line note.
float32 runtimes give the same features (same feature layout), so the runtime is not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_path, atomic_write_json
from .cache import cache_dir
from .errors import ConfigError, PTLError

AUTO = "auto"
TENSORFLOW = "tensorflow"
#: Largest absolute difference from TensorFlow's features that a float32 runtime may show.
PARITY_ATOL = 1e-4
#: ONNX opset of the exported networks.
OPSET = 17
PARITY_IMAGES = 8

#: A compiled network: a uint8 batch ``(n, size, size, 3)`` -> float32 features ``(n, D)``.
Forward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A registered runtime: the module that must import, and how to load an ONNX network in it."""

    name: str
    module: str
    load: Callable[[Path, int], Forward] | None  # (network file, threads) -> forward; None: TensorFlow itself
    install: str


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def list_runtimes() -> list[str]:
    """Every value ``--runtime`` takes: ``auto`` and the registered runtimes."""
    return [AUTO, *RUNTIMES]


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(RUNTIMES[name].module) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules, or a broken install
        return False


def _onnxruntime(path: Path, threads: int) -> Forward:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _openvino(path: Path, threads: int) -> Forward:
    import openvino

    compiled = openvino.Core().compile_model(
        str(path),
        "CPU",
        {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "INFERENCE_NUM_THREADS": threads,
            "ENABLE_CPU_PINNING": False,
        },
    )  # pinned, the workers of one node would all share its first cores
    requests = threading.local()  # an infer request serves one call at a time: one per thread (a server's)

    def forward(images: np.ndarray) -> np.ndarray:
        if not hasattr(requests, "request"):
            requests.request = compiled.create_infer_request()
        return np.array(requests.request.infer(images)[0])

    return forward


register(Runtime(TENSORFLOW, "tensorflow", None, "pip install pyimagesearch_tl"))
register(Runtime("onnxruntime", "onnxruntime", _onnxruntime, "pip install pyimagesearch_tl"))
register(Runtime("openvino", "openvino", _openvino, "pip install 'pyimagesearch_tl[openvino]'"))


# --- exporting the Keras network ------------------------------------------------------------------


def converter_version() -> str:
    import tf2onnx

    return tf2onnx.__version__


def network_key(weights: list[np.ndarray], **settings) -> str:
    """Digest naming a converted network: its weight values plus every setting that shapes it."""
    digest = hashlib.sha256(
        json.dumps(dict(settings, converter=converter_version(), opset=OPSET), sort_keys=True).encode()
    )
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:32]


def export_onnx(forward, input_size: int):
    """The ONNX model of ``forward``, a ``tf.function`` from uint8 pixels to features."""
    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.uint8, name="pixels"),)
    model, _ = tf2onnx.convert.from_function(
        tf.function(lambda pixels: forward(pixels)), input_signature=spec, opset=OPSET
    )
    return model


def network_path(key: str) -> Path:
    """Where network ``key`` is cached (its verdicts lie beside it, ``.json``)."""
    return cache_dir() / "networks" / f"{key}.onnx"


def cached_network(key: str, forward, input_size: int) -> Path:
    """The cached ONNX file of network ``key``, converted from ``forward`` on first use."""
    path = network_path(key)
    if not path.exists():
        model = export_onnx(forward, input_size)
        with atomic_path(path) as temporary:
            temporary.write_bytes(model.SerializeToString())
    return path


# --- choosing the runtime -------------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
    name: str
    forward: Forward
    note: str | None = None  # one line for the user: a fallback, or why a runtime was passed over


def _rate(forward: Forward, images: np.ndarray) -> float:
    """Images per second of ``forward`` on ``images`` (already warm), best of two calls."""
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        forward(images)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def requested_runtime(requested: str, precision: str) -> str:
    """``requested`` checked: known, installed, able to run ``precision`` (``auto`` becomes TensorFlow
    for reduced precision, which only TensorFlow runs here)."""
    if requested != AUTO and requested not in RUNTIMES:
        raise ConfigError(f"unknown runtime {requested!r}; choose one of: {', '.join(list_runtimes())}")
    if requested in (AUTO, TENSORFLOW):
        return TENSORFLOW if precision != "float32" else requested
    if not installed(requested):
        raise ConfigError(f"runtime {requested!r} is not installed: {RUNTIMES[requested].install}")
    if precision != "float32":
        raise ConfigError(f"--precision {precision} runs in TensorFlow only; use --runtime tensorflow or auto")
    return requested


def choose(
    requested: str, tensorflow: Forward, network: Callable[[], Path], images: np.ndarray, threads: int, what: str
) -> Choice:
    """The runtime that runs ``what`` from now on, checked on ``images`` (real, decoded) when new.

    Parameters
    ----------
    requested : {"auto", "tensorflow", "onnxruntime", "openvino"}
    tensorflow : callable
        The reference: the TensorFlow forward pass.
    network : callable
        Returns the cached ONNX file, converting on first use; its verdicts are stored beside it.
    images : ndarray
        The first real batch of the job.
    threads : int
        CPU threads the runtime may use.
    what : str
        The network, as the user knows it (for messages).
    """
    if requested == TENSORFLOW:
        return Choice(TENSORFLOW, tensorflow)
    candidates = [requested] if requested != AUTO else [n for n in RUNTIMES if n != TENSORFLOW and installed(n)]
    if not candidates:
        return Choice(TENSORFLOW, tensorflow)
    try:
        path = network()
    except Exception as exc:  # whatever tf2onnx cannot convert runs where it was built
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return Choice(
            TENSORFLOW, tensorflow, f"{what} could not be converted to ONNX ({reason}); it runs in TensorFlow"
        )
    record_path = path.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    sample, reference, loaded = images[:PARITY_IMAGES], None, {}
    for name in candidates:
        if name in record:
            continue
        if reference is None:
            reference = tensorflow(sample)
            record[TENSORFLOW] = {"img_per_s": _rate(tensorflow, images)}
        forward = loaded[name] = RUNTIMES[name].load(path, threads)
        difference = float(np.abs(forward(sample) - reference).max())
        record[name] = {
            "max_abs_diff": difference,
            "passed": difference <= PARITY_ATOL,
            "img_per_s": _rate(forward, images),
        }
        atomic_write_json(record_path, record)
    passed = [n for n in candidates if record[n]["passed"]]
    if requested != AUTO and not passed:
        raise PTLError(
            f"{requested} gives features of {what} up to {record[requested]['max_abs_diff']:.2g} away "
            f"from TensorFlow's (the limit is {PARITY_ATOL:g}); refused: use --runtime tensorflow"
        )
    best = requested
    if requested == AUTO:
        timed = passed + [TENSORFLOW] * (TENSORFLOW in record)
        best = max(timed, key=lambda n: record[n]["img_per_s"], default=TENSORFLOW)
    if best == TENSORFLOW:
        return Choice(TENSORFLOW, tensorflow)
    forward = loaded.get(best) or RUNTIMES[best].load(path, threads)
    return Choice(best, lambda batch: np.asarray(forward(batch), dtype=np.float32))
