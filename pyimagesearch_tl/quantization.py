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

from .errors import PTLError

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

    def nearest(features):
        return ((features[:, None, :] - centroids[None]) ** 2).sum(axis=2).argmin(axis=1)

    return dict(
        images=len(labels),
        cosine=round(float(cosine.mean()), 4),
        min_cosine=round(float(cosine.min()), 4),
        agreement=round(float((nearest(reference) == nearest(reduced)).mean()), 4),
    )


def check_quality(figures: dict[str, float], precision: str, what: str) -> str:
    """The figures as stored in the feature files (JSON), or :class:`QualityError` below a floor."""
    if figures["cosine"] < MIN_COSINE or figures["agreement"] < MIN_AGREEMENT:
        raise QualityError(
            f"{precision} features of {what} are too far from float32's on {figures['images']} photos of this job "
            f"(mean cosine {figures['cosine']:.4f}, floor {MIN_COSINE}; probe agreement {figures['agreement']:.4f}, "
            f"floor {MIN_AGREEMENT}); refused: use --precision float32"
        )
    return json.dumps(dict(figures, precision=precision), sort_keys=True)


#: The int8 network, as written into a features folder beside the feature files it made.
NETWORK_FILE = "network.int8.onnx"


def prepare(dataset_dir: Path, by_split: dict[str, list[dict[str, str]]], splits: Sequence[str], options: dict) -> dict:
    """What a job at a reduced precision adds to its extractor options, before it extracts anything:
    for int8 the quantized network (calibrated on a seeded sample of the ``training`` split, else of the
    first split), and the quality gate's figures on a seeded sample of the job's own photos
    (:class:`QualityError` below a floor)."""
    from .features import FeatureExtractor

    extractor = FeatureExtractor(**options)
    added = {}
    if options["precision"] == "int8":
        rows = by_split.get("training") or by_split[splits[0]]
        images, _ = _decoded(extractor, dataset_dir, sample_rows(rows, CALIBRATION_IMAGES))
        added["network"] = extractor.quantize(images)
    rows = sample_rows([row for split in splits for row in by_split[split]], GATE_IMAGES, SEED + 1)
    images, labels = _decoded(extractor, dataset_dir, rows)
    reference = FeatureExtractor(**dict(options, precision="float32"))
    figures = quality(reference.transform(images), extractor.transform(images), labels)
    added["quality"] = check_quality(figures, options["precision"], extractor.meta.describe())
    return added


def _decoded(extractor, dataset_dir: Path, rows: Sequence[dict[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``rows`` that decode, as the extractor sees them, and their labels."""
    from .errors import ImageError

    images, labels = [], []
    for row in rows:
        try:
            images.append(extractor.decode(Path(dataset_dir) / row["path"]))
        except ImageError:  # the job itself reports it as skipped
            continue
        labels.append(row["label"])
    if not images:
        raise PTLError(f"none of the {len(rows)} photos sampled from dataset {dataset_dir} could be decoded")
    return np.stack(images), np.array(labels)


def write_network(output_dir: Path, network: bytes) -> None:
    """Put the int8 network beside the feature files it made (training puts it in the bundle)."""
    from .atomic import atomic_path

    with atomic_path(Path(output_dir) / NETWORK_FILE) as temporary:
        Path(temporary).write_bytes(network)


def read_network(folder: Path, meta) -> bytes | None:
    """The int8 network of the feature files of ``folder`` (None for other precisions), checked against
    the SHA-256 their metadata records."""
    from .errors import FeatureFileError

    if meta.precision != "int8":
        return None
    path = Path(folder) / NETWORK_FILE
    try:
        network = path.read_bytes()
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
