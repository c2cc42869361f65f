"""Load the official HoVer-Net checkpoints into the Keras :class:`HoVerNet` — without PyTorch.

The released weights are PyTorch files: vqdang/hover_net's ``*.tar`` is
``torch.save({"desc": state_dict})`` and TIAToolbox's ``hovernet_*.pth`` is a bare
state dict, sometimes with a ``module.`` prefix and ``num_batches_tracked``
entries. They are read without PyTorch by :func:`histokd.io.read_torch_file`
(a restricted unpickler that never runs code from the file). Weights
are never bundled or downloaded: the PanNuke-trained weights are CC BY-NC-SA 4.0,
so the user names the file (``histokd masks --weights PATH``).

The checkpoint → Keras correspondence is the explicit table returned by
:func:`official_key_table` (PyTorch key → Keras layer name, weight slot, PyTorch
shape), derived from the official network (vqdang/hover_net
``models/hovernet/net_desc.py``; key list in ``variables_tf2pytorch.csv``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from histokd.errors import WeightsError
# The generic reader lives in histokd.io; both names stay importable from here.
from histokd.io.torch_file import _LEGACY_MAGIC, read_torch_file  # noqa: F401

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
