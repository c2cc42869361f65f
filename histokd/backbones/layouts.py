"""Registries of checkpoint layouts and Hugging Face model types, filled by each backbone family.

A *checkpoint layout* says how the weight names of one PyTorch implementation
(Hugging Face ``ViTModel``, timm ``VisionTransformer``, the official Swin V2 release …)
map onto a family's checkpoint-neutral names (``Backbone.canonical_weights()``): an
ordered list of ``(regex, target, transform)`` rules, the key that anchors a prefix
(``vit.``, ``module.``) and a test that recognises the layout from the key names. A
*Hugging Face model type* says which family and layout read a ``config.json`` with that
``model_type`` and how its fields become the family's constructor arguments.

Each family module registers its own entries next to its model code, so a new family
never edits :mod:`histokd.backbones.convert`, which only holds the generic machinery.
This module imports no family.

Example:
    >>> register_layout(CheckpointLayout(
    ...     family="myfam", name="timm_myfam", anchor="stem.weight",
    ...     rules=[(r"stem\\.weight", "stem.kernel", "conv")],
    ...     detect=lambda keys: "stem.weight" in keys))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from histokd.errors import ConfigError, WeightsError

__all__ = [
    "CHECKPOINT_LAYOUTS",
    "HF_MODEL_TYPES",
    "TRANSFORMS",
    "CheckpointLayout",
    "HFModelType",
    "dense_rules",
    "get_layout",
    "hf_model_type",
    "layout_names",
    "norm_rules",
    "register_hf_model_type",
    "register_layout",
]


# -------------------------------------------------------------------- array transforms
def _linear(w):
    if w.ndim != 2:
        raise WeightsError(f"expected a 2-D linear weight, got shape {w.shape}")
    return np.ascontiguousarray(w.T)  # PyTorch [out, in] → Keras [in, out]


def _conv(w):
    if w.ndim != 4:
        raise WeightsError(f"expected a 4-D convolution weight, got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [O, I, kh, kw] → [kh, kw, I, O]


def _copy(w):
    return w


#: Rule transform name → function of the PyTorch array.
TRANSFORMS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": _linear, "conv": _conv, "copy": _copy,
}


def norm_rules(src_prefix: str, dst_prefix: str):
    """Rules for a LayerNorm: ``<src>.weight/.bias`` → ``<dst>.gamma/.beta``.

    Args:
        src_prefix: str. Regex of the checkpoint module name.
        dst_prefix: str. Canonical name (may use the regex groups, ``\\1``).
    """
    return [(rf"{src_prefix}\.weight", f"{dst_prefix}.gamma", "copy"),
            (rf"{src_prefix}\.bias", f"{dst_prefix}.beta", "copy")]


def dense_rules(src_prefix: str, dst_prefix: str):
    """Rules for a linear layer: ``<src>.weight`` (transposed) / ``.bias`` → ``<dst>.kernel/.bias``.

    Args:
        src_prefix: str. Regex of the checkpoint module name.
        dst_prefix: str. Canonical name (may use the regex groups, ``\\1``).
    """
    return [(rf"{src_prefix}\.weight", f"{dst_prefix}.kernel", "linear"),
            (rf"{src_prefix}\.bias", f"{dst_prefix}.bias", "copy")]


# -------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class CheckpointLayout:
    """How one implementation's state-dict names map onto a family's canonical weight names.

    Args:
        family: str. Backbone family (``Backbone.checkpoint_family``), e.g. ``"vit"``.
        name: str. Layout name users pass as ``layout=`` (``"hf_vit"``), unique over families.
        rules: sequence of ``(regex, target or None, transform)``. First full match wins;
            target None with transform ``"ignore"`` skips the key (heads, buffers).
        anchor: str. A key every checkpoint of the layout has; what precedes it is a
            prefix (``vit.``, ``module.``) that is stripped.
        detect: callable(list of str) → bool. True when the keys look like this layout.
        priority: int. Detection order, highest first (more specific layouts higher).
        prepare: callable(dict) → dict or None. Rewrites the (prefix-stripped) state dict
            before the rules run, e.g. to move timm's patch merges to the previous stage.
    """

    family: str
    name: str
    rules: Sequence[Tuple[str, Optional[str], str]]
    anchor: str
    detect: Callable[[list], bool]
    priority: int = 0
    prepare: Optional[Callable[[dict], dict]] = None

    def __post_init__(self):
        bad = sorted({kind for _p, _t, kind in self.rules} - set(TRANSFORMS) - {"ignore"})
        if bad:
            raise ConfigError(f"layout {self.name!r} uses unknown transform(s) {bad}; valid: "
                              f"{sorted(TRANSFORMS) + ['ignore']}")


#: (family, layout name) → :class:`CheckpointLayout`.
CHECKPOINT_LAYOUTS: Dict[Tuple[str, str], CheckpointLayout] = {}


def register_layout(layout: CheckpointLayout) -> CheckpointLayout:
    """Add a layout to :data:`CHECKPOINT_LAYOUTS` (a family module calls this at import).

    Args:
        layout: CheckpointLayout. The layout; its name must not be taken by another family.

    Raises:
        ConfigError: another layout already has that name.
    """
    for (fam, name), old in CHECKPOINT_LAYOUTS.items():
        if name == layout.name and old is not layout:
            raise ConfigError(f"checkpoint layout {layout.name!r} is registered twice "
                              f"(families {fam!r} and {layout.family!r})")
    CHECKPOINT_LAYOUTS[(layout.family, layout.name)] = layout
    return layout


def layout_names(family: str | None = None) -> list:
    """Sorted layout names, of every family or of one."""
    return sorted(name for fam, name in CHECKPOINT_LAYOUTS if family is None or fam == family)


def get_layout(name: str) -> CheckpointLayout:
    """The layout registered under ``name``.

    Raises:
        WeightsError: unknown name (the message lists the valid ones).
    """
    for (_fam, key), layout in CHECKPOINT_LAYOUTS.items():
        if key == name:
            return layout
    raise WeightsError(f"unknown checkpoint layout {name!r}; choose one of {layout_names()} or 'auto'")


# -------------------------------------------------------------------- Hugging Face model types
@dataclass(frozen=True)
class HFModelType:
    """How to build a family's backbone from a Hugging Face ``config.json`` of one ``model_type``.

    Args:
        model_type: str. ``config.json``'s ``model_type`` (``"vit"``, ``"swinv2"``).
        family: str. Backbone family that reads it.
        layout: str. Checkpoint layout of its weights (``"hf_vit"``).
        build: callable(**kwargs) → Backbone. Usually the backbone class.
        config_to_kwargs: callable(dict) → dict. HF config → constructor arguments
            (raising :class:`~histokd.errors.ConfigError` for options the family lacks).
        default_normalization: dict. Constructor arguments for the pixel normalisation
            when the folder has no ``preprocessor_config.json``.
        check_config: callable(model, dict, path) or None. Warns when a model built by hand
            does not match a ``config.json`` found next to the weights it loads.
    """

    model_type: str
    family: str
    layout: str
    build: Callable
    config_to_kwargs: Callable[[dict], dict]
    default_normalization: dict = field(default_factory=dict)
    check_config: Optional[Callable] = None


#: ``model_type`` → :class:`HFModelType`.
HF_MODEL_TYPES: Dict[str, HFModelType] = {}


def register_hf_model_type(entry: HFModelType) -> HFModelType:
    """Add a Hugging Face model type to :data:`HF_MODEL_TYPES`.

    Args:
        entry: HFModelType. The model type's reader.

    Raises:
        ConfigError: the model type is taken, or its layout is not registered.
    """
    old = HF_MODEL_TYPES.get(entry.model_type)
    if old is not None and old is not entry:
        raise ConfigError(f"Hugging Face model_type {entry.model_type!r} is registered twice")
    if (entry.family, entry.layout) not in CHECKPOINT_LAYOUTS:
        raise ConfigError(f"model_type {entry.model_type!r} names layout {entry.layout!r}, which family "
                          f"{entry.family!r} has not registered; register the layout first")
    HF_MODEL_TYPES[entry.model_type] = entry
    return entry


def hf_model_type(model_type) -> HFModelType:
    """The reader registered for a ``config.json`` ``model_type``.

    Raises:
        ConfigError: the model type is not supported (the message lists those that are).
    """
    if model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    raise ConfigError(f"Hugging Face model_type {model_type!r} is not supported; supported model types: "
                      f"{', '.join(sorted(HF_MODEL_TYPES)) or '(none)'}")
