"""Load pretrained Hugging Face / timm / Microsoft checkpoints into histokd backbones.

No PyTorch needed: :func:`read_safetensors` reads ``.safetensors`` files (8-byte
little-endian header length, JSON header, raw little-endian buffers) and
:func:`read_torch_state_dict` reads ``torch.save`` files (the zip format of
PyTorch ≥ 1.6 and the older "legacy" stream) with the restricted unpickler of
:mod:`histokd.nuclei.checkpoint`, which never imports or runs code from the file.

Checkpoint layouts are translated by explicit rename tables into histokd's
checkpoint-neutral names (``ViTBackbone.canonical_weights()`` /
``SwinV2Backbone.canonical_weights()``), with PyTorch ``[out, in]`` linear weights
transposed to Keras ``[in, out]`` and ``[O, I, kh, kw]`` convolutions to
``[kh, kw, I, O]``. Supported layouts:

* ``hf_vit`` — Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (file names of
  ``save_pretrained`` and the in-memory names of transformers ≥ 5);
* ``timm_vit`` — timm ``VisionTransformer`` (e.g. UNI-style ViT-L/16 with LayerScale);
* ``hf_swinv2`` — Hugging Face ``Swinv2Model`` / ``Swinv2ForImageClassification``;
* ``ms_swinv2`` / ``timm_swinv2`` — the official Swin V2 release and timm's layout.

Example:
    >>> from histokd.backbones.vit import vit_large
    >>> enc = vit_large(input_size=224, layer_scale_init=1e-5)
    >>> load_pretrained(enc, "uni/pytorch_model.bin")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from histokd.errors import WeightsError

# ======================================================================================
# safetensors
# ======================================================================================
_ST_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_ST_NAMES = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
             np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16",
             np.dtype("i1"): "I8", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}


def _bf16_to_f32(raw_u16: np.ndarray) -> np.ndarray:
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path) -> Dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into numpy (BF16 becomes float32).

    Args:
        path: str or Path. The file.

    Returns:
        dict mapping tensor names to arrays, in file order.

    Example:
        >>> sd = read_safetensors("model.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise WeightsError(f"{path} is not a safetensors file (shorter than 8 bytes); "
                               "re-download it")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise WeightsError(f"{path} is not a safetensors file (header length {n} exceeds the file "
                               f"size {size}); re-download it or pass a PyTorch .bin instead")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{path}: unreadable safetensors header ({e}); re-download the file") from None
    # memory-map the buffers so a multi-GB checkpoint is not held twice
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}; "
                               f"supported: {sorted(_ST_DTYPES)}")
        begin, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        dtype = _ST_DTYPES[dt]
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dtype.itemsize or end > len(data):
            raise WeightsError(f"{path}: tensor {name!r} (shape {shape}, {dt}) does not fit its byte range "
                               f"[{begin}, {end}); the file is truncated or corrupt")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=begin).reshape(shape)
        out[name] = _bf16_to_f32(arr) if dt == "BF16" else np.array(arr, copy=True)
    del data
    return out


def write_safetensors(path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str] | None = None):
    """Write numpy arrays as a ``.safetensors`` file (little-endian, 8-byte aligned header).

    Args:
        path: str or Path. Output file.
        tensors: dict of name → array (float64/32/16, int, uint8, bool).
        metadata: dict of str → str stored under ``__metadata__``.

    Example:
        >>> write_safetensors("w.safetensors", {"a": np.zeros((2, 3), "float32")})  # doctest: +SKIP
    """
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, arr in tensors.items():
        arr = np.asarray(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype not in _ST_NAMES:
            raise WeightsError(f"cannot write tensor {name!r} of dtype {arr.dtype} to safetensors")
        raw = arr.astype(dtype, copy=False).tobytes()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ======================================================================================
# torch.save files without torch
# ======================================================================================
def read_torch_state_dict(path, key: str | None = None) -> Dict[str, np.ndarray]:
    """Read a ``torch.save`` checkpoint (zip or legacy format) into numpy without importing torch.

    The file is parsed by :func:`histokd.nuclei.checkpoint.read_torch_file` (a restricted
    unpickler: only tensors, containers and plain values are rebuilt, nothing from the file
    is executed). Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, MoBY's
    ``{"model": ..., "optimizer": ...}``) are unwrapped.

    Args:
        path: str or Path. ``.bin`` / ``.pt`` / ``.pth`` file.
        key: str or None. Top-level entry holding the weights; None: detect
            (``state_dict``, ``model``, ``model_state_dict``, ``module``, ``teacher``…).

    Returns:
        dict mapping parameter names to numpy arrays (BF16 becomes float32).

    Example:
        >>> sd = read_torch_state_dict("pytorch_model.bin")  # doctest: +SKIP
    """
    from histokd.nuclei.checkpoint import read_torch_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; check the path")
    try:
        obj = read_torch_file(path)
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, struct.error, zipfile.BadZipFile) as e:
        raise WeightsError(f"cannot read the PyTorch checkpoint {path} ({type(e).__name__}: {e}); the file "
                           "is corrupt or not a torch.save file — re-download it") from None
    return _unwrap_state_dict(obj, key, path)


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "student", "net",
                "network", "encoder", "params")


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values())


def _unwrap_state_dict(obj, key, path):
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{path} has no entry {key!r}; top-level entries: {have}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} stores a pickled {obj!r} object, not a state_dict; in PyTorch run "
                           "torch.save(model.state_dict(), path) and load that file")
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for k in _NESTED_KEYS:
            if k in obj and isinstance(obj[k], dict):
                inner = {n: v for n, v in obj[k].items() if isinstance(v, np.ndarray)}
                if inner:
                    return inner
        tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
        if tensors:
            return tensors
        raise WeightsError(f"{path} holds no tensors at the top level; entries: {sorted(map(str, obj))[:20]}; "
                           "pass key=<entry> naming the state_dict")


def read_checkpoint(path, key: str | None = None) -> Dict[str, np.ndarray]:
    """Read a checkpoint file or a Hugging Face model folder into ``{name: array}``.

    Accepts ``.safetensors``, ``torch.save`` files (``.bin``/``.pt``/``.pth``), and a
    folder holding ``model.safetensors``, ``pytorch_model.bin`` or a sharded
    ``*.index.json`` of either.

    Args:
        path: str or Path. File or folder.
        key: str or None. Entry of a nested PyTorch checkpoint holding the weights.

    Example:
        >>> sd = read_checkpoint("hf_models/swinv2-tiny-patch4-window8-256")  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return read_checkpoint(path / name, key)
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (path / name).is_file():
                index = json.loads((path / name).read_text())
                out = {}
                for shard in sorted(set(index.get("weight_map", {}).values())):
                    out.update(read_checkpoint(path / shard, key))
                return out
        raise WeightsError(f"{path} holds no model.safetensors, pytorch_model.bin or shard index; "
                           "point to the checkpoint file itself")
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; check the path")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{":
        return read_safetensors(path)
    return read_torch_state_dict(path, key)


# ======================================================================================
# layout translation
# ======================================================================================
def _linear(w):
    if w.ndim != 2:
        raise WeightsError(f"expected a 2-D linear weight, got shape {w.shape}")
    return np.ascontiguousarray(w.T)


def _conv(w):
    if w.ndim != 4:
        raise WeightsError(f"expected a 4-D convolution weight, got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _copy(w):
    return w


_X = {"linear": _linear, "conv": _conv, "copy": _copy}
_GB = r"(weight|bias)"


def _norm(src_prefix, dst_prefix):
    return [(rf"{src_prefix}\.weight", f"{dst_prefix}.gamma", "copy"),
            (rf"{src_prefix}\.bias", f"{dst_prefix}.beta", "copy")]


def _dense(src_prefix, dst_prefix):
    return [(rf"{src_prefix}\.weight", f"{dst_prefix}.kernel", "linear"),
            (rf"{src_prefix}\.bias", f"{dst_prefix}.bias", "copy")]


# Hugging Face ViT: save_pretrained file names and transformers ≥ 5 in-memory names.
HF_VIT_RENAMES = [
    (r"embeddings\.cls_token", "cls_token", "copy"),
    (r"embeddings\.position_embeddings", "pos_embed", "copy"),
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed.kernel", "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed.bias", "copy"),
    *_dense(r"encoder\.layer\.(\d+)\.attention\.attention\.query", r"blocks.\1.attn.q"),
    *_dense(r"encoder\.layer\.(\d+)\.attention\.attention\.key", r"blocks.\1.attn.k"),
    *_dense(r"encoder\.layer\.(\d+)\.attention\.attention\.value", r"blocks.\1.attn.v"),
    *_dense(r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"blocks.\1.attn.proj"),
    *_dense(r"encoder\.layer\.(\d+)\.intermediate\.dense", r"blocks.\1.mlp.fc1"),
    *_dense(r"encoder\.layer\.(\d+)\.output\.dense", r"blocks.\1.mlp.fc2"),
    *_norm(r"encoder\.layer\.(\d+)\.layernorm_before", r"blocks.\1.norm1"),
    *_norm(r"encoder\.layer\.(\d+)\.layernorm_after", r"blocks.\1.norm2"),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma", "copy"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma", "copy"),
    *_dense(r"layers\.(\d+)\.attention\.q_proj", r"blocks.\1.attn.q"),
    *_dense(r"layers\.(\d+)\.attention\.k_proj", r"blocks.\1.attn.k"),
    *_dense(r"layers\.(\d+)\.attention\.v_proj", r"blocks.\1.attn.v"),
    *_dense(r"layers\.(\d+)\.attention\.o_proj", r"blocks.\1.attn.proj"),
    *_dense(r"layers\.(\d+)\.mlp\.fc1", r"blocks.\1.mlp.fc1"),
    *_dense(r"layers\.(\d+)\.mlp\.fc2", r"blocks.\1.mlp.fc2"),
    *_norm(r"layers\.(\d+)\.layernorm_before", r"blocks.\1.norm1"),
    *_norm(r"layers\.(\d+)\.layernorm_after", r"blocks.\1.norm2"),
    *_norm(r"layernorm", "norm"),
    (r"(pooler|classifier)\..*", None, "ignore"),
    (r"embeddings\.mask_token", None, "ignore"),
]

# timm VisionTransformer (global_pool="token", class token, optional LayerScale).
TIMM_VIT_RENAMES = [
    (r"cls_token", "cls_token", "copy"),
    (r"pos_embed", "pos_embed", "copy"),
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", "copy"),
    *_norm(r"blocks\.(\d+)\.norm1", r"blocks.\1.norm1"),
    *_dense(r"blocks\.(\d+)\.attn\.qkv", r"blocks.\1.attn.qkv"),
    *_dense(r"blocks\.(\d+)\.attn\.proj", r"blocks.\1.attn.proj"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.ls1.gamma", "copy"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.ls2.gamma", "copy"),
    *_norm(r"blocks\.(\d+)\.norm2", r"blocks.\1.norm2"),
    *_dense(r"blocks\.(\d+)\.mlp\.fc1", r"blocks.\1.mlp.fc1"),
    *_dense(r"blocks\.(\d+)\.mlp\.fc2", r"blocks.\1.mlp.fc2"),
    *_norm(r"norm", "norm"),
    (r"head\..*", None, "ignore"),
    (r"head_drop\..*", None, "ignore"),
]

_HF_SW = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_DST_SW = r"stages.\1.blocks.\2."
HF_SWINV2_RENAMES = [
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed.kernel", "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed.bias", "copy"),
    *_norm(r"embeddings\.norm", "patch_embed.norm"),
    (_HF_SW + r"attention\.self\.logit_scale", _DST_SW + "attn.logit_scale", "copy"),
    *_dense(_HF_SW + r"attention\.self\.continuous_position_bias_mlp\.0", _DST_SW + "attn.cpb_fc1"),
    (_HF_SW + r"attention\.self\.continuous_position_bias_mlp\.2\.weight", _DST_SW + "attn.cpb_fc2.kernel",
     "linear"),
    (_HF_SW + r"attention\.self\.query\.weight", _DST_SW + "attn.q.kernel", "linear"),
    (_HF_SW + r"attention\.self\.key\.weight", _DST_SW + "attn.k.kernel", "linear"),
    (_HF_SW + r"attention\.self\.value\.weight", _DST_SW + "attn.v.kernel", "linear"),
    (_HF_SW + r"attention\.self\.query\.bias", _DST_SW + "attn.q_bias", "copy"),
    (_HF_SW + r"attention\.self\.value\.bias", _DST_SW + "attn.v_bias", "copy"),
    (_HF_SW + r"attention\.self\.(relative_coords_table|relative_position_index)", None, "ignore"),
    *_dense(_HF_SW + r"attention\.output\.dense", _DST_SW + "attn.proj"),
    *_norm(_HF_SW + r"layernorm_before", _DST_SW + "norm1"),
    *_norm(_HF_SW + r"layernorm_after", _DST_SW + "norm2"),
    *_dense(_HF_SW + r"intermediate\.dense", _DST_SW + "mlp.fc1"),
    *_dense(_HF_SW + r"output\.dense", _DST_SW + "mlp.fc2"),
    (r"encoder\.layers\.(\d+)\.downsample\.reduction\.weight", r"stages.\1.merge.reduction.kernel", "linear"),
    *_norm(r"encoder\.layers\.(\d+)\.downsample\.norm", r"stages.\1.merge.norm"),
    *_norm(r"layernorm", "norm"),
    (r"(pooler|classifier|decoder)\..*", None, "ignore"),
    (r"embeddings\.mask_token", None, "ignore"),
]

_MS_SW = r"layers\.(\d+)\.blocks\.(\d+)\."
MS_SWINV2_RENAMES = [
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", "copy"),
    *_norm(r"patch_embed\.norm", "patch_embed.norm"),
    (_MS_SW + r"attn\.logit_scale", _DST_SW + "attn.logit_scale", "copy"),
    *_dense(_MS_SW + r"attn\.cpb_mlp\.0", _DST_SW + "attn.cpb_fc1"),
    (_MS_SW + r"attn\.cpb_mlp\.2\.weight", _DST_SW + "attn.cpb_fc2.kernel", "linear"),
    (_MS_SW + r"attn\.qkv\.weight", _DST_SW + "attn.qkv.kernel", "linear"),
    (_MS_SW + r"attn\.q_bias", _DST_SW + "attn.q_bias", "copy"),
    (_MS_SW + r"attn\.v_bias", _DST_SW + "attn.v_bias", "copy"),
    (_MS_SW + r"attn\.(relative_coords_table|relative_position_index)", None, "ignore"),
    (_MS_SW + r"attn_mask", None, "ignore"),
    *_dense(_MS_SW + r"attn\.proj", _DST_SW + "attn.proj"),
    *_norm(_MS_SW + r"norm1", _DST_SW + "norm1"),
    *_norm(_MS_SW + r"norm2", _DST_SW + "norm2"),
    *_dense(_MS_SW + r"mlp\.fc1", _DST_SW + "mlp.fc1"),
    *_dense(_MS_SW + r"mlp\.fc2", _DST_SW + "mlp.fc2"),
    (r"layers\.(\d+)\.downsample\.reduction\.weight", r"stages.\1.merge.reduction.kernel", "linear"),
    *_norm(r"layers\.(\d+)\.downsample\.norm", r"stages.\1.merge.norm"),
    *_norm(r"norm", "norm"),
    (r"head(\..*)?\.(weight|bias)", None, "ignore"),
]

LAYOUTS = {
    "hf_vit": ("vit", HF_VIT_RENAMES, "embeddings.patch_embeddings.projection.weight"),
    "timm_vit": ("vit", TIMM_VIT_RENAMES, "patch_embed.proj.weight"),
    "hf_swinv2": ("swinv2", HF_SWINV2_RENAMES, "embeddings.patch_embeddings.projection.weight"),
    "ms_swinv2": ("swinv2", MS_SWINV2_RENAMES, "patch_embed.proj.weight"),
    "timm_swinv2": ("swinv2", MS_SWINV2_RENAMES, "patch_embed.proj.weight"),
}


def detect_layout(state_dict) -> str:
    """Guess the layout name (a key of :data:`LAYOUTS`) of a state dict from its key names."""
    keys = list(state_dict)
    joined = "\n".join(keys)
    if re.search(r"(^|\.)encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\.", joined, re.M):
        return "hf_swinv2"
    if re.search(r"(^|\.)layers\.\d+\.blocks\.\d+\.attn\.(cpb_mlp|logit_scale)", joined, re.M):
        has_first_merge = re.search(r"(^|\.)layers\.0\.downsample\.reduction\.weight$", joined, re.M)
        return "ms_swinv2" if has_first_merge else "timm_swinv2"
    if re.search(r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$", joined, re.M) and re.search(
            r"(^|\.)(encoder\.layer\.\d+\.attention\.attention\.|layers\.\d+\.attention\.q_proj)", joined, re.M):
        return "hf_vit"
    if re.search(r"(^|\.)blocks\.\d+\.attn\.qkv\.weight$", joined, re.M) and re.search(
            r"(^|\.)patch_embed\.proj\.weight$", joined, re.M):
        return "timm_vit"
    sample = ", ".join(keys[:8])
    raise WeightsError(f"cannot tell which layout this checkpoint uses (first keys: {sample}); "
                       f"pass layout= one of {sorted(LAYOUTS)}")


def _strip_prefix(state_dict, anchor):
    """Keep the keys under the prefix that precedes ``anchor`` (``vit.``, ``module.``, ``model.`` …)."""
    hits = [k for k in state_dict if k == anchor or k.endswith("." + anchor)]
    if not hits:
        return dict(state_dict), ""
    prefix = min(hits, key=len)[: -len(anchor)]
    if not prefix:
        return dict(state_dict), ""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix


def _merge_qkv(out, origin):
    groups = collections.defaultdict(dict)
    for key in list(out):
        m = re.fullmatch(r"(.*\.attn)\.(q|k|v)\.(kernel|bias)", key)
        if m:
            groups[(m.group(1), m.group(3))][m.group(2)] = key
    for (base, kind), parts in groups.items():
        if set(parts) != {"q", "k", "v"}:
            continue
        arrays = [out.pop(parts[p]) for p in "qkv"]
        out[f"{base}.qkv.{kind}"] = np.concatenate(arrays, axis=-1)
        origin[f"{base}.qkv.{kind}"] = " + ".join(origin.pop(parts[p]) for p in "qkv")


def convert_state_dict(state_dict, layout: str = "auto") -> Tuple[Dict[str, np.ndarray], Dict[str, str], list, list]:
    """Translate a PyTorch-layout state dict into histokd's canonical names and array layouts.

    Args:
        state_dict: dict of name → numpy array (from :func:`read_checkpoint`).
        layout: str. One of :data:`LAYOUTS` or ``"auto"``.

    Returns:
        ``(weights, origin, ignored, unexpected)``: canonical arrays, canonical key →
        checkpoint key, keys deliberately skipped (heads, poolers, buffers), and keys
        no rule knows.

    Example:
        >>> w, origin, ignored, unexpected = convert_state_dict(sd, "timm_vit")  # doctest: +SKIP
    """
    if layout == "auto":
        layout = detect_layout(state_dict)
    if layout not in LAYOUTS:
        raise WeightsError(f"unknown checkpoint layout {layout!r}; choose one of {sorted(LAYOUTS)} or 'auto'")
    _family, rules, anchor = LAYOUTS[layout]
    sd, prefix = _strip_prefix(state_dict, anchor)
    if layout == "timm_swinv2":  # timm puts stage s's merge at the start of stage s + 1
        moved = {}
        for k, v in sd.items():
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
            moved[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
        sd = moved
    compiled = [(re.compile(p), t, x) for p, t, x in rules]
    out, origin, ignored, unexpected = {}, {}, [], []
    for key, arr in sd.items():
        arr = np.asarray(arr)
        for pat, target, kind in compiled:
            m = pat.fullmatch(key)
            if m is None:
                continue
            if kind == "ignore":
                ignored.append(prefix + key)
            else:
                name = m.expand(target)
                try:
                    out[name] = _X[kind](arr)
                except WeightsError as e:
                    raise WeightsError(f"checkpoint key {prefix + key!r}: {e}") from None
                origin[name] = prefix + key
            break
        else:
            unexpected.append(prefix + key)
    _merge_qkv(out, origin)
    return out, origin, ignored, unexpected


def _model_family(model):
    from histokd.backbones.swin_v2 import SwinV2Backbone
    from histokd.backbones.vit import ViTBackbone

    if isinstance(model, ViTBackbone):
        return "vit"
    if isinstance(model, SwinV2Backbone):
        return "swinv2"
    raise WeightsError(f"load_pretrained supports ViTBackbone and SwinV2Backbone, got {type(model).__name__}")


def _fit_pos_embed(arr, model, origin_key):
    from histokd.backbones.vit import resize_position_grid

    target = model.get_layer("embed").pos_embed.shape
    n_ckpt, dim = arr.shape[1], arr.shape[2]
    if dim != target[2]:
        return arr, False
    n_patch = n_ckpt - 1
    side = math.isqrt(n_patch)
    if side * side != n_patch:
        side = math.isqrt(n_ckpt)
        if side * side != n_ckpt:
            raise WeightsError(f"checkpoint key {origin_key!r} has {n_ckpt} positions, not a square grid; "
                               "cannot resize it to the model's input size")
        arr = np.concatenate([np.zeros((1, 1, dim), arr.dtype), arr], axis=1)  # no class position
    grid = model.get_layer("embed").grid
    if (side, side) == tuple(grid):
        return arr, arr.shape[1] != n_ckpt
    patch = resize_position_grid(arr[0, 1:].reshape(side, side, dim), grid).reshape(1, -1, dim)
    return np.concatenate([arr[:, :1], patch], axis=1), True


def _check_hf_config(model, source: Path, family):
    """Warn when a Hugging Face folder's config.json asks for windows the model does not use."""
    cfg_path = source / "config.json" if source.is_dir() else source.parent / "config.json"
    if family != "swinv2" or not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    if cfg.get("model_type") != "swinv2":
        return
    want_w = cfg.get("window_size")
    want_pw = [int(p) for p in cfg.get("pretrained_window_sizes") or []]
    if want_w is not None and int(want_w) != model.window_size:
        warnings.warn(f"{cfg_path} was trained with window_size={want_w} but the model uses "
                      f"{model.window_size}; pass pretrained_window_size={want_w} (or window_size={want_w}) "
                      "so the continuous position bias is evaluated on the scale it was trained on",
                      stacklevel=3)
    elif want_pw and any(want_pw) and want_pw != list(model.pretrained_window_size):
        warnings.warn(f"{cfg_path} sets pretrained_window_sizes={want_pw} but the model uses "
                      f"{list(model.pretrained_window_size)}; build it with pretrained_window_size={want_pw}",
                      stacklevel=3)


def load_pretrained(model, source, layout: str = "auto", strict: bool = True, key: str | None = None,
                    resize_pos_embed: bool = True) -> dict:
    """Load a checkpoint (path or state dict) into a ``ViTBackbone`` / ``SwinV2Backbone``.

    Every model weight must be found with the right shape; otherwise a
    :class:`~histokd.errors.WeightsError` names the first missing or mismatching key.
    A ViT position table stored for another grid is resized bicubically. Pixel
    normalisation is not part of a checkpoint: Google's ViT models (``google/vit-*``)
    expect ``normalization="tf"`` (mean = std = 0.5), timm / UNI / Swin V2 models the
    default ImageNet ``"torch"``. Swin V2 weights trained with another window need
    ``pretrained_window_size`` (a warning says so when a Hugging Face ``config.json``
    is next to the weights).

    Args:
        model: ViTBackbone or SwinV2Backbone. Built model to fill (weights are assigned in place).
        source: str, Path or dict. Checkpoint file / HF folder, or a ``{name: array}`` state dict.
        layout: str. ``"auto"`` or a key of :data:`LAYOUTS` (``hf_vit``, ``timm_vit``, ``hf_swinv2``, …).
        strict: bool. Raise on checkpoint keys the model has no place for (register tokens,
            qk-norm, absolute position embeddings of Swin …); False ignores them with a warning.
        key: str or None. Entry of a nested PyTorch checkpoint holding the weights.
        resize_pos_embed: bool. Resize a ViT position table of another grid (else raise).

    Returns:
        dict with ``layout``, ``loaded`` (count), ``ignored`` and ``unexpected`` key lists and
        ``resized_pos_embed``.

    Example:
        >>> enc = ViTBackbone(input_size=224, embed_dim=1024, depth=24, num_heads=16,
        ...                   layer_scale_init=1e-5)  # doctest: +SKIP
        >>> load_pretrained(enc, "uni/pytorch_model.bin", layout="timm_vit")  # doctest: +SKIP
    """
    family = _model_family(model)
    if isinstance(source, (str, os.PathLike)):
        state_dict = read_checkpoint(source, key)
        where = str(source)
    elif isinstance(source, dict):
        state_dict = {k: np.asarray(v) for k, v in source.items()}
        where = "state dict"
    else:
        raise WeightsError(f"load_pretrained needs a path or a dict of arrays, got {type(source).__name__}")
    if layout == "auto":
        layout = detect_layout(state_dict)
    if layout in LAYOUTS and LAYOUTS[layout][0] != family:
        raise WeightsError(f"{where} is a {layout} checkpoint but the model is a {type(model).__name__}; "
                           f"build the matching backbone ({LAYOUTS[layout][0]})")
    if isinstance(source, (str, os.PathLike)):
        _check_hf_config(model, Path(source), family)
    weights, origin, ignored, unexpected = convert_state_dict(state_dict, layout)
    targets = model.canonical_weights()
    extra = sorted(set(weights) - set(targets))
    unexpected = unexpected + [origin[k] for k in extra]
    if unexpected and strict:
        raise WeightsError(
            f"{where} ({layout}) has {len(unexpected)} weight(s) the {model.name} model has no place for, "
            f"first {unexpected[0]!r}; the checkpoint was made for a different architecture (e.g. more "
            "blocks/stages, register tokens, qk-norm or LayerScale when layer_scale_init is None); build a "
            "matching model or pass strict=False to skip them")
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} checkpoint weight(s) with no place in the model: "
                      f"{unexpected[:5]}", stacklevel=2)
    resized = False
    assignments = []
    for name, var in targets.items():
        if name not in weights:
            raise WeightsError(
                f"{where} ({layout}) lacks the weight for {name!r} (expected shape {tuple(var.shape)}); "
                "the checkpoint does not fit this preset — check depth/width/heads, qkv_bias and "
                "layer_scale_init, or pick the layout explicitly")
        arr = weights[name]
        if name == "pos_embed" and tuple(arr.shape) != tuple(var.shape) and resize_pos_embed:
            arr, resized = _fit_pos_embed(arr, model, origin[name])
        if tuple(arr.shape) != tuple(var.shape):
            raise WeightsError(
                f"{where} ({layout}): {origin[name]!r} has shape {tuple(arr.shape)} after conversion but the "
                f"model's {name!r} needs {tuple(var.shape)}; the checkpoint was made for another preset "
                "(width/heads/patch size) — build the matching backbone")
        assignments.append((var, arr))
    for var, arr in assignments:
        var.assign(arr.astype(var.dtype))
    return {"layout": layout, "loaded": len(assignments), "ignored": ignored, "unexpected": unexpected,
            "resized_pos_embed": resized}


def apply_weights(model, weights):
    """Load ``weights`` into a freshly built ViT / Swin V2 backbone (the registry factories' ``weights=``).

    Args:
        model: ViTBackbone or SwinV2Backbone.
        weights: None (keep the random initialisation), a Keras weights file
            (``.weights.h5``/``.h5``/``.keras``), or a PyTorch / safetensors checkpoint file or
            Hugging Face model folder (converted with :func:`load_pretrained`).

    Returns:
        The same model.

    Example:
        >>> enc = apply_weights(swinv2_tiny(), "swinv2-tiny-patch4-window8-256")  # doctest: +SKIP
    """
    if weights is None:
        return model
    arch = getattr(model, "arch", None) or model.name
    if isinstance(weights, str) and weights == "imagenet":
        raise WeightsError(
            f"histokd ships no Keras ImageNet weights for {arch!r}; download a checkpoint (e.g. a "
            "Hugging Face google/vit-* or microsoft/swinv2-* model folder, or a timm .bin/.safetensors) "
            "and pass its path as weights=PATH, or weights=None for random initialisation")
    if not isinstance(weights, (str, os.PathLike)):
        raise WeightsError(f"weights for backbone {arch!r} must be None or a path; got {weights!r}")
    from histokd.backbones.base import WEIGHT_SUFFIXES, load_weights_file

    path = Path(weights).expanduser()
    if path.is_file() and any(path.name.endswith(s) for s in WEIGHT_SUFFIXES):
        load_weights_file(model, path, arch, f"a {arch!r} histokd backbone with the same options")
    else:
        load_pretrained(model, path)
    return model
