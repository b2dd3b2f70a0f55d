"""Reading a legacy-format ``torch.save`` checkpoint into NumPy arrays, without torch.

A restricted unpickler admits only ``OrderedDict``, the tensor-rebuild function and the storage
types, and refuses anything else, so a checkpoint cannot run code while it is read.
"""

from __future__ import annotations

import dataclasses
import pickle
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import PTLError

#: ``torch.save``'s legacy-format magic number and protocol version.
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001


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
