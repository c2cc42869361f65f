"""Load the official HoVer-Net checkpoints into the Keras :class:`HoVerNet` — without PyTorch.

The released weights are PyTorch files: vqdang/hover_net's ``*.tar`` is
``torch.save({"desc": state_dict})`` and TIAToolbox's ``hovernet_*.pth`` is a bare
state dict, sometimes with a ``module.`` prefix and ``num_batches_tracked``
entries. This module reads PyTorch's two on-disk formats itself:

* the zip format (PyTorch ≥ 1.6): ``<name>/data.pkl`` plus one raw file per
  storage under ``<name>/data/``;
* the legacy format: magic number, protocol, system info and the object pickled
  one after another, then the storages as ``int64 numel`` + raw bytes each,

with a restricted :class:`pickle.Unpickler` that maps
``torch._utils._rebuild_tensor_v2`` and the ``torch.*Storage`` types to numpy and
refuses to run any other code (unknown classes become inert placeholders). Weights
are never bundled or downloaded: the PanNuke-trained weights are CC BY-NC-SA 4.0,
so the user names the file (``histokd masks --weights PATH``).

The checkpoint → Keras correspondence is the explicit table returned by
:func:`official_key_table` (PyTorch key → Keras layer name, weight slot, PyTorch
shape), derived from the official network (vqdang/hover_net
``models/hovernet/net_desc.py``; key list in ``variables_tf2pytorch.csv``).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from histokd.errors import WeightsError

__all__ = [
    "KeyMapping",
    "official_key_table",
    "read_torch_file",
    "read_state_dict",
    "detect_hovernet_config",
    "load_official_checkpoint",
    "load_state_dict_into",
    "convert_checkpoint_to_npz",
]

# --------------------------------------------------------------------------------------
# PyTorch serialisation reader (no torch import)
# --------------------------------------------------------------------------------------

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


def read_state_dict(path) -> Dict[str, np.ndarray]:
    """Read a HoVer-Net state dict from a ``.tar``/``.pth``/``.pt`` or ``.npz`` file.

    Unwraps ``{"desc": state_dict}`` (vqdang/hover_net) and ``{"state_dict": ...}``
    / ``{"model": ...}`` containers, strips a ``module.`` prefix (DataParallel) and
    drops ``*.num_batches_tracked`` and ``upsample2x.unpool_mat``.

    Args:
        path: str or Path.

    Returns:
        dict of PyTorch key → numpy array (PyTorch layout, e.g. conv OIHW).

    Example:
        >>> sd = read_state_dict("hovernet_fast-pannuke.pth")  # doctest: +SKIP
    """
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise WeightsError(f"checkpoint {path} does not exist; pass the path of the weights file")
        with np.load(path) as z:
            obj = {k: z[k] for k in z.files}
    else:
        obj = read_torch_file(path)
    for wrapper in ("desc", "state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict; save "
                           "model.state_dict() (or {'desc': state_dict}) instead")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        if key.endswith("num_batches_tracked") or key == "upsample2x.unpool_mat":
            continue
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                               "pass a state dict of tensors")
        out[key] = value
    if not out:
        raise WeightsError(f"{path} contains no tensors; pass a HoVer-Net state dict")
    return out


def convert_checkpoint_to_npz(path, out) -> Path:
    """Write a checkpoint's state dict to ``.npz`` (same keys) for fast repeated loading.

    Args:
        path: str or Path. ``.tar``/``.pth`` checkpoint.
        out: str or Path. Destination ``.npz``.

    Returns:
        The output path.

    Example:
        >>> convert_checkpoint_to_npz("hovernet_fast-pannuke.pth", "hovernet.npz")  # doctest: +SKIP
    """
    out = Path(out)
    np.savez(out, **read_state_dict(path))
    return out


# --------------------------------------------------------------------------------------
# The explicit key table
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyMapping:
    """One checkpoint tensor: its PyTorch key and shape, and where it goes in Keras.

    Attributes:
        torch_key: str. State-dict key (``d0.units.1.conv2.weight``).
        layer: str. Keras layer name (``d0_units_1_conv2``).
        slot: str. Keras weight attribute (``kernel``, ``bias``, ``gamma``, ``beta``,
            ``moving_mean``, ``moving_variance``).
        shape: tuple. PyTorch shape (conv OIHW).
    """

    torch_key: str
    layer: str
    slot: str
    shape: Tuple[int, ...]


_BN_SLOTS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_variance"))


def _layer_name(module: str) -> str:
    if module == "conv0./":
        return "conv0_conv"
    return module.replace(".", "_").replace("/", "_")


def official_key_table(mode: str = "fast", num_types: int = 6) -> List[KeyMapping]:
    """Every tensor of the official HoVer-Net state dict, in state-dict order.

    Args:
        mode: str. ``"fast"`` or ``"original"``.
        num_types: int. Type classes (0 = no ``tp`` branch).

    Returns:
        list of :class:`KeyMapping` (666 + 1 entries for fast/6 types: 144 convs,
        130 BNs, the output biases), without ``num_batches_tracked`` and
        ``upsample2x.unpool_mat``.

    Example:
        >>> official_key_table("fast", 6)[0]
        KeyMapping(torch_key='conv0./.weight', layer='conv0_conv', slot='kernel', shape=(64, 3, 7, 7))
    """
    from histokd.nuclei.hovernet import ENCODER_GROUPS, MODES

    ksize = MODES[mode]["ksize"]
    table: List[KeyMapping] = []

    def conv(module, cout, cin, k, bias=False):
        table.append(KeyMapping(f"{module}.weight", _layer_name(module), "kernel", (cout, cin, k, k)))
        if bias:
            table.append(KeyMapping(f"{module}.bias", _layer_name(module), "bias", (cout,)))

    def bn(module, ch):
        for tslot, kslot in _BN_SLOTS:
            table.append(KeyMapping(f"{module}.{tslot}", _layer_name(module), kslot, (ch,)))

    conv("conv0./", 64, 3, 7)
    bn("conv0.bn", 64)
    in_ch = 64
    for g, (c1, c2, c3), units, _stride in ENCODER_GROUPS:
        unit_in = in_ch
        for i in range(units):
            p = f"d{g}.units.{i}"
            if i > 0:
                bn(f"{p}.preact/bn", unit_in)
            conv(f"{p}.conv1", c1, unit_in, 1)
            bn(f"{p}.conv1/bn", c1)
            conv(f"{p}.conv2", c2, c1, 3)
            bn(f"{p}.conv2/bn", c2)
            conv(f"{p}.conv3", c3, c2, 1)
            unit_in = c3
        conv(f"d{g}.shortcut", c3, in_ch, 1)
        bn(f"d{g}.blk_bna.bn", c3)
        in_ch = c3
    conv("conv_bot", 1024, 2048, 1)

    branches = ([("tp", num_types)] if num_types else []) + [("np", 2), ("hv", 2)]
    for branch, out_ch in branches:
        p = f"decoder.{branch}"
        for stage, cin, cmid, units, cf in (("u3", 1024, 256, 8, 512), ("u2", 512, 128, 4, 256)):
            conv(f"{p}.{stage}.conva", cmid, cin, ksize)
            ch = cmid
            for i in range(units):
                q = f"{p}.{stage}.dense.units.{i}"
                bn(f"{q}.preact_bna/bn", ch)
                conv(f"{q}.conv1", 128, ch, 1)
                bn(f"{q}.conv1/bn", 128)
                conv(f"{q}.conv2", 32, 128 // 4, ksize)  # groups=4: in_ch/groups per kernel
                ch += 32
            bn(f"{p}.{stage}.dense.blk_bna.bn", ch)
            conv(f"{p}.{stage}.convf", cf, cf, 1)
        conv(f"{p}.u1.conva", 64, 256, ksize)
        bn(f"{p}.u0.bn", 64)
        conv(f"{p}.u0.conv", out_ch, 64, 1, bias=True)
    return table


def detect_hovernet_config(state_dict: Dict[str, np.ndarray]) -> Tuple[str, int]:
    """Infer ``(mode, num_types)`` from a state dict.

    Mode comes from the kernel size of ``decoder.np.u3.conva.weight`` (5 →
    original, 3 → fast), the number of types from ``decoder.tp.u0.conv.weight``
    (absent → 0).

    Args:
        state_dict: dict of key → array.

    Returns:
        (mode, num_types).

    Example:
        >>> detect_hovernet_config(read_state_dict("hovernet_fast-pannuke.pth"))  # doctest: +SKIP
        ('fast', 6)
    """
    key = "decoder.np.u3.conva.weight"
    if key not in state_dict:
        sample = ", ".join(sorted(state_dict)[:5])
        raise WeightsError(f"not a HoVer-Net checkpoint: key {key!r} is missing (keys start with: "
                           f"{sample}); pass an official HoVer-Net .tar/.pth file")
    shape = state_dict[key].shape
    if len(shape) != 4 or shape[2] not in (3, 5):
        raise WeightsError(f"{key} has shape {list(shape)}; expected [256, 1024, k, k] with k = 3 "
                           "(fast) or 5 (original)")
    mode = "original" if shape[2] == 5 else "fast"
    tp = state_dict.get("decoder.tp.u0.conv.weight")
    num_types = int(tp.shape[0]) if tp is not None else 0
    return mode, num_types


def _check_state_dict(state_dict, table, source):
    expected = {m.torch_key for m in table}
    for m in table:
        if m.torch_key not in state_dict:
            raise WeightsError(f"{source}: key {m.torch_key!r} (shape {list(m.shape)}) is missing; "
                               "the file does not fit this HoVer-Net mode / number of types")
        got = tuple(state_dict[m.torch_key].shape)
        if got != m.shape:
            raise WeightsError(f"{source}: {m.torch_key!r} has shape {list(got)} but the architecture "
                               f"needs {list(m.shape)}; the file does not fit this HoVer-Net mode / "
                               "number of types")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise WeightsError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} in all) that the "
                           "HoVer-Net architecture does not have; is this a HoVer-Net checkpoint?")


def load_state_dict_into(model, state_dict: Dict[str, np.ndarray], source: str = "state dict",
                         checked: bool = False):
    """Copy an official-layout state dict into a Keras :class:`HoVerNet`.

    Conv weights go OIHW → HWIO (transpose (2, 3, 1, 0)); grouped convs keep
    their group order; BN weight/bias/running_mean/running_var → gamma, beta,
    moving_mean, moving_variance.

    Args:
        model: HoVerNet. Target model (its mode and number of types must fit).
        state_dict: dict of PyTorch key → array.
        source: str. Name used in error messages.
        checked: bool. Skip the key/shape validation (already done by the caller).

    Returns:
        The model.

    Example:
        >>> load_state_dict_into(HoVerNet("fast", 6), read_state_dict(p))  # doctest: +SKIP
    """
    table = official_key_table(model.mode, model.num_types)
    if not checked:
        _check_state_dict(state_dict, table, source)
    for m in table:
        value = np.asarray(state_dict[m.torch_key], dtype=np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        var = getattr(model.get_layer(m.layer), m.slot)
        var.assign(value)
    return model


def load_official_checkpoint(path, mode: Optional[str] = None, num_types: Optional[int] = None,
                             input_size: Optional[int] = None):
    """Build a :class:`HoVerNet` holding the weights of an official checkpoint.

    Reads vqdang/hover_net ``.tar`` files (``{"desc": state_dict}``), TIAToolbox
    ``.pth`` files (bare state dict), either with a ``module.`` prefix, or an
    ``.npz`` of the state dict — without importing PyTorch. Mode and number of
    types are detected from the tensors; passing them checks the file against
    what you expect.

    Graham et al., HoVer-Net (MedIA 2019); the released PanNuke model is fast
    mode with 6 types (hover_net ``run_tile.sh``; TIAToolbox ``hovernet_fast-pannuke``).
    Its weights are CC BY-NC-SA 4.0: histokd never bundles or downloads them.

    Args:
        path: str or Path. The checkpoint file.
        mode: str or None. Expected mode; a different mode in the file is an error.
        num_types: int or None. Expected number of types (0 = no type branch).
        input_size: int or None. Input window of the built model (default 256 / 270).

    Returns:
        HoVerNet with the checkpoint's weights.

    Raises:
        WeightsError: the file is missing, not a PyTorch/HoVer-Net checkpoint, of
            another mode/type count than requested, or a key/shape does not fit
            (the message names the first offending key).

    Example:
        >>> net = load_official_checkpoint("hovernet_fast_pannuke_type_tf2pytorch.tar")  # doctest: +SKIP
        >>> net.mode, net.num_types  # doctest: +SKIP
        ('fast', 6)
    """
    from histokd.nuclei.hovernet import HoVerNet

    state_dict = read_state_dict(path)
    found_mode, found_types = detect_hovernet_config(state_dict)
    if mode is not None and mode != found_mode:
        raise WeightsError(f"{path} is a {found_mode!r}-mode HoVer-Net (decoder kernel "
                           f"{3 if found_mode == 'fast' else 5}) but mode={mode!r} was requested; "
                           f"use mode={found_mode!r} or the checkpoint made for {mode!r} mode")
    if num_types is not None and int(num_types) != found_types:
        raise WeightsError(f"{path} has {found_types} nuclear types (decoder.tp.u0.conv) but "
                           f"num_types={num_types} was requested; use num_types={found_types}")
    # Validate before the (slow) model build so a bad file fails fast.
    _check_state_dict(state_dict, official_key_table(found_mode, found_types), str(path))
    model = HoVerNet(mode=found_mode, num_types=found_types, input_size=input_size)
    return load_state_dict_into(model, state_dict, source=str(path), checked=True)
