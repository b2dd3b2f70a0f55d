"""Where the backbone runs: TensorFlow (the reference), ONNX Runtime or OpenVINO.

The network is always defined (and fine-tuned) in Keras. For the other runtimes, the extractor's
whole forward pass -- uint8 pixels, preprocessing, backbone, pooling, float32 features -- is exported
once to ONNX with tf2onnx and cached in ``$XDG_CACHE_HOME/pyimagesearch_tl/networks/<key>.onnx``; the
key is a digest of the weights themselves, the input size, the pooling, the preprocessing, the
precision and the converter's version, so any change makes a new conversion. The file's SHA-256 is
recorded beside it and checked on every use (:func:`~pyimagesearch_tl.cache.cached_file`): a file that
does not match (damaged, truncated, replaced) is converted again, with a note.

The first time a runtime runs a cached network on a machine, its features of the job's first real
images are compared with TensorFlow's (max absolute difference at most :data:`PARITY_ATOL`); the
verdict is stored beside the network (``<key>.json``), per machine (CPU model and flags, core count,
the runtimes' versions: :func:`machine_key`), with the SHA-256 of the network file it was taken on (a
verdict on other content is never trusted: checked again), under a file lock, so processes and Ray
workers sharing the cache never lose each other's verdicts. A cache that cannot be locked (read-only,
not the user's) is read without the lock and never written: a verdict taken then holds for that run
only. A stored entry that is not a well-formed verdict is dropped and checked again. A runtime asked
for by name that fails the check is refused with a clear message; one that cannot load the cached
network is refused with the file to delete, and ``auto`` passes over it with a note.

A job smaller than :data:`MIN_IMAGES_TO_CONVERT` images runs in TensorFlow under ``auto`` unless its
network is already converted: the conversion would cost it more than it saves.

``auto`` takes the first runtime of :data:`PREFERENCE` that is installed and passed: an order, not a
timing, so no measurement taken on a busy machine can lock in a slow runtime (measured on AVX2 and
AVX-512 VMs: OpenVINO and ONNX Runtime run the float32 network 1.4x to 3.4x faster than TensorFlow,
OpenVINO as fast as ONNX Runtime or faster). ``ptl runtimes --benchmark`` times each runtime here on
a fixed synthetic batch (median of repetitions) for whoever wants to pick by hand. A network that
tf2onnx cannot convert runs in TensorFlow, with a one-line note. float32 runtimes give the same
features (same feature layout), so the runtime is not part of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .atomic import atomic_write_json
from .cache import cache_dir, cached, cached_file, file_sha256, problem
from .errors import ConfigError, PTLError
from .registry import Registry
from .registry import installed as module_installed

AUTO = "auto"
TENSORFLOW = "tensorflow"
OPENVINO = "openvino"
#: Largest absolute difference from TensorFlow's features that a float32 runtime may show.
PARITY_ATOL = 1e-4
#: ONNX opset of the exported networks.
OPSET = 17
PARITY_IMAGES = 8
#: The order ``auto`` tries the runtimes in (the first installed one that passed the parity check).
PREFERENCE = ("openvino", "onnxruntime", "tensorflow")
#: The smallest job (images) for which ``auto`` converts a network that is not cached yet: smaller ones
#: run in TensorFlow, and a network already converted is used whatever the job's size. Converting
#: EfficientNet-Lite0 took 7.5 s on 2 cores; the pipeline saves 12.3 ms per image against TensorFlow on
#: an AVX2 VM (49.5 -> 125.8 img/s) and 2.6 ms on an AVX-512 one (145 -> 231), so the conversion repays
#: itself after ~600 to ~2,900 images: at 1,000 a job loses at most ~5 s either way, and the network it
#: converts is cached for every later job.
MIN_IMAGES_TO_CONVERT = 1000

#: A compiled network: a uint8 batch ``(n, size, size, 3)`` -> float32 features ``(n, D)``.
Forward = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A registered runtime: the module that must import, and how to load an ONNX network in it."""

    name: str
    module: str
    load: Callable[[Path, int, str], Forward] | None  # (network file, threads, precision); None: TensorFlow itself
    install: str


#: The runtimes, by name (see :mod:`pyimagesearch_tl.registry`).
RUNTIMES: Registry[Runtime] = Registry("runtime", "runtimes")


def register(runtime: Runtime, description: str) -> Runtime:
    """Add ``runtime`` to :data:`RUNTIMES` (names are unique)."""
    return RUNTIMES.register(
        runtime.name,
        runtime,
        description=description,
        unusable=lambda: None if installed(runtime.name) else runtime.install,
    )


def list_runtimes() -> list[str]:
    """Every value ``--runtime`` takes: ``auto`` and the registered runtimes."""
    return [AUTO, *RUNTIMES]


def installed(name: str) -> bool:
    """Whether runtime ``name``'s module can be imported here."""
    return module_installed(RUNTIMES.get(name).module)


def _onnxruntime(path: Path, threads: int, precision: str = "float32") -> Forward:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _openvino(path: Path, threads: int, precision: str = "float32") -> Forward:
    """OpenVINO on the CPU: a float32 network in float32 or, for ``bfloat16``, with bfloat16 arithmetic
    (its inference-precision hint); a quantized (int8) network runs its int8 operations as quantized."""
    import openvino

    compiled = openvino.Core().compile_model(
        str(path),
        "CPU",
        {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
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


register(
    Runtime(TENSORFLOW, "tensorflow", None, "pip install pyimagesearch_tl"),
    "the Keras network itself: the reference every other runtime is checked against",
)
register(
    Runtime("onnxruntime", "onnxruntime", _onnxruntime, "pip install pyimagesearch_tl"),
    "ONNX Runtime on the exported network (float32, int8)",
)
register(
    Runtime(OPENVINO, "openvino", _openvino, "pip install 'pyimagesearch_tl[openvino]'"),
    "OpenVINO on the exported network (float32, bfloat16 where the CPU has it, int8); auto's first choice",
)


# --- exporting the Keras network ------------------------------------------------------------------


def converter_version() -> str:
    """tf2onnx's version, read without importing it (it imports TensorFlow)."""
    return importlib.metadata.version("tf2onnx")


def network_key(weights: str, **settings) -> str:
    """Digest naming a converted network: the digest of its weights (see
    :func:`~pyimagesearch_tl.backbones.weights_identity`) plus every setting that shapes it."""
    text = json.dumps(dict(settings, weights=weights, converter=converter_version(), opset=OPSET), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


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


def network_width(network: Path | bytes) -> int | None:
    """The width of the feature vectors a network (file, or its content) outputs: its one output's last
    dimension; None when it is not such a network (loading it for a job then says what is wrong with it)."""
    import onnx

    try:
        model = onnx.load_from_string(network) if isinstance(network, bytes) else onnx.load(str(network))
        [output] = model.graph.output
        width = output.type.tensor_type.shape.dim[-1].dim_value
    except Exception:  # any parse failure: the caller builds the Keras model instead
        return None
    return int(width) if width > 0 else None


def _network_name(key: str) -> Path:
    return Path("networks", f"{key}.onnx")


def network_path(key: str) -> Path:
    """Where network ``key`` is cached in the cache folder (its verdicts lie beside it, ``.json``)."""
    return cache_dir() / _network_name(key)


def converted_network(key: str) -> Path | None:
    """The cached ONNX file of network ``key`` when it is there and matches its recorded SHA-256, else None."""
    return cached(_network_name(key))


def checked_network(key: str) -> Path | None:
    """:func:`converted_network`, when a runtime also passed the parity check on it on this machine (its
    verdict taken on this content, for this key): a network a job may trust without TensorFlow."""
    path = converted_network(key)
    if path is None:
        return None
    with verdicts(path, write=False) as record:
        return path if any(verdict["passed"] for verdict in record.values()) else None


def cached_network(key: str, export: Callable[[], Any], convert: bool = True) -> Path | None:
    """The cached ONNX file of network ``key``, made by ``export()`` (an ONNX model, see :func:`export_onnx`)
    on first use or when its content does not match its recorded SHA-256 (see
    :func:`~pyimagesearch_tl.cache.cached_file`); with ``convert=False``, None instead of converting."""
    if not convert:
        found = converted_network(key)
        wrong = problem(network_path(key)) if found is None else None
        if wrong:  # said, as cached_file says it; converted again by the next job that converts
            warnings.warn(
                f"cached {network_path(key)} {wrong}; this job runs in TensorFlow (one of "
                f"{MIN_IMAGES_TO_CONVERT:,} images or more, or --runtime by name, converts it again)"
            )
        return found
    return cached_file(_network_name(key), export, lambda model, path: path.write_bytes(model.SerializeToString()))


#: How NNCF quantizes (part of an int8 network's key, see :func:`quantize_network`):
#:
#: * ``fast_bias_correction=False``: full bias correction (flowers, 300 calibration photos, 128 others:
#:   mean cosine to float32 0.9743 -> 0.985, nearest-centroid agreement 0.945 -> 0.992);
#: * ``float_first_convolution``: the stem convolution, which sees raw pixels, stays float32 (flowers, 300
#:   photos not calibrated on: mean / min cosine 0.9866 / 0.880 -> 0.9951 / 0.975; 15% slower network);
#: * ``overflow_fix="enable"``: every weight quantized to 7 bits, so that int8 sums cannot saturate on a
#:   CPU without VNNI, and a network gives the same features on every CPU it travels to (NNCF's default
#:   fixes the first layer only: with oneDNN limited to AVX2 or AVX-512 without VNNI, the same network's
#:   flowers cosine fell from 0.9866 to 0.917, min 0.669; with both settings, 0.9910 / 0.959 on either).
NNCF_SETTINGS = {"fast_bias_correction": False, "float_first_convolution": True, "overflow_fix": "enable"}


def quantize_network(float_network: Path, calibration: np.ndarray, key: str) -> Path:
    """The int8 (QDQ) ONNX file of ``float_network``, calibrated on ``calibration``: cached, made on first use.

    NNCF's post-training static quantization of the ONNX graph with :data:`NNCF_SETTINGS` (see
    :mod:`pyimagesearch_tl.quantization` for why this tool, measured against the alternatives)."""

    def quantize():
        import nncf
        import onnx

        nncf.set_log_level(logging.ERROR)
        model = onnx.load(str(float_network))
        name = model.graph.input[0].name
        dataset = nncf.Dataset([{name: calibration[i : i + 1]} for i in range(len(calibration))])
        ignored = []
        if NNCF_SETTINGS["float_first_convolution"]:
            ignored = [next(node.name for node in model.graph.node if node.op_type == "Conv")]
        arguments = dict(
            subset_size=len(calibration),
            fast_bias_correction=NNCF_SETTINGS["fast_bias_correction"],
            ignored_scope=nncf.IgnoredScope(names=ignored),
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                overflow_fix=nncf.OverflowFix(NNCF_SETTINGS["overflow_fix"])
            ),
        )
        with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere), contextlib.redirect_stderr(nowhere):
            return nncf.quantize(model, dataset, **arguments)  # its progress bars: not ours

    return cached_file(
        Path("networks", f"{key}.int8.onnx"),
        quantize,
        lambda model, path: path.write_bytes(model.SerializeToString()),
    )


# --- choosing the runtime -------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def machine_key() -> str:
    """What a runtime's verdict holds for: the CPU (model, flags), the core count and the libraries' versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            fields = dict(line.split(":", 1) for line in handle.read().split("\n\n")[0].splitlines() if ":" in line)
        cpu = " ".join(fields.get(k, "").strip() for k in ("model name", "flags"))
    except OSError:  # not Linux: the platform's description
        pass
    versions = []
    for package in ("tensorflow", "tensorflow-cpu", "onnxruntime", "openvino", "tf2onnx"):
        try:
            versions.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    text = json.dumps([cpu, os.cpu_count(), platform.machine(), versions])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def valid_verdict(verdict, network_sha256: str, network_key: str) -> bool:
    """Whether ``verdict`` is what :func:`verdicts` stores, taken on the network file of SHA-256
    ``network_sha256`` cached as ``network_key``: that digest (``network_sha256``) and that key
    (``network_key``: a verdict copied along with another network's file is not one on this network),
    and a real bool ``passed`` that agrees with a finite, non-negative number ``max_abs_diff`` (or an
    infinite one that failed)."""
    if not isinstance(verdict, dict) or type(verdict.get("passed")) is not bool:
        return False
    if verdict.get("network_sha256") != network_sha256 or verdict.get("network_key") != network_key:
        return False  # taken on other content, or for another network: checked again
    difference = verdict.get("max_abs_diff")
    if type(difference) not in (int, float) or math.isnan(difference) or difference < 0:
        return False
    return verdict["passed"] == (difference <= PARITY_ATOL)


@contextlib.contextmanager
def verdicts(network: Path, write: bool = True) -> Iterator[dict]:
    """This machine's verdicts on the content of ``network`` (runtime -> {"max_abs_diff", "passed"}), to read
    and update.

    Held under a file lock; what the block adds is written back atomically when it ends, beside the
    other machines' verdicts, each with the SHA-256 of the network file (``network_sha256``). Entries that
    are not well-formed verdicts on this very content (:func:`valid_verdict`) are left out, so they are
    checked again. Where the lock cannot be taken (a read-only cache, another user's), the verdicts are
    read without it and nothing is written. With ``write=False`` (a reader) no lock is taken and nothing is
    written: the file is only ever replaced whole, so a reader never waits behind another process's parity
    check (seconds: it builds the Keras network) and sees the verdicts from before or after it.
    """
    from filelock import FileLock

    path = network.with_suffix(".json")
    lock: FileLock | None = FileLock(str(path) + ".lock") if write else None
    try:
        if lock is not None:
            lock.acquire()
    except OSError:  # the lock file cannot be made: read only, what this run adds holds for this run
        lock = None
    try:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # none yet, or unreadable (nested too deep): checked again
            record = {}
        if not isinstance(record, dict):
            record = {}
        # Verdicts by machine; a file of the first format (one timing-based verdict for every machine) is redone.
        record = {k: v for k, v in record.items() if isinstance(v, dict) and not {"passed", "img_per_s"} & set(v)}
        stored, digest, key = record.get(machine_key(), {}), file_sha256(network), network.name.removesuffix(".onnx")
        mine = {name: v for name, v in stored.items() if valid_verdict(v, digest, key)}
        yield mine
        # Each verdict is stored with the digest of the content it was taken on, and the network's key.
        record[machine_key()] = {name: dict(v, network_sha256=digest, network_key=key) for name, v in mine.items()}
        if lock is not None and record[machine_key()] != stored:
            with contextlib.suppress(OSError):  # a cache that cannot take it: the verdict holds for this run
                atomic_write_json(path, record)
    finally:
        if lock is not None:
            lock.release()


class UnreadableNetwork(PTLError):
    """A runtime cannot load or run the cached network, though it matches its recorded SHA-256 (damaged
    with its record, or beyond this runtime)."""

    def __init__(self, name: str, path: Path, error: BaseException):
        detail = (str(error).strip().splitlines() or [type(error).__name__])[-1].strip()  # OpenVINO's: its last
        detail = detail.replace(str(path), path.name)[:200]
        self.reason = f"cannot run the cached network {path} ({detail}); delete that file to convert it again"
        super().__init__(f"{name} {self.reason}")


def load(name: str, path: Path, threads: int, precision: str = "float32") -> Forward:
    """Runtime ``name``'s forward pass of the network file ``path`` in ``precision`` (:class:`UnreadableNetwork`
    if it cannot)."""
    try:
        return RUNTIMES.get(name).load(path, threads, precision)
    except Exception as exc:
        raise UnreadableNetwork(name, path, exc) from exc


def checked(name: str, path: Path, forward: Forward, reference: np.ndarray, sample: np.ndarray) -> dict:
    """:func:`check_parity` of runtime ``name`` (:class:`UnreadableNetwork` if it cannot run ``path``)."""
    try:
        return check_parity(forward, reference, sample)
    except Exception as exc:
        raise UnreadableNetwork(name, path, exc) from exc


def verdict_of(
    name: str, path: Path, threads: int, sample: np.ndarray, reference: Callable[[], np.ndarray]
) -> tuple[dict, Forward | None]:
    """This machine's verdict on runtime ``name`` running network ``path``, checked on ``sample`` (against
    TensorFlow's features, ``reference()``) and stored when there is none yet; with the runtime's forward
    pass when it had to be loaded for the check (else None)."""
    with verdicts(path) as record:
        forward = None
        if name not in record:
            forward = load(name, path, threads)
            record[name] = checked(name, path, forward, reference(), sample)
        return record[name], forward


def check_parity(forward: Forward, reference: np.ndarray, sample: np.ndarray) -> dict:
    """The verdict on ``forward``: its largest difference from TensorFlow's features of ``sample``."""
    difference = float(np.abs(np.asarray(forward(sample), np.float32) - reference).max())
    difference = difference if math.isfinite(difference) else math.inf  # NaN features: as far as can be
    return {"max_abs_diff": difference, "passed": difference <= PARITY_ATOL}


def benchmark(forward: Forward, images: np.ndarray, repeats: int = 5) -> float:
    """Images per second of ``forward`` on ``images``: the median of ``repeats`` timed calls after a warm-up."""
    forward(images)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        forward(images)
        times.append(time.perf_counter() - started)
    return len(images) / statistics.median(times)


def synthetic_batch(size: int, count: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed batch of ``count`` uint8 images: smooth colour gradients with seeded noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images = []
    for _ in range(count):
        weights = rng.uniform(0, 1, (3, 2))
        base = weights[:, 0, None, None] * ramp[None, :, None] + weights[:, 1, None, None] * ramp[None, None, :]
        noise = rng.normal(0, 20, (3, size, size))
        images.append(np.clip(base / 2 + noise, 0, 255).transpose(1, 2, 0))
    return np.stack(images).astype(np.uint8)


@dataclasses.dataclass
class Choice:
    name: str
    forward: Forward
    note: str | None = None  # one line for the user: a fallback, or why a runtime was passed over


@functools.lru_cache(maxsize=1)
def bfloat16_arithmetic() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (AVX512-BF16 or AMX), as OpenVINO reports it."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def requested_runtime(requested: str, precision: str) -> str:
    """``requested`` checked: known, installed, able to run ``precision``; for a reduced precision,
    ``auto`` settled here (float32's ``auto`` is settled on the first batch, by :func:`choose`).

    * ``bfloat16``: OpenVINO where the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX), else
      TensorFlow (its ``mixed_bfloat16`` model); OpenVINO by name on another CPU is refused.
    * ``int8``: OpenVINO only (it runs the quantized network; ONNX Runtime ran the same file at a third
      of its float32 speed, TensorFlow cannot run it).
    """
    if requested != AUTO and requested not in RUNTIMES:
        raise ConfigError(f"unknown runtime {requested!r}; choose one of: {', '.join(list_runtimes())}")
    if precision == "int8":
        if requested not in (AUTO, OPENVINO):
            raise ConfigError(
                f"int8 features are made in OpenVINO only; use --runtime openvino or auto ({requested} given)"
            )
        if not installed(OPENVINO):
            raise ConfigError(
                f"--precision int8 runs in OpenVINO, which is not installed: {RUNTIMES.get(OPENVINO).install}"
            )
        return OPENVINO
    if precision == "bfloat16":
        if requested == AUTO:
            return OPENVINO if installed(OPENVINO) and bfloat16_arithmetic() else TENSORFLOW
        if requested == OPENVINO:
            if not installed(OPENVINO):
                raise ConfigError(f"runtime 'openvino' is not installed: {RUNTIMES.get(OPENVINO).install}")
            if not bfloat16_arithmetic():
                raise ConfigError(
                    "--runtime openvino --precision bfloat16 needs a CPU with AVX512-BF16 or AMX, which this one "
                    "lacks (it would emulate bfloat16, slower than float32); use --precision float32 or "
                    "--runtime tensorflow"
                )
            return OPENVINO
        if requested != TENSORFLOW:
            raise ConfigError(f"--precision bfloat16 runs in TensorFlow or OpenVINO, not {requested}")
        return TENSORFLOW
    if requested in (AUTO, TENSORFLOW):
        return requested
    if not installed(requested):
        raise ConfigError(f"runtime {requested!r} is not installed: {RUNTIMES.get(requested).install}")
    return requested


def choose(
    requested: str,
    tensorflow: Forward,
    network: Callable[..., Path | None],
    images: np.ndarray,
    threads: int,
    what: str,
    job_images: int | None = None,
) -> Choice:
    """The runtime that runs ``what`` from now on, its parity checked on ``images`` (real, decoded) when new.

    Parameters
    ----------
    requested : {"auto", "tensorflow", "onnxruntime", "openvino"}
        ``auto``: the first of :data:`PREFERENCE` that is installed and passes the parity check.
    tensorflow : callable
        The reference: the TensorFlow forward pass.
    network : callable
        Returns the cached ONNX file, converting on first use (``network(convert=False)``: None instead
        of converting); its verdicts are stored beside it.
    images : ndarray
        The first real batch of the job.
    threads : int
        CPU threads the runtime may use.
    what : str
        The network, as the user knows it (for messages).
    job_images : int, optional
        How many images the job has (None: unknown, or a server's endless stream). ``auto`` converts a
        network for a job of at least :data:`MIN_IMAGES_TO_CONVERT` only; a smaller one runs in
        TensorFlow unless the network is already cached.
    """
    if requested == TENSORFLOW:
        return Choice(TENSORFLOW, tensorflow)
    order = [requested] if requested != AUTO else [n for n in PREFERENCE if n != TENSORFLOW and installed(n)]
    if not order:
        return Choice(TENSORFLOW, tensorflow)
    convert = requested != AUTO or job_images is None or job_images >= MIN_IMAGES_TO_CONVERT
    try:
        path = network(convert=convert)
        if path is None:  # too small a job to repay the conversion
            return Choice(TENSORFLOW, tensorflow)
    except Exception as exc:  # whatever tf2onnx cannot convert runs where it was built
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        return Choice(
            TENSORFLOW, tensorflow, f"{what} could not be converted to ONNX ({reason}); it runs in TensorFlow"
        )
    sample, passed_over = images[:PARITY_IMAGES], []
    reference = functools.cache(lambda: tensorflow(sample))
    for name in order:
        try:
            verdict, forward = verdict_of(name, path, threads, sample, reference)
            if verdict["passed"]:
                forward = forward or load(name, path, threads)
                return Choice(name, lambda batch, run=forward: np.asarray(run(batch), np.float32), note(passed_over))
        except UnreadableNetwork as exc:  # a damaged file: auto goes on, a runtime by name says which file
            if requested != AUTO:
                raise
            passed_over.append(f"{name}: {exc.reason}")
            continue
        if requested != AUTO:
            raise PTLError(
                f"{requested} gives features of {what} up to {verdict['max_abs_diff']:.2g} away "
                f"from TensorFlow's (the limit is {PARITY_ATOL:g}); refused: use --runtime tensorflow"
            )
        passed_over.append(
            f"{name}: {verdict['max_abs_diff']:.2g} from TensorFlow's features, above the parity limit {PARITY_ATOL:g}"
        )
    return Choice(TENSORFLOW, tensorflow, note(passed_over))


def note(passed_over: list[str]) -> str | None:
    if not passed_over:
        return None
    return f"runtime auto passed over {'; '.join(passed_over)}"


def survey(
    tensorflow: Forward, network: Callable[[], Path], input_size: int, threads: int, timed: bool = False
) -> list[dict]:
    """Every registered runtime on this machine: installed or how to install it, its parity verdict and,
    with ``timed``, its speed on :func:`synthetic_batch` (:func:`benchmark`), in :data:`PREFERENCE` order.

    A runtime without a verdict here yet is checked on the synthetic batch (and the verdict stored).
    """
    images = synthetic_batch(input_size)
    sample, path, rows = images[:PARITY_IMAGES], None, []
    reference = functools.cache(lambda: tensorflow(sample))
    for name in PREFERENCE:
        row = {"runtime": name, "installed": installed(name), "install": RUNTIMES.get(name).install}
        forward = tensorflow if name == TENSORFLOW else None
        if name != TENSORFLOW and row["installed"]:
            path = path or network()
            verdict, forward = verdict_of(name, path, threads, sample, reference)
            forward = forward or load(name, path, threads)  # a damaged file: an error that names it
            row.update(verdict)
        if timed and forward is not None:
            row["img_per_s"] = benchmark(forward, images)
        rows.append(row)
    return rows
