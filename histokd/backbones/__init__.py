"""Image encoders ("backbones"): [0, 1] RGB images ``[B, H, W, 3]`` → pooled features ``[B, D]``.

Every backbone normalises its input itself and lists the layer names of its
stage outputs in ``backbone.stage_names``. Each family module registers its
names (``histokd.registry.BACKBONES``), the tiny options that build each name
fast (:func:`tiny_kwargs`) and its checkpoint layouts
(:mod:`histokd.backbones.layouts`). Build one by registry name, or from a
Hugging Face model folder::

    from histokd.backbones import from_pretrained, make_backbone
    encoder = make_backbone("resnet50", 224)                       # paper encoder
    small = make_backbone("resnet18", 64, width=0.25, small_input=True)  # CPU tests
    vit = from_pretrained("hf_models/vit-base-patch16-224")        # config.json + weights
"""

from __future__ import annotations

import inspect

import keras

from histokd.backbones.base import Backbone, BatchNormalization, ImageNormalization  # noqa: F401
from histokd.backbones._common import (  # noqa: F401
    register_backbone,
    register_presets,
    register_tiny_kwargs,
    tiny_kwargs,
)
from histokd.backbones import resnet  # noqa: F401  (registers the ResNet family)
from histokd.backbones import swin_v2, vit  # noqa: F401  (register ViT / Swin V2 presets and layouts)
from histokd.backbones.convert import load_pretrained  # noqa: F401
from histokd.backbones.layouts import CHECKPOINT_LAYOUTS, HF_MODEL_TYPES  # noqa: F401
from histokd.backbones.pretrained import from_pretrained  # noqa: F401
from histokd.backbones.swin_v2 import SwinV2Backbone  # noqa: F401
from histokd.backbones.vit import ViTBackbone  # noqa: F401
from histokd.errors import ConfigError
from histokd.io import (  # noqa: F401
    read_checkpoint,
    read_safetensors,
    read_torch_state_dict,
    write_safetensors,
)
from histokd.registry import BACKBONES

__all__ = [
    "Backbone",
    "BatchNormalization",
    "CHECKPOINT_LAYOUTS",
    "HF_MODEL_TYPES",
    "ImageNormalization",
    "SwinV2Backbone",
    "ViTBackbone",
    "backbone_names",
    "from_pretrained",
    "load_pretrained",
    "make_backbone",
    "read_checkpoint",
    "read_safetensors",
    "read_torch_state_dict",
    "register_backbone",
    "register_presets",
    "register_tiny_kwargs",
    "tiny_kwargs",
    "write_safetensors",
]


def backbone_names():
    """Sorted registry keys of every available backbone."""
    return BACKBONES.names()


def make_backbone(name: str, input_size=224, weights=None, **kwargs) -> keras.Model:
    """Builds a registered backbone.

    Args:
        name: str. Registry key: ``resnet50``, ``mobilenet_v2``,
            ``efficientnet_b0``, ``xception``, ``resnet18`` (and any other
            registered backbone).
        input_size: int, (H, W) or None. Input tile size in pixels.
        weights: None, "imagenet" or str path. Random init, Keras' ImageNet
            weights (needs internet), or a local ``.weights.h5``/``.h5``/``.keras`` file.
        **kwargs: backbone options from the config, e.g. ``width=0.25``,
            ``small_input=True`` for ``resnet18``, ``alpha`` for ``mobilenet_v2``,
            ``model_name`` for all.

    Returns:
        keras.Model (a :class:`Backbone`) with ``stage_names`` and ``output_dim``.

    Raises:
        RegistryError: unknown name (the message lists valid names).
        ConfigError: unknown option or too small input size.
        WeightsError: missing weights file or weights for another architecture.

    Example:
        >>> bb = make_backbone("resnet18", 32, width=0.25, small_input=True)
        >>> bb.output_dim
        128
    """
    factory = BACKBONES.get(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            valid = [p for p in params if p not in ("input_size", "weights")]
            raise ConfigError(
                f"backbone {name!r} got unknown option(s) {unknown}; valid options: "
                f"{', '.join(valid) or '(none)'}"
            )
    return factory(input_size=input_size, weights=weights, **kwargs)
