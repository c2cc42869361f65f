"""Load pretrained Hugging Face / timm / Microsoft checkpoints into histokd backbones.

The generic machinery only: reading (:mod:`histokd.io`, no PyTorch needed), finding the
checkpoint layout, renaming and transposing weights by the layout's rules, checking
that every weight fits, and loading. The layouts themselves (Hugging Face ``ViTModel``,
timm ``VisionTransformer``, Hugging Face / official / timm Swin V2 …) are registered by
each family module in :data:`histokd.backbones.layouts.CHECKPOINT_LAYOUTS`; their
target names are the family's checkpoint-neutral ``Backbone.canonical_weights()``.
PyTorch ``[out, in]`` linear weights become Keras ``[in, out]`` and ``[O, I, kh, kw]``
convolutions ``[kh, kw, I, O]``.

Example:
    >>> from histokd.backbones.vit import vit_large
    >>> enc = vit_large(input_size=224, layer_scale_init=1e-5)
    >>> load_pretrained(enc, "uni/pytorch_model.bin")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import json
import os
import re
import warnings
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from histokd.backbones.base import WEIGHT_SUFFIXES, load_weights_file
from histokd.backbones.layouts import (
    CHECKPOINT_LAYOUTS,
    HF_MODEL_TYPES,
    TRANSFORMS,
    get_layout,
    layout_names,
)
from histokd.errors import WeightsError
from histokd.io import (  # noqa: F401  (re-exported: the readers' former home)
    read_checkpoint,
    read_safetensors,
    read_torch_state_dict,
    write_safetensors,
)


class _LayoutsView(collections.abc.Mapping):
    """Read-only ``{layout name: (family, rules, anchor)}`` over the registered layouts."""

    def _by_name(self):
        return {name: (lay.family, lay.rules, lay.anchor) for (_f, name), lay in CHECKPOINT_LAYOUTS.items()}

    def __getitem__(self, name):
        return self._by_name()[name]

    def __iter__(self):
        return iter(sorted(self._by_name()))

    def __len__(self):
        return len(CHECKPOINT_LAYOUTS)


#: Former table of every layout, kept as a live view of :data:`CHECKPOINT_LAYOUTS`.
LAYOUTS = _LayoutsView()


def detect_layout(state_dict) -> str:
    """Guess the layout name of a state dict from its key names.

    Args:
        state_dict: dict of name → array.

    Returns:
        str. A registered layout name (``hf_vit``, ``timm_vit``, ``hf_swinv2`` …).

    Raises:
        WeightsError: no registered layout recognises the keys.
    """
    keys = list(state_dict)
    for layout in sorted(CHECKPOINT_LAYOUTS.values(), key=lambda lay: -lay.priority):
        if layout.detect(keys):
            return layout.name
    sample = ", ".join(keys[:8])
    raise WeightsError(f"cannot tell which layout this checkpoint uses (first keys: {sample}); "
                       f"pass layout= one of {layout_names()}")


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
        layout: str. A registered layout name or ``"auto"``.

    Returns:
        ``(weights, origin, ignored, unexpected)``: canonical arrays, canonical key →
        checkpoint key, keys deliberately skipped (heads, poolers, buffers), and keys
        no rule knows.

    Example:
        >>> w, origin, ignored, unexpected = convert_state_dict(sd, "timm_vit")  # doctest: +SKIP
    """
    if layout == "auto":
        layout = detect_layout(state_dict)
    spec = get_layout(layout)
    sd, prefix = _strip_prefix(state_dict, spec.anchor)
    if spec.prepare is not None:
        sd = spec.prepare(sd)
    compiled = [(re.compile(p), t, x) for p, t, x in spec.rules]
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
                    out[name] = TRANSFORMS[kind](arr)
                except WeightsError as e:
                    raise WeightsError(f"checkpoint key {prefix + key!r}: {e}") from None
                origin[name] = prefix + key
            break
        else:
            unexpected.append(prefix + key)
    _merge_qkv(out, origin)
    return out, origin, ignored, unexpected


def _model_family(model):
    family = getattr(model, "checkpoint_family", None)
    if family is None or not any(fam == family for fam, _n in CHECKPOINT_LAYOUTS):
        families = sorted({fam for fam, _n in CHECKPOINT_LAYOUTS})
        raise WeightsError(f"load_pretrained supports backbones of the families {families} (ViTBackbone, "
                           f"SwinV2Backbone, …), got {type(model).__name__}; load Keras weights files "
                           "with model.load_weights")
    return family


def _check_hf_config(model, source: Path, family):
    """Let the family warn when a ``config.json`` next to the weights disagrees with the model."""
    cfg_path = source / "config.json" if source.is_dir() else source.parent / "config.json"
    if not cfg_path.is_file():
        return
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    entry = HF_MODEL_TYPES.get(cfg.get("model_type")) if isinstance(cfg, dict) else None
    if entry is not None and entry.family == family and entry.check_config is not None:
        entry.check_config(model, cfg, cfg_path)


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
        layout: str. ``"auto"`` or a registered layout (``hf_vit``, ``timm_vit``, ``hf_swinv2``, …).
        strict: bool. Raise on checkpoint keys the model has no place for (register tokens,
            qk-norm, absolute position embeddings of Swin …); False ignores them with a warning.
        key: str or None. Entry of a nested PyTorch checkpoint holding the weights.
        resize_pos_embed: bool. Let the model adapt a weight stored for another input size
            (a ViT position table of another grid is resized; see ``fit_checkpoint_weight``).

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
    spec = get_layout(layout)
    if spec.family != family:
        raise WeightsError(f"{where} is a {layout} checkpoint but the model is a {type(model).__name__}; "
                           f"build the matching backbone ({spec.family})")
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
        if tuple(arr.shape) != tuple(var.shape) and resize_pos_embed:
            arr, changed = model.fit_checkpoint_weight(name, arr, origin[name])
            resized = resized or changed
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
    path = Path(weights).expanduser()
    if path.is_file() and any(path.name.endswith(s) for s in WEIGHT_SUFFIXES):
        load_weights_file(model, path, arch, f"a {arch!r} histokd backbone with the same options")
    else:
        load_pretrained(model, path)
    return model
