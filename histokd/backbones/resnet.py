"""Convolutional encoders of More From Less: keras.applications models and a small ResNet-18.

Registry keys (``histokd.registry.BACKBONES``):

* ``resnet50`` – ``keras.applications.ResNet50`` (the paper's encoder, D = 2048).
* ``mobilenet_v2`` – ``keras.applications.MobileNetV2`` (D = 1280 · max(1, alpha)).
* ``efficientnet_b0`` – ``keras.applications.EfficientNetB0`` (D = 1280).
* ``xception`` – ``keras.applications.Xception`` (D = 2048, input ≥ 71 px).
* ``resnet18`` – histokd's own ResNet-18 (BasicBlock [2, 2, 2, 2], torchvision
  layout, optional width multiplier and small-input stem) for CPU runs.

Each returns a :class:`~histokd.backbones.base.Backbone` taking float32 images
in [0, 1] and returning globally average-pooled features.

Reference: Fuster et al., "More From Less: Self-Supervised Knowledge
Distillation for Routine Histopathology Data", §2.2 (ResNet-50 encoder with
output size 2048, trained from random initialisation) and Table S2 (encoder
ablations: ResNet50, MobileNetV2, EfficientNetB0, Xception).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Tuple

import keras

from histokd.backbones._common import register_backbone
from histokd.backbones.base import (
    Backbone,
    BatchNormalization,
    ImageNormalization,
    check_weights_arg,
    load_weights_file,
    parse_input_size,
    register_stage_layout,
)
from histokd.errors import ConfigError, WeightsError


@dataclass(frozen=True)
class _AppSpec:
    fn: str                       # keras.applications attribute
    mode: str                     # ImageNormalization mode (= its preprocess_input)
    min_size: int                 # keras.applications' minimum input size
    stages: Tuple[str, ...]       # stage-output layer names, shallow → deep
    extra: Dict[str, object] = field(default_factory=dict)  # accepted extra kwargs → default


_APPS = {
    "resnet50": _AppSpec(
        "ResNet50", "caffe", 32,
        ("conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
         "conv5_block3_out"),
    ),
    "mobilenet_v2": _AppSpec(
        "MobileNetV2", "tf", 32,
        ("expanded_conv_project_BN", "block_2_add", "block_5_add", "block_12_add", "out_relu"),
        {"alpha": 1.0},
    ),
    "efficientnet_b0": _AppSpec(
        "EfficientNetB0", "scale255", 32,
        ("block1a_project_bn", "block2b_add", "block3b_add", "block5c_add", "top_activation"),
    ),
    "xception": _AppSpec(
        "Xception", "tf", 71,
        ("block1_conv2_act", "block2_add", "block3_add", "block12_add", "block14_sepconv2_act"),
    ),
}


for _arch, _spec in _APPS.items():
    register_stage_layout(_arch, _spec.stages)
register_stage_layout(
    "resnet18",
    ("conv1_relu", "conv2_block2_out", "conv3_block2_out", "conv4_block2_out", "conv5_block2_out"),
)


def _snake(name: str) -> str:
    name = re.sub(r"\W+", "", name)
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _is_auto_named(layer) -> bool:
    return re.fullmatch(re.escape(_snake(layer.__class__.__name__)) + r"(_\d+)?", layer.name) is not None


def _inbound_layers(layer):
    out = []
    for node in layer._inbound_nodes[:1]:
        for t in node.input_tensors:
            out.append(t._keras_history.operation)
    return out


def _deterministic_names(model: keras.Model) -> Dict[int, str]:
    """New names for layers that Keras named from a session-wide counter.

    Xception leaves its residual ``add`` layers and shortcut convolutions
    unnamed, EfficientNet its input ``rescaling``/``normalization``: their names
    would depend on how many such layers the session built before. Adds are
    named after the block they close (``block4_add``), shortcut layers after
    the add they feed (``block4_shortcut_conv``/``_bn``); anything else gets the
    name Keras would give it in a fresh session.
    """
    rename: Dict[int, str] = {}
    auto = [l for l in model.layers if _is_auto_named(l) and not isinstance(l, keras.layers.InputLayer)]
    auto_ids = {id(l) for l in auto}
    for layer in auto:
        if isinstance(layer, keras.layers.Add):
            blocks = []
            for parent in _inbound_layers(layer):
                m = re.match(r"block(\d+)_", parent.name)
                if m and id(parent) not in auto_ids:
                    blocks.append(int(m.group(1)))
            if blocks:
                block = max(blocks)
                rename[id(layer)] = f"block{block}_add"
                for parent in _inbound_layers(layer):
                    if id(parent) in auto_ids and isinstance(parent, keras.layers.BatchNormalization):
                        rename[id(parent)] = f"block{block}_shortcut_bn"
                        for grand in _inbound_layers(parent):
                            if id(grand) in auto_ids and isinstance(grand, keras.layers.Conv2D):
                                rename[id(grand)] = f"block{block}_shortcut_conv"
    taken = {l.name for l in model.layers if id(l) not in auto_ids} | set(rename.values())
    counts: Dict[str, int] = {}
    for layer in auto:
        if id(layer) in rename:
            continue
        snake = _snake(layer.__class__.__name__)
        while True:
            k = counts.get(snake, 0)
            counts[snake] = k + 1
            candidate = snake if k == 0 else f"{snake}_{k}"
            if candidate not in taken:
                break
        rename[id(layer)] = candidate
        taken.add(candidate)
    return rename


def _rebuilt(model: keras.Model, rename: Dict[int, str], fused_bn: bool) -> keras.Model:
    """Clones a functional model, renaming layers and optionally fusing BatchNorm.

    Weights are copied over, so ImageNet weights survive the clone.
    """

    def clone_layer(layer):
        config = layer.get_config()
        if id(layer) in rename:
            config["name"] = rename[id(layer)]
        cls = layer.__class__
        if fused_bn and cls is keras.layers.BatchNormalization:
            cls = BatchNormalization
        return cls.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def _check_kwargs(arch: str, kwargs: dict, allowed: dict):
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        valid = ["input_size", "weights", "model_name", *allowed]
        raise ConfigError(
            f"backbone {arch!r} got unknown option(s) {unknown}; valid options: {', '.join(valid)}"
        )


def _keras_app_backbone(arch: str, input_size, weights, model_name, fused_bn=True, **kwargs) -> Backbone:
    spec = _APPS[arch]
    _check_kwargs(arch, kwargs, spec.extra)
    options = {**spec.extra, **kwargs}
    height, width = parse_input_size(input_size, arch, spec.min_size)
    weights = check_weights_arg(weights, arch)
    app_fn = getattr(keras.applications, spec.fn)

    image = keras.Input((height, width, 3), name="image")
    x = ImageNormalization(spec.mode, name="normalize")(image)
    try:
        app = app_fn(
            include_top=False,
            weights="imagenet" if weights == "imagenet" else None,
            input_tensor=x,
            pooling=None,
            **options,
        )
    except ValueError as err:
        if weights == "imagenet" and "weights" in str(err):
            raise WeightsError(
                f"keras.applications.{spec.fn} has no ImageNet weights for options {options}: {err}"
            ) from err
        raise ConfigError(f"cannot build backbone {arch!r} with {options}: {err}") from err
    except Exception as err:  # download failure: no internet, proxy, checksum
        if weights != "imagenet":
            raise
        raise WeightsError(
            f"could not obtain ImageNet weights for {spec.fn} ({type(err).__name__}: {err}). "
            f"weights='imagenet' needs internet access, or the Keras file already in "
            f"~/.keras/models/; otherwise download it elsewhere and pass weights=PATH"
        ) from err
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(app.output)
    plain = keras.Model(image, pooled, name=model_name or arch)
    rename = _deterministic_names(plain)
    if rename or fused_bn:
        plain = _rebuilt(plain, rename, fused_bn)
    backbone = Backbone(
        plain.inputs[0], plain.outputs[0], name=model_name or arch, stage_names=spec.stages, arch=arch
    )
    if weights is not None and weights != "imagenet":
        load_weights_file(
            backbone, weights, arch,
            expected=f"keras.applications.{spec.fn}(include_top=False"
            + "".join(f", {k}={v!r}" for k, v in kwargs.items()) + ")",
        )
    return backbone


@register_backbone("resnet50", tiny={"input_size": 32})
def resnet50(input_size=224, weights=None, model_name=None, fused_bn=True) -> Backbone:
    """ResNet-50 encoder (``keras.applications.ResNet50``), pooled output D = 2048.

    Paper: More From Less, §2.2 — "all models except ablations used a ResNet-50
    encoder with output size 2048", trained from random initialisation.

    Args:
        input_size: int, (H, W) or None. Input tile size in pixels (≥ 32); None = any size.
        weights: None, "imagenet" or str path. None = random initialisation;
            a path to a ``.weights.h5``/``.h5``/``.keras`` file saved from this
            backbone (or Keras' ``resnet50_..._notop.h5``); "imagenet" downloads
            Keras' weights (needs internet, or the file in ``~/.keras/models/``).
        model_name: str or None. Model name (default ``"resnet50"``); give two
            independent encoders distinct names.
        fused_bn: bool. Use :class:`~histokd.backbones.base.BatchNormalization`
            (one fused kernel per BatchNorm in training, same results) instead of
            ``keras.layers.BatchNormalization``; faster on CPU.

    Returns:
        Backbone with ``caffe`` normalisation inside; takes [0, 1] RGB images.

    Example:
        >>> bb = make_backbone("resnet50", 64)
        >>> bb(np.zeros((2, 64, 64, 3), "float32")).shape
        TensorShape([2, 2048])
    """
    return _keras_app_backbone("resnet50", input_size, weights, model_name, fused_bn=fused_bn)


@register_backbone("mobilenet_v2", tiny={"input_size": 64, "alpha": 0.35})  # 2x2 last maps: a 1x1 map makes BN shifts gradient-free
def mobilenet_v2(input_size=224, weights=None, model_name=None, alpha=1.0, fused_bn=True) -> Backbone:
    """MobileNetV2 encoder (``keras.applications.MobileNetV2``), D = 1280 for alpha ≤ 1.

    Paper: More From Less, Table S2 (encoder ablation).

    Args:
        input_size: int, (H, W) or None. Input tile size in pixels (≥ 32).
        weights: None, "imagenet" or str path (see :func:`resnet50`).
        model_name: str or None. Model name (default ``"mobilenet_v2"``).
        alpha: float. Width multiplier of Keras' MobileNetV2.
        fused_bn: bool. Use :class:`~histokd.backbones.base.BatchNormalization`
            (one fused kernel per BatchNorm in training, same results) instead of
            ``keras.layers.BatchNormalization``; faster on CPU.

    Returns:
        Backbone with ``tf`` normalisation ([-1, 1]) inside.

    Example:
        >>> bb = make_backbone("mobilenet_v2", 64)
        >>> bb.output_dim
        1280
    """
    return _keras_app_backbone("mobilenet_v2", input_size, weights, model_name, fused_bn=fused_bn,
                               alpha=alpha)


@register_backbone("efficientnet_b0", tiny={"input_size": 32})
def efficientnet_b0(input_size=224, weights=None, model_name=None, fused_bn=True) -> Backbone:
    """EfficientNetB0 encoder (``keras.applications.EfficientNetB0``), D = 1280.

    Paper: More From Less, Table S2 (encoder ablation). The Keras model rescales
    its 0–255 input itself, so histokd only multiplies by 255. Note: Keras adds
    an extra per-channel rescale only when built with ``weights="imagenet"``;
    to reproduce Keras' ImageNet features use ``weights="imagenet"`` (with the
    file in ``~/.keras/models/`` when offline) rather than a path to that file.

    Args:
        input_size: int, (H, W) or None. Input tile size in pixels (≥ 32).
        weights: None, "imagenet" or str path (see :func:`resnet50`).
        model_name: str or None. Model name (default ``"efficientnet_b0"``).
        fused_bn: bool. Use :class:`~histokd.backbones.base.BatchNormalization`
            (one fused kernel per BatchNorm in training, same results) instead of
            ``keras.layers.BatchNormalization``; faster on CPU.

    Returns:
        Backbone with ``scale255`` normalisation inside.

    Example:
        >>> make_backbone("efficientnet_b0", 64).output_dim
        1280
    """
    return _keras_app_backbone("efficientnet_b0", input_size, weights, model_name, fused_bn=fused_bn)


@register_backbone("xception", tiny={"input_size": 71})
def xception(input_size=299, weights=None, model_name=None, fused_bn=True) -> Backbone:
    """Xception encoder (``keras.applications.Xception``), D = 2048, input ≥ 71 px.

    Paper: More From Less, Table S2 (encoder ablation). Keras leaves the
    residual adds and shortcut convolutions of Xception unnamed; histokd names
    them ``block<N>_add``, ``block<N>_shortcut_conv`` and ``block<N>_shortcut_bn``.

    Args:
        input_size: int, (H, W) or None. Input tile size in pixels (≥ 71).
        weights: None, "imagenet" or str path (see :func:`resnet50`).
        model_name: str or None. Model name (default ``"xception"``).
        fused_bn: bool. Use :class:`~histokd.backbones.base.BatchNormalization`
            (one fused kernel per BatchNorm in training, same results) instead of
            ``keras.layers.BatchNormalization``; faster on CPU.

    Returns:
        Backbone with ``tf`` normalisation ([-1, 1]) inside.

    Example:
        >>> make_backbone("xception", 96).stage_names[1]
        'block2_add'
    """
    return _keras_app_backbone("xception", input_size, weights, model_name, fused_bn=fused_bn)


# --------------------------------------------------------------------------- ResNet-18

_RESNET18_WIDTHS = (64, 128, 256, 512)
_RESNET18_BLOCKS = (2, 2, 2, 2)
# torchvision conventions, so converted torchvision weights behave the same.
_BN_KW = dict(momentum=0.9, epsilon=1e-5)


def _kaiming():
    # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


def _conv_bn(x, filters, kernel, stride, name, relu=True, zero_gamma=False, fused_bn=True):
    if stride > 1 and kernel > 1:
        # Symmetric padding as in PyTorch; Keras' "same" pads bottom/right only at stride 2.
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding=padding, use_bias=False,
        kernel_initializer=_kaiming(), name=f"{name}_conv",
    )(x)
    bn = BatchNormalization if fused_bn else keras.layers.BatchNormalization
    x = bn(gamma_initializer="zeros" if zero_gamma else "ones", name=f"{name}_bn", **_BN_KW)(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _basic_block(x, filters, stride, name, zero_init_residual, fused_bn):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_0", relu=False, fused_bn=fused_bn)
    y = _conv_bn(x, filters, 3, stride, f"{name}_1", fused_bn=fused_bn)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False, zero_gamma=zero_init_residual,
                 fused_bn=fused_bn)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


@register_backbone("resnet18", tiny={"input_size": 32, "width": 0.125, "small_input": True})
def resnet18(input_size=224, weights=None, model_name=None, width=1.0, small_input=False,
             zero_init_residual=False, fused_bn=True) -> Backbone:
    """ResNet-18 encoder (BasicBlock [2, 2, 2, 2]) with a width multiplier, for CPU runs.

    The layout of torchvision's ``resnet18`` without the classifier (bias-free
    convolutions, BatchNorm momentum 0.1 in PyTorch terms, eps 1e-5, symmetric
    padding, Kaiming-normal fan-out init) so that converted torchvision weights
    give the same features; width 1 has 11,176,512 trainable parameters. Layer
    names follow Keras' ResNet50 (``conv2_block1_1_conv`` ... ``conv5_block2_out``).

    Not one of the paper's encoders: a small stand-in for the ResNet-50 of More
    From Less §2.2 when training on 2 CPU cores.

    Args:
        input_size: int, (H, W) or None. Input tile size in pixels (≥ 32).
        weights: None or str path of a weights file saved from a resnet18
            backbone built with the same ``width``/``small_input``.
        model_name: str or None. Model name (default ``"resnet18"``).
        width: float. Multiplier of the stage widths 64/128/256/512 (e.g. 0.25
            for tests); D = round(512 · width).
        small_input: bool. Stem of 3×3 stride-1 convolution without max-pool
            (for tiles ≤ 64 px) instead of 7×7 stride-2 convolution + 3×3/2 max-pool.
        zero_init_residual: bool. Start each block's last BatchNorm at γ = 0.
        fused_bn: bool. Use :class:`~histokd.backbones.base.BatchNormalization`
            (one fused kernel per BatchNorm in training, same results) instead of
            ``keras.layers.BatchNormalization``; faster on CPU.

    Returns:
        Backbone with ``torch`` (ImageNet mean/std) normalisation inside.

    Example:
        >>> bb = make_backbone("resnet18", 32, width=0.25, small_input=True)
        >>> bb.output_dim
        128
    """
    arch = "resnet18"
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ConfigError(f"resnet18 width must be a positive number (e.g. 0.25, 1.0); got {width!r}")
    height, wdt = parse_input_size(input_size, arch, 32)
    weights = check_weights_arg(weights, arch, allow_imagenet=False)
    stem = _scaled(64, width)
    widths = [_scaled(c, width) for c in _RESNET18_WIDTHS]

    image = keras.Input((height, wdt, 3), name="image")
    x = ImageNormalization("torch", name="normalize")(image)
    if small_input:
        x = _conv_bn(x, stem, 3, 1, "conv1", fused_bn=fused_bn)
    else:
        x = _conv_bn(x, stem, 7, 2, "conv1", fused_bn=fused_bn)
        x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    stages = ["conv1_relu"]
    for s, (filters, blocks) in enumerate(zip(widths, _RESNET18_BLOCKS), start=2):
        for b in range(1, blocks + 1):
            stride = 2 if (b == 1 and s > 2) else 1
            x = _basic_block(x, filters, stride, f"conv{s}_block{b}", zero_init_residual, fused_bn)
        stages.append(f"conv{s}_block{blocks}_out")
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    backbone = Backbone(image, pooled, name=model_name or arch, stage_names=stages, arch=arch)
    if weights is not None:
        load_weights_file(
            backbone, weights, arch,
            expected=f"histokd ResNet-18 (width={width}, small_input={small_input})",
        )
    return backbone
