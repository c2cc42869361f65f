"""HoVer-Net (Graham et al., 2019) as a Keras 3 model, layer for layer like the official network.

The More From Less paper (§2.1 "Tissue-Nuclei Distillation") segments and types
the nuclei of every tile with HoVer-Net and pairs the type-coloured mask with the
image. This module rebuilds the official PyTorch network (vqdang/hover_net,
``models/hovernet/net_desc.py``; the same keys in TIAToolbox's port) so that the
released checkpoints load onto it through the explicit key table in
:mod:`histokd.nuclei.checkpoint` and give the same numbers.

Every Keras layer that holds weights is named after its PyTorch module path with
``.`` and ``/`` replaced by ``_`` (``d0.units.1.preact/bn`` →
``d0_units_1_preact_bn``; the stem conv ``conv0./`` → ``conv0_conv``).
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import numpy as np
import keras
from keras import layers, ops

from histokd.errors import ConfigError

#: Nuclear types of the PanNuke-trained model (hover_net ``type_info.json``).
PANNUKE_TYPE_NAMES = (
    "Background",
    "Neoplastic",
    "Inflammatory",
    "Connective",
    "Dead",
    "Non-Neoplastic Epithelial",
)
#: RGB colour of each PanNuke type id (hover_net ``type_info.json``).
PANNUKE_PALETTE = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 165, 0]],
    dtype=np.uint8,
)

#: mode → (default input size, border between input and output, decoder kernel size)
MODES = {
    "fast": {"input_size": 256, "border": 46, "ksize": 3, "stem_padding": "same"},
    "original": {"input_size": 270, "border": 95, "ksize": 5, "stem_padding": "valid"},
}
BN_EPSILON = 1e-5  # PyTorch default, used by the official network everywhere
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1 expressed the Keras way

# (groups, unit channels [c1, c2, c3], units, stride) of the pre-activation ResNet-50 encoder.
ENCODER_GROUPS = (
    (0, (64, 64, 256), 3, 1),
    (1, (128, 128, 512), 4, 2),
    (2, (256, 256, 1024), 6, 2),
    (3, (512, 512, 2048), 3, 2),
)


_NATIVE_GROUPED_CONV = None


def native_grouped_conv_available() -> bool:
    """Whether ``tf.nn.conv2d`` runs grouped convolutions here (checked once, eagerly).

    True on TensorFlow builds whose kernels accept a kernel with fewer input channels
    than the input and compute the grouped result (CPU oneDNN and Eigen in 2.21, cuDNN);
    False on other Keras backends and wherever the probe fails or computes otherwise.
    """
    global _NATIVE_GROUPED_CONV
    if _NATIVE_GROUPED_CONV is None:
        if keras.backend.backend() != "tensorflow":
            _NATIVE_GROUPED_CONV = False
        else:
            import tensorflow as tf

            with tf.init_scope():  # eager even when first called while tracing
                try:
                    x = tf.reshape(tf.range(36, dtype=tf.float32), [1, 3, 3, 4])
                    w = tf.ones([2, 2, 2, 2], tf.float32)
                    y = tf.nn.conv2d(x, w, strides=1, padding="VALID").numpy()
                    # groups of 2 channels: output 0 sums input channels 0-1 only
                    ok = y.shape == (1, 2, 2, 2) and float(y[0, 0, 0, 0]) == float(
                        x.numpy()[0, :2, :2, :2].sum())
                except Exception:  # noqa: BLE001 - any failure means "not available"
                    ok = False
            _NATIVE_GROUPED_CONV = bool(ok)
    return _NATIVE_GROUPED_CONV


@keras.saving.register_keras_serializable(package="histokd")
class GroupedConv2D(layers.Conv2D):
    """A grouped 2-D convolution that runs on any CPU build of TensorFlow.

    The kernel is stored exactly like Keras' grouped ``Conv2D`` (``[kh, kw,
    in_channels / groups, filters]``, groups in channel order, the same order as
    PyTorch's ``groups=``). On TensorFlow it calls ``tf.nn.conv2d`` with that
    kernel directly, which runs as a grouped convolution on CPU (oneDNN, and the
    Eigen kernels with ``TF_ENABLE_ONEDNN_OPTS=0``; checked on TensorFlow 2.21) and
    on cuDNN — Keras' own ``ops.conv`` sends grouped convolutions on CPU to XLA
    instead, which is slower for HoVer-Net's dense-unit convolutions (figures:
    docs/benchmarks.md), and so is the dense form below. Where
    the native kernel is missing or wrong (other backends, older builds), which a
    tiny eager probe detects once, it falls back to one dense convolution whose
    kernel is made block-diagonal by a constant mask: the same result with
    ``groups`` times the multiply-adds.

    Used in HoVer-Net's dense units (Graham et al., 2019, HoVer-Net §3.1; the
    official ``DenseBlock`` with ``split=4``).

    Args:
        filters: int. Output channels (divisible by ``groups``).
        kernel_size: int or tuple. Kernel size.
        groups: int. Number of groups.
        **kwargs: the other ``keras.layers.Conv2D`` arguments.

    Example:
        >>> conv = GroupedConv2D(32, 3, groups=4, use_bias=False)
        >>> conv(np.zeros((1, 8, 8, 128), "float32")).shape
        (1, 6, 6, 32)
    """

    def build(self, input_shape):
        super().build(input_shape)
        cin = int(input_shape[-1])
        cin_g, cout_g = cin // self.groups, self.filters // self.groups
        mask = (np.arange(cin)[:, None] // cin_g) == (np.arange(self.filters)[None, :] // cout_g)
        self._block_mask = mask.astype("float32")

    def convolution_op(self, inputs, kernel):
        if self.groups == 1:
            return super().convolution_op(inputs, kernel)
        if native_grouped_conv_available():
            import tensorflow as tf

            return tf.nn.conv2d(
                inputs,
                ops.cast(kernel, inputs.dtype),
                strides=list(self.strides),
                padding=self.padding.upper(),
                dilations=list(self.dilation_rate),
                data_format="NHWC" if self.data_format == "channels_last" else "NCHW",
            )
        dense = ops.tile(kernel, [1, 1, self.groups, 1]) * ops.cast(self._block_mask, kernel.dtype)
        return ops.conv(
            inputs,
            dense,
            strides=list(self.strides),
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )


def _bn(name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _conv(filters, k, name, stride=1, padding="valid", use_bias=False):
    return layers.Conv2D(filters, k, strides=stride, padding=padding, use_bias=use_bias, name=name)


def _conv_bn_relu(x, filters, k, name, bn_name, relu_name, fused, stride=1, padding="valid"):
    """conv → BN → ReLU; with ``fused`` one conv with the BN folded into kernel and bias."""
    if fused:
        return layers.Conv2D(filters, k, strides=stride, padding=padding, use_bias=True,
                             activation="relu", name=name)(x)
    x = _conv(filters, k, name, stride=stride, padding=padding)(x)
    x = _bn(bn_name)(x)
    return layers.ReLU(name=relu_name)(x)


def _centre_crop(x, crop, name):
    """Crop ``crop`` pixels per spatial axis, top/left getting ``crop // 2`` like ``crop_op``."""
    t = crop // 2
    return layers.Cropping2D(((t, crop - t), (t, crop - t)), name=name)(x)


def _residual_group(x, g, channels, units, stride, fused=False):
    prefix = f"d{g}"
    shortcut = _conv(channels[2], 1, f"{prefix}_shortcut", stride=stride)(x)
    feat = x
    for i in range(units):
        p = f"{prefix}_units_{i}"
        y = feat
        if i > 0:  # unit 0 follows a block that already ends in BN + ReLU
            y = _bn(f"{p}_preact_bn")(y)
            y = layers.ReLU(name=f"{p}_preact_relu")(y)
        y = _conv_bn_relu(y, channels[0], 1, f"{p}_conv1", f"{p}_conv1_bn", f"{p}_conv1_relu", fused)
        # Keras "same" pads like TF-same (0 top/left, 1 bottom/right for stride 2 on even sizes).
        y = _conv_bn_relu(y, channels[1], 3, f"{p}_conv2", f"{p}_conv2_bn", f"{p}_conv2_relu", fused,
                          stride=stride if i == 0 else 1, padding="same")
        y = _conv(channels[2], 1, f"{p}_conv3")(y)
        feat = layers.Add(name=f"{p}_add")([y, shortcut])
        shortcut = feat
    feat = _bn(f"{prefix}_blk_bna_bn")(feat)
    return layers.ReLU(name=f"{prefix}_blk_bna_relu")(feat)


def _dense_block(x, prefix, units, ksize, fused=False):
    for i in range(units):
        p = f"{prefix}_units_{i}"
        y = _bn(f"{p}_preact_bna_bn")(x)
        y = layers.ReLU(name=f"{p}_preact_bna_relu")(y)
        y = _conv_bn_relu(y, 128, 1, f"{p}_conv1", f"{p}_conv1_bn", f"{p}_conv1_relu", fused)
        y = GroupedConv2D(32, ksize, groups=4, use_bias=False, name=f"{p}_conv2")(y)
        x = _centre_crop(x, ksize - 1, f"{p}_crop")
        x = layers.Concatenate(name=f"{p}_concat")([x, y])  # +32 channels per unit
    x = _bn(f"{prefix}_blk_bna_bn")(x)
    return layers.ReLU(name=f"{prefix}_blk_bna_relu")(x)


def _decoder_branch(branch, d, out_ch, ksize, fused=False):
    p = f"decoder_{branch}"
    u3 = layers.UpSampling2D(2, name=f"{p}_u3_up")(d[3])
    u3 = layers.Add(name=f"{p}_u3_add")([u3, d[2]])
    u3 = _conv(256, ksize, f"{p}_u3_conva")(u3)
    u3 = _dense_block(u3, f"{p}_u3_dense", 8, ksize, fused)
    u3 = _conv(512, 1, f"{p}_u3_convf")(u3)

    u2 = layers.UpSampling2D(2, name=f"{p}_u2_up")(u3)
    u2 = layers.Add(name=f"{p}_u2_add")([u2, d[1]])
    u2 = _conv(128, ksize, f"{p}_u2_conva")(u2)
    u2 = _dense_block(u2, f"{p}_u2_dense", 4, ksize, fused)
    u2 = _conv(256, 1, f"{p}_u2_convf")(u2)

    u1 = layers.UpSampling2D(2, name=f"{p}_u1_up")(u2)
    u1 = layers.Add(name=f"{p}_u1_add")([u1, d[0]])
    u1 = _conv(64, ksize, f"{p}_u1_conva", padding="same")(u1)

    u0 = _bn(f"{p}_u0_bn")(u1)
    u0 = layers.ReLU(name=f"{p}_u0_relu")(u0)
    return _conv(out_ch, 1, f"{p}_u0_conv", use_bias=True)(u0)


def output_size(mode: str, input_size: int) -> int:
    """Side of HoVer-Net's output for a square input (fast: −92 px, original: −190 px)."""
    return int(input_size) - 2 * MODES[mode]["border"]


def _check_args(mode, num_types, input_size):
    if mode not in MODES:
        raise ConfigError(f"HoVer-Net mode {mode!r} is unknown; use 'fast' (256→164) or 'original' (270→80)")
    if num_types is None:
        num_types = 0
    if int(num_types) < 0 or int(num_types) == 1:
        raise ConfigError(
            f"num_types={num_types} is invalid; use 0 for no type branch or ≥ 2 "
            "(6 for the PanNuke model: background + 5 nuclear types)"
        )
    if input_size is None:
        input_size = MODES[mode]["input_size"]
    input_size = int(input_size)
    stem = 0 if mode == "fast" else 6
    if (input_size - stem) % 8 != 0 or output_size(mode, input_size) < 8:
        want = "a multiple of 8, ≥ 104 (256 is the official size)" if mode == "fast" else (
            "6 + a multiple of 8, ≥ 206 (270 is the official size)")
        raise ConfigError(f"input_size={input_size} does not fit HoVer-Net {mode!r} mode; use {want}")
    return mode, int(num_types), input_size


@keras.saving.register_keras_serializable(package="histokd")
class HoVerNet(keras.Model):
    """HoVer-Net: simultaneous nuclear instance segmentation and classification.

    Graham et al., "HoVer-Net: Simultaneous Segmentation and Classification of
    Nuclei in Multi-Tissue Histology Images", MedIA 2019, §3.1 and Fig. 2; used by
    "More From Less" §2.1 (Tissue-Nuclei Distillation) to build nuclear-type
    masks. Layer for layer like the official PyTorch network: pre-activation
    ResNet-50 encoder without max-pool, ``conv_bot``, three decoder branches
    (``tp``, ``np``, ``hv``) with dense blocks whose 3×3/5×5 convs have 4 groups,
    BatchNorm epsilon 1e-5.

    The input is an RGB uint8 batch ``[B, S, S, 3]`` (any numeric dtype with
    values 0–255); the model divides by 255 itself — no mean/std or stain
    normalisation. The outputs are a dict of **raw logits** (no softmax), NHWC,
    centred in the input with a border of 46 px (fast) or 95 px (original):
    ``np`` [B, s, s, 2], ``hv`` [B, s, s, 2] (channel 0 horizontal/x, channel 1
    vertical/y) and, when ``num_types > 0``, ``tp`` [B, s, s, num_types]. Use
    :func:`predict_maps` for probabilities.

    Args:
        mode: str. ``"fast"`` (256 → 164, decoder kernel 3) or ``"original"``
            (270 → 80, decoder kernel 5).
        num_types: int. Number of type classes including background (6 for the
            PanNuke model); 0 builds no type branch.
        input_size: int or None. Square input side; default 256 (fast) / 270
            (original). Other sizes work when the skip connections line up
            (fast: multiple of 8; original: 6 + multiple of 8); output is
            ``input_size − 92`` (fast) or ``− 190`` (original).
        fused: bool. Inference-only variant with every conv → BN → ReLU folded
            into one biased conv with ReLU (69 of the 130 BN layers). Build it
            with :func:`fuse_batchnorm`; the official key table maps onto the
            unfused model only.
        name: str. Model name.

    Example:
        >>> net = HoVerNet(mode="fast", num_types=6)
        >>> out = net(np.zeros((1, 256, 256, 3), "uint8"))
        >>> out["np"].shape, out["tp"].shape
        (TensorShape([1, 164, 164, 2]), TensorShape([1, 164, 164, 6]))
    """

    def __init__(self, mode: str = "fast", num_types: int = 6, input_size: Optional[int] = None,
                 fused: bool = False, name: str = "hovernet", **kwargs):
        mode, num_types, input_size = _check_args(mode, num_types, input_size)
        cfg = MODES[mode]
        ksize = cfg["ksize"]
        inputs = keras.Input((input_size, input_size, 3), name="image")
        x = layers.Rescaling(1.0 / 255.0, name="scale")(inputs)  # forward() divides by 255
        x = _conv_bn_relu(x, 64, 7, "conv0_conv", "conv0_bn", "conv0_relu", fused,
                          padding=cfg["stem_padding"])
        feats = []
        for g, channels, units, stride in ENCODER_GROUPS:
            x = _residual_group(x, g, channels, units, stride, fused)
            feats.append(x)
        d3 = _conv(1024, 1, "conv_bot")(feats[3])
        # Centre crops of the skip features (crop_op: top/left gets c // 2).
        crop0, crop1 = (92, 36) if mode == "fast" else (184, 72)
        d0 = _centre_crop(feats[0], crop0, "d0_crop")
        d1 = _centre_crop(feats[1], crop1, "d1_crop")
        d = [d0, d1, feats[2], d3]

        outputs = {}
        branches = ([("tp", num_types)] if num_types else []) + [("np", 2), ("hv", 2)]
        for branch, out_ch in branches:
            outputs[branch] = _decoder_branch(branch, d, out_ch, ksize, fused)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)
        self.fused = bool(fused)
        self.mode = mode
        self.num_types = num_types
        self.input_size = input_size

    @property
    def output_size(self) -> int:
        """Side of the output maps."""
        return output_size(self.mode, self.input_size)

    @property
    def border(self) -> int:
        """Pixels between the input edge and the output edge (46 fast, 95 original)."""
        return MODES[self.mode]["border"]

    def encoder_layers(self):
        """The layers the official schedule freezes first (the pre-activation ResNet groups d0–d3)."""
        return [l for l in self.layers if l.name.split("_")[0] in ("d0", "d1", "d2", "d3")
                and l.name not in ("d0_crop", "d1_crop")]

    def set_encoder_trainable(self, trainable: bool):
        """Freeze (False) or unfreeze the encoder groups d0–d3, as the official two-phase schedule.

        Frozen BatchNorm layers run in inference mode (Keras semantics; PyTorch's
        release kept updating their statistics).
        """
        for layer in self.encoder_layers():
            layer.trainable = bool(trainable)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """HoVer-Net's NP/HV/TP loss on dict targets unless compiled with another Keras loss.

        ``fit`` data: ``(images uint8, {"np": [B,h,w] int, "hv": [B,h,w,2], "tp": [B,h,w] int})``
        (see :mod:`histokd.nuclei.targets`). Compile with ``loss=HoVerNetLoss(...)`` to
        change term weights or the MSGE gradient axes, or with no loss for the defaults.
        """
        from histokd.losses.hovernet import HoVerNetLoss

        if self.loss is not None and not isinstance(self.loss, HoVerNetLoss):
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        fn = self.loss if isinstance(self.loss, HoVerNetLoss) else HoVerNetLoss()
        total = fn(y, y_pred)
        for extra in self.losses:
            total = total + ops.sum(extra)
        return total

    def get_config(self):
        return {"mode": self.mode, "num_types": self.num_types, "input_size": self.input_size,
                "fused": self.fused, "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)


def fuse_batchnorm(model: HoVerNet, input_size: Optional[int] = None) -> HoVerNet:
    """An inference copy of ``model`` with each conv → BN → ReLU folded into one conv.

    ``kernel' = kernel · γ/√(σ² + ε)``, ``bias' = β − μ · γ/√(σ² + ε)``; outputs
    equal the original's (inference mode) to float rounding, with fewer passes
    over memory. Use it for mask generation, not for training.

    Args:
        model: HoVerNet (unfused) holding the weights.
        input_size: int or None. Window of the copy (default: the model's).

    Returns:
        HoVerNet with ``fused=True``.

    Example:
        >>> fast = fuse_batchnorm(HoVerNet("fast", 6))
    """
    if getattr(model, "fused", False):
        return model
    fused = HoVerNet(model.mode, model.num_types, input_size or model.input_size, fused=True,
                     name=f"{model.name}_fused")
    for layer in fused.layers:
        if not layer.weights:
            continue
        src = model.get_layer(layer.name)
        if isinstance(layer, layers.Conv2D) and layer.use_bias and not src.use_bias:
            bn = model.get_layer("conv0_bn" if layer.name == "conv0_conv" else f"{layer.name}_bn")
            gamma, beta, mean, var = (np.asarray(w, np.float64) for w in
                                      (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))
            scale = gamma / np.sqrt(var + bn.epsilon)
            layer.kernel.assign((np.asarray(src.kernel, np.float64) * scale).astype(np.float32))
            layer.bias.assign((beta - mean * scale).astype(np.float32))
        else:
            layer.set_weights(src.get_weights())
    return fused


def with_input_size(model: HoVerNet, input_size: int) -> HoVerNet:
    """A copy of ``model`` (same weights) with another window size, e.g. 512 fast → 420 output.

    Larger windows waste less of each window on the 92 px context border.

    Example:
        >>> big = with_input_size(HoVerNet("fast", 6), 512)
    """
    if int(input_size) == model.input_size:
        return model
    new = HoVerNet(model.mode, model.num_types, input_size, fused=getattr(model, "fused", False),
                   name=model.name)
    new.set_weights(model.get_weights())
    return new


def predict_maps(model: HoVerNet, images, batch_size: int = 4) -> Dict[str, np.ndarray]:
    """Run HoVer-Net and turn its logits into the maps post-processing needs.

    Follows the official ``infer_step``: ``np`` = softmax channel 1 (nucleus
    probability), ``hv`` raw, ``tp`` = softmax type probabilities (take the argmax
    for the type map).

    Args:
        model: HoVerNet. The network.
        images: array [B, S, S, 3] uint8 (0–255).
        batch_size: int. Forward-pass batch size.

    Returns:
        dict with ``np`` [B, s, s] float32, ``hv`` [B, s, s, 2] float32 and, if the
        model has a type branch, ``tp`` [B, s, s, T] float32 probabilities.

    Example:
        >>> maps = predict_maps(HoVerNet("fast", 6), np.zeros((1, 256, 256, 3), "uint8"))
        >>> maps["np"].shape
        (1, 164, 164)
    """
    images = np.asarray(images)
    outs = {"np": [], "hv": [], "tp": []}
    fn = _compiled_forward(model)
    for start in range(0, len(images), batch_size):
        raw = fn(images[start:start + batch_size])
        outs["np"].append(ops.convert_to_numpy(ops.softmax(raw["np"], axis=-1))[..., 1])
        outs["hv"].append(ops.convert_to_numpy(raw["hv"]))
        if "tp" in raw:
            outs["tp"].append(ops.convert_to_numpy(ops.softmax(raw["tp"], axis=-1)))
    return {k: np.concatenate(v, axis=0) for k, v in outs.items() if v}


_FORWARD_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled_forward(model):
    """A cached graph-mode inference call (``training=False``) per model."""
    fn = _FORWARD_CACHE.get(model)
    if fn is None:
        import tensorflow as tf

        @tf.function(reduce_retracing=True)
        def fn(x):
            return model(x, training=False)

        _FORWARD_CACHE[model] = fn
    return fn
