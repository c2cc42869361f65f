"""Build a histokd backbone from a Hugging Face model folder and load its weights.

The folder's ``config.json`` names the ``model_type``; the family registered for it
(:data:`histokd.backbones.layouts.HF_MODEL_TYPES`) turns the config into constructor
arguments, ``preprocessor_config.json`` (when present) gives the pixel mean/std, and
the weights (``model.safetensors``, ``pytorch_model.bin`` or shards) are loaded with
the family's Hugging Face checkpoint layout. No PyTorch or transformers needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from histokd.backbones.convert import load_pretrained
from histokd.backbones.layouts import hf_model_type
from histokd.errors import ConfigError, WeightsError
from histokd.io import WEIGHT_FILES

__all__ = ["from_pretrained", "normalization_from_preprocessor"]


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path} is not a readable {what} ({err}); re-download the model folder") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path} holds a {type(data).__name__}, not a {what} object; re-download it")
    return data


def _per_channel(value, channels, key, path):
    values = [value] * channels if isinstance(value, (int, float)) else list(value)
    if len(values) != channels or not all(isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{path}: {key}={value!r} needs one number per channel ({channels})")
    return [float(v) for v in values]


def normalization_from_preprocessor(config: dict, channels: int = 3, path="preprocessor_config.json") -> dict:
    """Backbone normalisation arguments (``mean``/``std`` of [0, 1] images) for an HF image processor.

    An HF processor computes ``(pixels · rescale_factor − image_mean) / image_std`` on 0–255
    pixels; histokd backbones take ``x = pixels / 255``, so the same function is
    ``(x − m) / s`` with ``m = image_mean / (255 · rescale_factor)`` and
    ``s = image_std / (255 · rescale_factor)`` (``rescale_factor`` = 1 when ``do_rescale``
    is false; mean 0 and std 1 when ``do_normalize`` is false).

    Args:
        config: dict. Parsed ``preprocessor_config.json``.
        channels: int. Image channels.
        path: str or Path. File name, for messages.

    Returns:
        dict with ``mean`` and ``std`` lists, or ``{"normalization": "none"}`` for the identity.

    Raises:
        ConfigError: mean/std of the wrong length or not numbers.

    Example:
        >>> normalization_from_preprocessor({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
        {'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}
    """
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
    if rescale <= 0:
        raise ConfigError(f"{path}: rescale_factor must be positive, got {rescale}")
    if config.get("do_normalize", True):
        mean = _per_channel(config.get("image_mean", 0.5), channels, "image_mean", path)
        std = _per_channel(config.get("image_std", 0.5), channels, "image_std", path)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    unit = 255.0 * rescale
    mean = [m / unit for m in mean]
    std = [s / unit for s in std]
    if all(abs(m) < 1e-12 for m in mean) and all(abs(s - 1.0) < 1e-9 for s in std):
        return {"normalization": "none"}
    return {"mean": mean, "std": std}


def from_pretrained(path, strict: bool = True, **overrides):
    """Build the matching histokd backbone from a Hugging Face model folder and load its weights.

    Reads ``config.json`` (its ``model_type`` picks the family: ``vit`` → :class:`ViTBackbone`,
    ``swinv2`` → :class:`SwinV2Backbone`, and any model type a plugin family registers),
    ``preprocessor_config.json`` when present (pixel mean/std → the backbone's input
    normalisation; otherwise the Hugging Face image processor's default, mean = std = 0.5),
    and the weights (``model.safetensors``, ``pytorch_model.bin`` or a shard index).

    Args:
        path: str or Path. The model folder (as written by ``save_pretrained`` or downloaded).
        strict: bool. Raise on checkpoint weights the model has no place for.
        **overrides: constructor arguments replacing those read from the folder, e.g.
            ``input_size=384``, ``dynamic_size=True``, ``name="teacher"``, ``mean=...``.

    Returns:
        The backbone (a :class:`~histokd.backbones.base.Backbone`) holding the weights.

    Raises:
        WeightsError: missing folder, ``config.json`` or weights file, unreadable files, or
            weights that do not fit the architecture ``config.json`` describes.
        ConfigError: an unsupported ``model_type`` (the message lists the supported ones) or a
            config option the family does not implement.

    Example:
        >>> enc = from_pretrained("hf_models/vit-base-patch16-224")  # doctest: +SKIP
        >>> enc = from_pretrained("hf_models/swinv2-tiny-patch4-window8-256", input_size=512)  # doctest: +SKIP
    """
    if not isinstance(path, (str, os.PathLike)):
        raise WeightsError(f"from_pretrained needs the path of a Hugging Face model folder, got {path!r}")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise WeightsError(f"model folder {str(folder)!r} does not exist; download the model (config.json + "
                           "model.safetensors) and pass its folder")
    if not folder.is_dir():
        raise WeightsError(f"{str(folder)!r} is a file; from_pretrained needs the model folder holding "
                           "config.json and the weights (use load_pretrained to load a single checkpoint "
                           "file into a backbone you built)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{str(folder)!r} has no config.json, so the architecture is unknown; use the "
                           "complete Hugging Face model folder, or build the backbone yourself and call "
                           "load_pretrained(backbone, folder)")
    config = _read_json(cfg_path, "config.json")
    entry = hf_model_type(config.get("model_type"))
    kwargs = entry.config_to_kwargs(config)
    pre_path = folder / "preprocessor_config.json"
    if pre_path.is_file():
        kwargs.update(normalization_from_preprocessor(_read_json(pre_path, "preprocessor_config.json"),
                                                      int(kwargs.get("in_channels", 3)), pre_path))
    else:
        kwargs.update(entry.default_normalization)
    if any(k in overrides for k in ("mean", "std", "normalization")):
        for k in ("mean", "std", "normalization"):
            kwargs.pop(k, None)
    if "model_name" in overrides:
        overrides["name"] = overrides.pop("model_name")
    kwargs.update(overrides)
    if not any((folder / n).is_file() for n in WEIGHT_FILES + tuple(n + ".index.json" for n in WEIGHT_FILES)):
        raise WeightsError(f"{str(folder)!r} has a config.json but no weights ({', '.join(WEIGHT_FILES)} or a "
                           "shard index); download the weights file into the folder")
    try:
        model = entry.build(**kwargs)
    except TypeError as err:  # an override the family does not take
        raise ConfigError(f"cannot build a {entry.family} backbone from {str(folder)!r} with options "
                          f"{sorted(overrides)}: {err}") from None
    load_pretrained(model, folder, layout=entry.layout, strict=strict)
    return model
