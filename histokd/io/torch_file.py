"""Read ``torch.save`` files without PyTorch, through a restricted unpickler.

PyTorch writes two on-disk formats:

* the zip format (PyTorch >= 1.6): ``<name>/data.pkl`` plus one raw file per
  storage under ``<name>/data/``;
* the legacy format: magic number, protocol, system info and the object pickled
  one after another, then the storages as ``int64 numel`` + raw bytes each.

Both are read with a :class:`pickle.Unpickler` that maps
``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage`` types to numpy and
never runs code named by the file: any other class becomes an inert placeholder.
The module needs numpy only (no Keras, TensorFlow or torch).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from histokd.errors import WeightsError

__all__ = ["read_torch_file"]

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. inside the pickle: only its dtype matters."""

    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    @property
    def itemsize(self):
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize


class _Storage:
    """A flat storage whose bytes are filled in once they are read."""

    def __init__(self, stype: _StorageType, numel: Optional[int] = None):
        self.stype = stype
        self.numel = numel
        self.array: Optional[np.ndarray] = None

    def set_bytes(self, raw: bytes, little_endian: bool = True):
        if self.stype.dtype == "bfloat16":  # numpy has no bfloat16: widen to float32
            u16 = np.frombuffer(raw, dtype="<u2" if little_endian else ">u2").astype(np.uint32)
            self.array = (u16 << 16).view(np.float32)
            return
        dt = np.dtype(self.stype.dtype).newbyteorder("<" if little_endian else ">")
        arr = np.frombuffer(raw, dtype=dt)
        if not dt.isnative:
            arr = arr.astype(dt.newbyteorder("="))
        self.array = arr


class _TensorRef:
    """A tensor whose storage may not have been read yet (legacy format)."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.array
        if flat is None:
            raise WeightsError("checkpoint is truncated: a tensor's storage was never written; "
                               "re-download or re-save the file")
        if not self.size:
            return np.array(flat[self.offset])
        needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if min(self.size) > 0 and needed > flat.size:
            raise WeightsError(f"checkpoint is corrupt: a tensor of shape {self.size} needs {needed} "
                               f"elements but its storage holds {flat.size}; re-download the file")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * flat.itemsize for s in self.stride])
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *args, **kwargs):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *args, **kwargs):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


class _TensorMarker:
    """Stands for ``torch.Tensor`` / ``torch.nn.Parameter`` classes (only passed around)."""


class _Opaque:
    """An inert stand-in for any class the checkpoint names that we do not trust.

    Calling, constructing or restoring it stores the arguments and runs nothing,
    so a checkpoint that carries extra objects (optimizer state, numpy scalars,
    argparse namespaces) still yields its tensors.
    """

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<unloaded {self._qualname}>"


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorMarker,
    ("torch.nn.parameter", "Parameter"): _TensorMarker,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
    ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storage_for):
        super().__init__(file, encoding="latin1")
        self._storage_for = storage_for

    def find_class(self, module, name):
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        return type(name, (_Opaque,), {"_qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise WeightsError(f"unsupported object reference {pid!r} in the checkpoint; only tensors "
                               "can be read — save a state dict (model.state_dict()) instead")
        return self._storage_for(pid)


def _resolve(obj):
    """Replace every tensor reference in nested containers by a numpy array."""
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _read_zip(path: Path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise WeightsError(f"{path} is a zip file but not a PyTorch checkpoint (no <name>/data.pkl); "
                               "pass the .tar/.pth file saved by torch.save")
        root = pkl[0].split("/")[0]
        little = True
        if f"{root}/byteorder" in names:
            little = zf.read(f"{root}/byteorder").decode().strip() != "big"
        storages: Dict[str, _Storage] = {}

        def storage_for(pid):
            _, stype, key, _location, numel = pid[:5]
            if key not in storages:
                st = _Storage(stype, numel)
                try:
                    raw = zf.read(f"{root}/data/{key}")
                except KeyError:
                    raise WeightsError(f"{path} is truncated: storage {root}/data/{key} is missing; "
                                       "re-download the checkpoint") from None
                st.set_bytes(raw, little)
                storages[key] = st
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), storage_for).load()
    return _resolve(obj)


def _read_legacy(path: Path):
    with open(path, "rb") as f:
        up = lambda: _RestrictedUnpickler(f, _no_storage).load()  # noqa: E731
        magic = up()
        if magic != _LEGACY_MAGIC:
            raise WeightsError(f"{path} is a pickle but not a PyTorch checkpoint (bad magic number); "
                               "pass the .tar/.pth file saved by torch.save")
        protocol = up()
        if protocol != 1001:
            raise WeightsError(f"{path}: unsupported legacy PyTorch protocol {protocol}")
        sys_info = up()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: Dict[str, _Storage] = {}
        views = []

        def storage_for(pid):
            _, stype, key, _location, numel = pid[:5]
            view = pid[5] if len(pid) > 5 else None
            if key not in storages:
                storages[key] = _Storage(stype, numel)
            if view is not None:
                view_key, offset, size = view
                vs = _Storage(stype, size)
                views.append((vs, storages[key], int(offset), int(size)))
                return vs
            return storages[key]

        obj = _RestrictedUnpickler(f, storage_for).load()
        keys = _RestrictedUnpickler(f, _no_storage).load()
        for key in keys:
            header = f.read(8)
            if len(header) < 8:
                raise WeightsError(f"{path} is truncated (storage {key} missing); re-download it")
            (numel,) = struct.unpack("<q" if little else ">q", header)
            st = storages.get(key)
            if st is None:
                raise WeightsError(f"{path} is corrupt: storage {key} is not referenced")
            raw = f.read(numel * st.stype.itemsize)
            if len(raw) < numel * st.stype.itemsize:
                raise WeightsError(f"{path} is truncated inside storage {key}; re-download it")
            st.set_bytes(raw, little)
        for vs, root, offset, size in views:
            vs.array = root.array[offset:offset + size]
    return _resolve(obj)


def _no_storage(pid):
    raise WeightsError("unexpected tensor data in a checkpoint header; the file is corrupt")


def read_torch_file(path) -> object:
    """Read a file written by ``torch.save`` without importing torch.

    Tensors come back as numpy arrays (bfloat16 widened to float32); dicts,
    lists and tuples keep their structure; objects of other classes become inert
    placeholders (no code from the file is run).

    Args:
        path: str or Path. A PyTorch checkpoint (zip or legacy format).

    Returns:
        The unpickled object with numpy arrays in place of tensors.

    Example:
        >>> obj = read_torch_file("hovernet_fast_pannuke_type_tf2pytorch.tar")  # doctest: +SKIP
        >>> obj["desc"]["conv0./.weight"].shape  # doctest: +SKIP
        (64, 3, 7, 7)
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; pass the path of the downloaded weights file")
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":
        try:
            return _read_legacy(path)
        except (pickle.UnpicklingError, EOFError, struct.error) as exc:
            raise WeightsError(f"{path} cannot be read as a PyTorch checkpoint ({exc}); "
                               "re-download the file") from None
    if tarfile.is_tarfile(path):
        raise WeightsError(f"{path} uses PyTorch's pre-1.0 tar format, which histokd cannot read; "
                           "re-save it once with torch: torch.save(torch.load(p), p)")
    raise WeightsError(f"{path} is not a PyTorch checkpoint (neither zip nor pickle); "
                       "pass the .tar/.pth file saved by torch.save, or an .npz of the state dict")
