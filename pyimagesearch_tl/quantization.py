"""Reduced precision: the int8 network, calibrated on the dataset's own photos, and the quality gate.

``--precision int8`` quantizes the extractor's exported float32 network (uint8 pixels in, features
out) after training, with NNCF's post-training static quantization of the ONNX graph: a seeded sample
of :data:`CALIBRATION_IMAGES` of the dataset's training photos sets the activations' ranges, and the
result is a QDQ ONNX file that OpenVINO runs with int8 arithmetic. It is cached under a key made of
the float32 network's SHA-256, the calibration photos' content and NNCF's version; its own SHA-256
goes into the feature layout (``network_sha256``), so features of two quantizations are never mixed,
and the file travels with the features folder and the bundle (prediction runs that very network).

Chosen by measurement (2-core AMD EPYC, AVX-512, EfficientNet-Lite0, 400 cats/dogs photos): NNCF on the
ONNX graph, run in OpenVINO, 920 img/s on decoded tensors against 285 for OpenVINO float32 and 168 for
TensorFlow float32, mean cosine 0.9955 to float32 features, logistic-regression accuracy 0.9925
against 0.9900. NNCF on OpenVINO's own model ran 415 img/s; ONNX Runtime ran the QDQ file at 89 img/s.
NNCF's settings (:data:`~pyimagesearch_tl.runtimes.NNCF_SETTINGS`) keep the stem convolution in float32
and every weight in 7 bits, so that CPUs without VNNI compute the same features up to rounding (Xeon with
AMX against AVX2 only: 1 - cosine 0.0005 at most, an eighth of int8's own error): the network travels with
the features and the bundle to machines the gate never ran on.

Every reduced precision (``int8``, ``bfloat16``) passes the quality gate before a job extracts
anything: on a seeded sample of the job's own photos, the features are compared with float32's (mean
cosine similarity) and a nearest-centroid probe fitted on the float32 features must classify the
reduced features as it classifies the float32 ones (agreement). Below :data:`MIN_COSINE` or
:data:`MIN_AGREEMENT` the job is refused (``--precision float32`` is the way out); the figures are
printed and stored in every feature file's metadata (``quality``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError, FeatureFileError, ImageError, PTLError
from .store import LAYOUT_FIELDS, FeatureMeta

#: Training photos that calibrate an int8 network (a seeded sample; all of them when there are fewer).
CALIBRATION_IMAGES = 300
#: Photos of the job the quality gate compares reduced-precision features on.
GATE_IMAGES = 128
#: The floors of the quality gate (measured on cats/dogs, Lite0: int8 0.9955 and bfloat16 0.9993 mean
#: cosine; a naive ONNX Runtime quantization, 0.903, is refused).
MIN_COSINE = 0.98
MIN_AGREEMENT = 0.95
SEED = 0


class QualityError(PTLError):
    """Reduced-precision features too far from float32's to be used."""


def sample_rows(rows: Sequence[dict[str, str]], count: int, seed: int = SEED) -> list[dict[str, str]]:
    """A seeded sample of ``count`` manifest rows (all of them when there are fewer), in manifest order:
    the same dataset gives the same sample on every machine."""
    if len(rows) <= count:
        return list(rows)
    chosen = np.random.default_rng(seed).choice(len(rows), count, replace=False)
    return [rows[i] for i in sorted(chosen)]


def quality(reference: np.ndarray, reduced: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How close ``reduced`` features are to the float32 ``reference`` ones of the same images.

    Returns ``cosine`` (the mean cosine similarity of the pairs), ``min_cosine``, and ``agreement``: the
    share of images a nearest-centroid probe, fitted on the reference features with ``labels``,
    classifies the same from either. ``images`` is the sample's size.
    """
    reference, reduced = np.asarray(reference, np.float64), np.asarray(reduced, np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(reduced, axis=1)
    cosine = (reference * reduced).sum(axis=1) / np.maximum(norms, 1e-12)
    classes = np.unique(labels)
    centroids = np.stack([reference[labels == c].mean(axis=0) for c in classes])

    def nearest(features):  # |x - c|^2 up to |x|^2, without a photos x classes x features array
        return ((centroids**2).sum(axis=1)[None] - 2 * features @ centroids.T).argmin(axis=1)

    return dict(
        images=len(labels),
        cosine=round(float(cosine.mean()), 4),
        min_cosine=round(float(cosine.min()), 4),
        agreement=round(float((nearest(reference) == nearest(reduced)).mean()), 4),
    )


def check_quality(figures: dict[str, float], precision: str, what: str, calibrated: int | None = None) -> str:
    """The figures as stored in the feature files (JSON), or :class:`QualityError` below a floor."""
    if figures["cosine"] < MIN_COSINE or figures["agreement"] < MIN_AGREEMENT:
        few = f", calibrated on only {calibrated} training photos" if calibrated is not None and calibrated < 32 else ""
        raise QualityError(
            f"{precision} features of {what}{few} are too far from float32's on {figures['images']} photos of this job "
            f"(mean cosine {figures['cosine']:.4f}, floor {MIN_COSINE}; probe agreement {figures['agreement']:.4f}, "
            f"floor {MIN_AGREEMENT}); refused: use --precision float32"
        )
    return json.dumps(dict(figures, precision=precision), sort_keys=True)


#: The int8 network, as written into a features folder beside the feature files it made, and its record
#: (the calibration key it was made for, its SHA-256).
NETWORK_FILE = "network.int8.onnx"
NETWORK_RECORD = "network.int8.json"
#: The largest quantized network read back from a folder or a bundle (EfficientNet-B7's is ~70 MB).
MAX_NETWORK_BYTES = 512 * 2**20


def calibration(
    dataset_dir: Path,
    by_split: dict[str, list[dict[str, str]]],
    splits: Sequence[str],
    layout: FeatureMeta,
    max_pixels: int,
) -> tuple[np.ndarray, str]:
    """The int8 calibration photos of a job of feature layout ``layout``, decoded as the extractor sees
    them (Pillow only: no backbone), and their key: the layout's settings, the photos' pixels and the
    tools' versions, the same on every machine for the same dataset (the converted float32 network is
    not: tf2onnx names its constants differently on each run)."""
    split = "training" if by_split.get("training") else splits[0]
    rows = sample_rows(by_split[split], CALIBRATION_IMAGES)
    what = f"the photos of the {split!r} split of dataset {dataset_dir} that calibrate int8"
    images, _ = _decoded(dataset_dir, rows, layout.input_size, layout.resizing, max_pixels, what)
    return images, calibration_key(layout, images)


def _decoded(dataset_dir: Path, rows, size: int, resize, max_pixels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The images of manifest ``rows`` that decode (as an extractor of ``size`` and ``resize`` sees them), and
    their labels; :class:`PTLError` naming ``what`` when none does (the job itself reports each one it skips)."""
    from .images import load_image

    images, labels = [], []
    for row in rows:
        try:
            images.append(load_image(Path(dataset_dir) / row["path"], size, max_pixels, resize))
        except ImageError:
            continue
        labels.append(row["label"])
    if not images:
        raise PTLError(f"none of the {len(rows)} {what} decode")
    return np.stack(images), np.array(labels)


def calibration_key(layout, images: np.ndarray) -> str:
    """The key of the int8 network of feature layout ``layout`` calibrated on ``images``: the layout's
    settings, the pixels and the tools' versions (the same on every machine)."""
    from .runtimes import NNCF_SETTINGS, OPSET, converter_version

    settings = {name: getattr(layout, name) for name in LAYOUT_SETTINGS}
    versions = dict(nncf=_version("nncf"), converter=converter_version(), opset=OPSET, settings=NNCF_SETTINGS)
    digest = hashlib.sha256(json.dumps(dict(settings, versions=versions), sort_keys=True).encode())
    digest.update(hashlib.sha256(np.ascontiguousarray(images).tobytes()).digest())
    return digest.hexdigest()[:32]


#: The layout fields that decide an int8 network: all but its width and its own digest (its outcome).
LAYOUT_SETTINGS = tuple(name for name in LAYOUT_FIELDS if name not in ("feature_dim", "network_sha256"))


def _version(package: str) -> str:
    import importlib.metadata
    import importlib.util

    try:
        if importlib.util.find_spec(package) is None:
            raise ImportError(package)
        return importlib.metadata.version(package)
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):  # ValueError: blocked
        raise ConfigError(
            "--precision int8 quantizes with NNCF, which is not installed: pip install 'pyimagesearch_tl[openvino]'"
        ) from None


def network(output_dir: Path, images: np.ndarray, key: str, options: dict) -> bytes:
    """The int8 network of a job: the output folder's own when it was made for ``key`` (no backbone built),
    else quantized (cached under ``key``) and written into the folder with its record."""
    folder = Path(output_dir)
    try:
        record = json.loads(read_bounded(folder / NETWORK_RECORD, 1 << 16))
        content = read_bounded(folder / NETWORK_FILE, MAX_NETWORK_BYTES)
        if record == {"calibration_key": key, "sha256": hashlib.sha256(content).hexdigest()}:
            return content
    except (OSError, ValueError):  # none yet, or not ours: made again
        pass
    from .atomic import atomic_path, atomic_write_json
    from .features import FeatureExtractor

    content = FeatureExtractor(**options).quantize(images, key)
    with atomic_path(folder / NETWORK_FILE) as temporary:
        Path(temporary).write_bytes(content)
    atomic_write_json(folder / NETWORK_RECORD, {"calibration_key": key, "sha256": hashlib.sha256(content).hexdigest()})
    return content


def gate(
    dataset_dir: Path,
    by_split: dict[str, list[dict[str, str]]],
    splits: Sequence[str],
    options: dict,
    calibrated: int | None = None,
) -> str:
    """The quality gate of a job at a reduced precision, before it extracts anything: its figures (JSON)
    on a seeded sample of the job's own photos, or :class:`QualityError` below a floor (``calibrated``:
    how many photos calibrated an int8 network, named when few)."""
    from .features import FeatureExtractor

    extractor = FeatureExtractor(**options)
    rows = sample_rows([row for split in splits for row in by_split[split]], GATE_IMAGES, SEED + 1)
    what = f"photos sampled from dataset {dataset_dir} for the quality gate"
    images, labels = _decoded(dataset_dir, rows, extractor.input_size, extractor.resize, options["max_pixels"], what)
    float32 = {k: v for k, v in options.items() if k != "network"} | {"precision": "float32"}
    figures = quality(FeatureExtractor(**float32).transform(images), extractor.transform(images), labels)
    return check_quality(figures, options["precision"], extractor.meta.describe(), calibrated)


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of regular file ``path`` (``OSError`` for anything else, or for more than ``limit`` bytes)."""
    from .cache import open_regular

    handle, status = open_regular(Path(path))
    with handle:
        if status.st_size > limit:
            raise OSError(0, f"larger than {limit} bytes", str(path))
        return handle.read(limit + 1)[:limit]


def read_network(folder: Path, meta) -> bytes | None:
    """The int8 network of the feature files of ``folder`` (None for other precisions), checked against
    the SHA-256 their metadata records."""
    if "int8" not in meta.precision:
        return None
    if len(meta.parts) > 1:
        raise FeatureFileError(
            f"the features of {folder} are int8: they cannot be combined with other feature folders (int8 takes one)"
        )
    path = Path(folder) / NETWORK_FILE
    try:
        network = read_bounded(path, MAX_NETWORK_BYTES)
    except OSError as exc:
        raise FeatureFileError(
            f"{path} cannot be read ({exc.strerror or exc}): int8 features need the network that made them; "
            "extract again"
        ) from None
    if hashlib.sha256(network).hexdigest() != meta.network_sha256:
        raise FeatureFileError(
            f"{path} is not the network that made the int8 features of {folder} (its SHA-256 differs); extract again"
        )
    return network


def network_problem(content: bytes, input_size: int, feature_dim: int) -> str | None:
    """What is wrong with ``content`` as the quantized network of a layout (None when nothing): not an ONNX
    model, data kept in other files, or not uint8 pixels of ``input_size`` in and ``feature_dim`` out."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_from_string(content)
    except Exception:  # protobuf's DecodeError and the like
        return "is not an ONNX model"
    if any(uses_external_data(t) for t in model.graph.initializer):
        return "refers to data in other files"
    inputs, outputs = model.graph.input, model.graph.output
    if len(inputs) != 1 or len(outputs) != 1:
        return f"has {len(inputs)} inputs and {len(outputs)} outputs, not 1 and 1"
    pixels, features = inputs[0].type.tensor_type, outputs[0].type.tensor_type
    shape = [d.dim_value or None for d in pixels.shape.dim]
    if pixels.elem_type != onnx.TensorProto.UINT8 or shape[1:] != [input_size, input_size, 3]:
        return f"does not take uint8 pixels of {input_size}x{input_size}x3"
    if [d.dim_value for d in features.shape.dim][-1:] != [feature_dim]:
        return f"does not give {feature_dim} features"
    return None
