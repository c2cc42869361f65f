"""Parts every backbone family shares: input and normalisation layers, the preset factory, tiny kwargs.

A family registers its named presets with :func:`register_presets` (one factory per
preset, with a generated docstring, validated keyword overrides and ``weights=``
loading) or single factories with :func:`register_backbone`. Both record the
*tiny kwargs* of every name — options that build the backbone in about a second on a
CPU — so the test harness can run every registered backbone
(:func:`tiny_kwargs`).
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Dict, Mapping

import keras
import numpy as np
from keras import ops

from histokd.backbones.base import ImageNormalization, spatial_size
from histokd.backbones.convert import apply_weights
from histokd.backbones.layouts import layout_names
from histokd.errors import ConfigError
from histokd.registry import BACKBONES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "PixelNormalization",
    "build_preset",
    "input_layer",
    "normalization_layer",
    "register_backbone",
    "register_presets",
    "register_tiny_kwargs",
    "tiny_kwargs",
]


def _pair(value, what):
    """``(H, W)`` from an int, a pair or an ``(H, W, channels)`` triple."""
    return spatial_size(value, 2, what)


# -------------------------------------------------------------------- input layers
@keras.saving.register_keras_serializable(package="histokd")
class PixelNormalization(keras.layers.Layer):
    """Per-channel ``(x - mean) / std`` of images already scaled to [0, 1].

    Args:
        mean: list of float. Channel means (ImageNet by default).
        std: list of float. Channel standard deviations.

    Example:
        >>> y = PixelNormalization()(keras.ops.ones((1, 4, 4, 3)))
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        self.mean = [float(v) for v in mean]
        self.std = [float(v) for v in std]
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"normalisation needs one positive std per mean, got mean={self.mean} std={self.std}")

    def call(self, x):
        mean = ops.convert_to_tensor(np.asarray(self.mean, "float32"), dtype=x.dtype)
        inv = ops.convert_to_tensor(1.0 / np.asarray(self.std, "float32"), dtype=x.dtype)
        return (x - mean) * inv

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(mean=list(self.mean), std=list(self.std))
        return cfg


def normalization_layer(normalization="torch", mean=None, std=None):
    """The ``"normalize"`` input layer: custom ``mean``/``std`` or an :class:`ImageNormalization` mode.

    Args:
        normalization: str. :class:`ImageNormalization` mode used when no mean/std is given.
        mean: list of float or None. Channel means of [0, 1] images.
        std: list of float or None. Channel standard deviations.

    Raises:
        ConfigError: only one of mean/std given, or an unknown mode.
    """
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("give both mean and std for a custom input normalisation (or neither)")
        return PixelNormalization(mean, std, name="normalize")
    return ImageNormalization(normalization, name="normalize")


def input_layer(size, in_channels, dynamic_size):
    """The ``"image"`` input: ``[B, *size, C]``, or any spatial size when ``dynamic_size``.

    Args:
        size: tuple of int. Spatial size (2 or 3 entries).
        in_channels: int. Channels C.
        dynamic_size: bool. Leave the spatial axes unknown (None).
    """
    spatial = (None,) * len(size) if dynamic_size else tuple(size)
    return keras.Input(shape=spatial + (int(in_channels),), name="image")


# -------------------------------------------------------------------- tiny kwargs
_TINY: Dict[str, dict] = {}


def register_tiny_kwargs(name: str, kwargs: Mapping):
    """Record options that build backbone ``name`` small and fast (tests, the registry harness).

    Args:
        name: str. Registry key.
        kwargs: dict. Factory keyword arguments, ``input_size`` included.
    """
    _TINY[name] = dict(kwargs)


def tiny_kwargs(name: str) -> dict:
    """Options that build registered backbone ``name`` in about a second on a CPU.

    Args:
        name: str. Registry key (``BACKBONES.names()``).

    Returns:
        dict of factory keyword arguments, ``input_size`` included (a fresh copy).

    Raises:
        RegistryError: unknown backbone name.
        ConfigError: the backbone was registered without tiny kwargs.

    Example:
        >>> kw = tiny_kwargs("vit_base")
        >>> enc = make_backbone("vit_base", **kw)  # doctest: +SKIP
    """
    BACKBONES.get(name)  # unknown name → RegistryError listing the valid ones
    if name not in _TINY:
        raise ConfigError(f"backbone {name!r} has no tiny kwargs; register them with "
                          "histokd.backbones.register_tiny_kwargs(name, {...}) (or register the "
                          "backbone with register_backbone / register_presets)")
    return copy.deepcopy(_TINY[name])


def register_backbone(name: str, tiny: Mapping, spatial_rank: int = 2):
    """Decorator: register a backbone factory under ``name`` together with its tiny kwargs.

    Args:
        name: str. Registry key.
        tiny: dict. Tiny kwargs (see :func:`tiny_kwargs`).
        spatial_rank: int. Spatial axes of the inputs (2 for images, 3 for volumes).

    Example:
        >>> @register_backbone("my_net", tiny={"input_size": 32, "width": 0.25})
        ... def my_net(input_size=224, weights=None, width=1.0): ...
    """
    def deco(fn):
        fn.spatial_rank = int(spatial_rank)
        BACKBONES.register(name, fn)
        register_tiny_kwargs(name, tiny)
        return fn

    return deco


# -------------------------------------------------------------------- the preset factory
def build_preset(cls, key, defaults, input_size, default_size, weights, kwargs):
    """Build ``cls`` from preset ``defaults`` + user ``kwargs`` (validated), then load ``weights``.

    Args:
        cls: type. Backbone class (its constructor arguments are the valid options).
        key: str. Registry key; the default model name and ``arch``.
        defaults: dict. The preset's constructor arguments.
        input_size: int, tuple or None. None means "any size": the model is built for
            ``default_size`` with ``dynamic_size=True``.
        default_size: int. Size used when ``input_size`` is None.
        weights: None, str or Path. See :func:`histokd.backbones.convert.apply_weights`.
        kwargs: dict. User overrides (``model_name`` is an alias of ``name``).

    Raises:
        ConfigError: an unknown option.
    """
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs", "input_size")]
    unknown = sorted(set(kwargs) - set(valid) - {"name", "trainable", "model_name"})
    if unknown:
        raise ConfigError(f"backbone {key!r} got unknown option(s) {unknown}; valid options: "
                          f"input_size, weights, {', '.join(valid)}")
    cfg = {**defaults, **kwargs}
    if "model_name" in cfg:
        cfg["name"] = cfg.pop("model_name") or key
    cfg.setdefault("name", key)
    cfg.setdefault("arch", key)
    if input_size is None:
        input_size = default_size
        cfg["dynamic_size"] = True
    return apply_weights(cls(input_size=input_size, **cfg), weights)


def _preset_doc(cls, key, preset, default_size, summary, family):
    layouts = ", ".join(layout_names(family)) or "none"
    return (
        f"{summary}\n\n"
        "Args:\n"
        f"    input_size: int, (H, W) or None. Image size (default {default_size}); None builds the\n"
        f"        position tables for {default_size} px and accepts any size (``dynamic_size=True``).\n"
        "    weights: None, str or Path. None (random initialisation), a Keras weights file, or a\n"
        f"        PyTorch / safetensors checkpoint or Hugging Face folder (layouts: {layouts}; see\n"
        "        :func:`histokd.backbones.convert.load_pretrained`).\n"
        f"    **kwargs: any :class:`{cls.__name__}` argument, overriding the preset {preset}.\n\n"
        "Returns:\n"
        f"    {cls.__name__}.\n\n"
        f"Example:\n    >>> enc = BACKBONES.get({key!r})(input_size={default_size})\n"
    )


def register_presets(cls, presets: Mapping[str, dict], *, default_size: int, summary: str,
                     tiny, base: Mapping | None = None) -> Dict[str, Callable]:
    """Register one factory per preset of a backbone family, with docstrings and tiny kwargs.

    Each factory has the signature ``factory(input_size=default_size, weights=None, **kwargs)``
    and calls :func:`build_preset`.

    Args:
        cls: type. The family's backbone class.
        presets: dict of registry key → constructor arguments of that preset.
        default_size: int. Default ``input_size`` of the factories.
        summary: str. Docstring summary, formatted with ``key`` and the preset's fields
            (``"ViT preset {key!r}: width {embed_dim}"``).
        tiny: dict or callable(str) → dict. Tiny kwargs (``input_size`` included) shared by
            every preset, or a function of the registry key returning them.
        base: dict or None. Constructor arguments common to every preset (``patch_size=16``).

    Returns:
        dict of registry key → factory, to bind as module attributes.

    Example:
        >>> f = register_presets(ViTBackbone, {"vit_tiny": dict(embed_dim=192, depth=12, num_heads=3)},
        ...                      default_size=224, summary="ViT {key!r}", tiny={"input_size": 32})
        ... # doctest: +SKIP
    """
    factories = {}

    def make(key, defaults):
        def factory(input_size=default_size, weights=None, **kwargs):
            return build_preset(cls, key, defaults, input_size, default_size, weights, kwargs)

        return factory

    for key, preset in presets.items():
        defaults = {**(base or {}), **preset}
        factory = make(key, defaults)
        factory.__name__ = factory.__qualname__ = key
        factory.__module__ = cls.__module__
        factory.__doc__ = _preset_doc(cls, key, defaults, default_size,
                                      summary.format(key=key, **defaults), cls.checkpoint_family)
        factory.spatial_rank = int(getattr(cls, "spatial_rank", 2))
        BACKBONES.register(key, factory)
        register_tiny_kwargs(key, tiny(key) if callable(tiny) else tiny)
        factories[key] = factory
    return factories


def backbone_spatial_rank(name: str) -> int:
    """Spatial axes a registered backbone reads (its factory's ``spatial_rank``; 2 when a
    factory registered by hand does not say)."""
    return int(getattr(BACKBONES.get(name), "spatial_rank", 2))
