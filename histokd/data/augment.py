"""Table S1 augmentations of *More From Less*, batched and fused into two passes.

*More From Less: Self-Supervised Knowledge Distillation for Routine
Histopathology Data*, Supplementary Table S1 lists the augmentations applied
independently to each branch at every training iteration:

==========================  ===========
augmentation                probability
==========================  ===========
flip (left/right, up/down)  1.0
crop (scale 75 % to 100 %)  1.0
Gaussian background noise   0.3
rotation                    0.4
solarise                    0.3
colour jitter               1.0
==========================  ===========

The paper gives the probabilities but not the strengths or the order; the
choices made here (all configurable in :class:`AugmentConfig`) are:

* **Flip.** With probability ``p_flip`` the random flip step runs; it then
  flips each axis independently with probability 0.5 (so ``p_flip=1`` means
  "a random flip is applied", as in Table S1).
* **Crop.** Our own random-resized-crop: crop area uniform in
  ``crop_scale`` (75-100 %) of the image, aspect ratio log-uniform in
  ``crop_ratio`` (3/4-4/3, as the usual RRC), resized back to the working
  size. Instead of rejection sampling, the ratio range is intersected with
  ``[area, 1/area]`` so every draw fits inside the image with *exactly* the
  drawn area (with area 1 the ratio is 1). The ratio is relative to the
  image's own aspect ratio (identical for square patches).
* **Rotation.** With probability ``p_rotate``, an angle uniform in
  ``[-max_rotation, max_rotation]`` degrees (default 180: histology has no
  canonical orientation) about the centre; the corners are filled by
  reflection (``fill_mode="reflect"``), which keeps tissue texture instead of
  introducing black corners.
* **Colour jitter.** With probability ``p_jitter``: brightness factor uniform
  in ``[1-b, 1+b]`` (multiplicative, as torchvision's ``ColorJitter`` used by
  VICReg/SimCLR; ``brightness_mode="additive"`` gives TF/Keras' additive
  ``delta`` in ``[-b, b]`` instead), contrast factor in ``[1-c, 1+c]`` about
  the per-image, per-channel mean (as ``tf.image.adjust_contrast``),
  saturation factor in ``[1-s, 1+s]`` (interpolation towards the luma,
  ``Y = 0.299 R + 0.587 G + 0.114 B``), hue shift uniform in ``[-h, h]``
  turns (a rotation of the chroma plane of YIQ space). Defaults 0.4, 0.4,
  0.4, 0.1.
* **Solarise.** With probability ``p_solarize``, values ``>= 0.5`` become
  ``1 - value``.
* **Noise.** With probability ``p_noise``, additive zero-mean noise,
  independent per pixel and channel, of standard deviation ``noise_std``
  (default 0.05 of the [0, 1] range).

Order: flip -> crop -> rotate (geometry), then jitter -> clip -> solarise ->
noise -> clip (colour). Without intermediate clipping the four jitter
operations commute (brightness is a scalar, contrast commutes with every
affine map, saturation and hue are a scaling and a rotation of the same
chroma plane), so the usual randomised jitter order would only change where
values are clipped; we apply them as one affine map and clip once.

**Why it is fast.** All geometric operations compose into one 3x3 matrix per
image, applied by one bilinear resample with reflect fill; all colour
operations compose into one 3x3 matrix plus offset per image (the contrast
mean is tracked through the map), followed by solarise and noise in the same
elementwise pass. The whole per-view computation is one XLA cluster
(``jit_compile``): the resample is an XLA gather (3x cheaper on CPU than
``ImageProjectiveTransformV3``, which XLA cannot compile) and everything
after it fuses into a single loop over the pixels. The noise is drawn with
XLA's fast threefry generator as an Irwin-Hall sum of four uniform bytes
(``noise_dist="irwin_hall"``: exact mean and standard deviation, support
+-3.46 sd, 4x cheaper than Box-Muller on CPU); ``noise_dist="normal"`` draws
exact Gaussians. ``augment_batch(..., jit=False)`` runs the same maths
without XLA, resampling with ``tf.raw_ops.ImageProjectiveTransformV3``.
The numeric config fields enter the compiled function as one tensor, so
configs that differ only in numbers share one compilation; XLA compiles
once per input shape (about 1.5 CPU-seconds, once per process and once per
``tf.data`` pipeline). It costs about a tenth of the CPU of the stock
Keras-layer stack (figures: docs/benchmarks.md).

:func:`stock_augment_batch` builds the same augmentations from Keras 3 core
layers (``RandomFlip``, ``RandomRotation``, ``GaussianNoise``,
``Solarization``, ``RandomColorJitter``) plus ``tf.image.crop_and_resize``;
it is the baseline of ``scripts/bench_pipeline.py``.

Example:
    >>> import tensorflow as tf
    >>> from histokd.data.augment import augment_batch, TableS1Augment
    >>> x = tf.random.uniform([8, 64, 64, 3])
    >>> y = augment_batch(x, seed=[1, 2])            # one view
    >>> layer = TableS1Augment(seed=0, p_rotate=0.5)  # Keras layer, training only
    >>> y = layer(x, training=True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from histokd.data.augment_config import AugmentConfig
from histokd.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "resolve_config",
    "augment_batch",
    "gaussian_kernels",
    "grayscale_and_blur",
    "apply_augmentation",
    "stock_augment_batch",
    "StockLayers",
    "TableS1Augment",
    "geometry_matrices",
    "colour_affine",
    "apply_colour",
    "resample",
    "projective_resample",
    "sample_uniforms",
    "crop_boxes",
]

# ---------------------------------------------------------------------------
# configuration


def resolve_config(cfg: "AugmentConfig | Mapping | None" = None, **overrides) -> AugmentConfig:
    """Turns ``None`` / a dict / an :class:`AugmentConfig` into an AugmentConfig.

    Args:
        cfg: AugmentConfig | Mapping | None. None gives the Table S1 defaults.
        **overrides: field values replacing those of ``cfg``.

    Returns:
        AugmentConfig.

    Example:
        >>> resolve_config({"p_rotate": 0.5}).p_rotate
        0.5
    """
    if cfg is None:
        cfg = AugmentConfig()
    elif isinstance(cfg, Mapping):
        cfg = AugmentConfig.from_dict(cfg)
    elif not isinstance(cfg, AugmentConfig):
        raise ConfigError(
            f"augmentation config must be a dict or AugmentConfig, got {type(cfg).__name__}"
        )
    if overrides:
        valid = {f.name for f in dataclasses.fields(AugmentConfig)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ConfigError(
                f"unknown augmentation key(s) {unknown}; valid keys: {', '.join(sorted(valid))}"
            )
        cfg = cfg.replace(**overrides)
    return cfg


# ---------------------------------------------------------------------------
# random parameters

# Columns of the per-image uniform draw. One [B, N_UNIFORMS] draw gives every
# scalar parameter; its columns are independent.
_U = dict(
    flip=0, flip_lr=1, flip_ud=2,
    crop=3, crop_area=4, crop_ratio=5, crop_x=6, crop_y=7,
    rot=8, rot_angle=9,
    jitter=10, brightness=11, contrast=12, saturation=13, hue=14,
    solarize=15, noise=16,
)
N_UNIFORMS = len(_U)

# RGB -> YIQ (rows Y, I, Q); the chroma rows sum to zero so grey stays grey.
_YIQ = np.array(
    [
        [0.299, 0.587, 0.114],
        [0.59590059, -0.27455667, -0.32134392],
        [0.2115, -0.52273617, 0.31119955],
    ],
    dtype=np.float64,
)
_YIQ_INV = np.linalg.inv(_YIQ)


def _as_seed(seed) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    return tf.cast(tf.reshape(seed, [2]), tf.int64)


def sample_uniforms(batch_size, seed) -> tf.Tensor:
    """Draws the per-image uniforms that parametrise one view.

    Drawn outside XLA with Philox so that the jit and non-jit paths see the
    same parameters (XLA's stateless generators give different numbers).

    Args:
        batch_size: int | tf.Tensor. Number of images.
        seed: [2] int tensor. Stateless seed.

    Returns:
        float32 [batch_size, N_UNIFORMS] in [0, 1).
    """
    return tf.random.stateless_uniform(
        tf.stack([tf.cast(batch_size, tf.int32), N_UNIFORMS]), seed=_as_seed(seed), alg="philox"
    )


def _gate(u, p):
    return tf.cast(u < p, tf.float32)


def _mat3(rows):
    """Builds [B, 3, 3] from 9 [B] tensors given row by row."""
    return tf.reshape(tf.stack(rows, axis=-1), [-1, 3, 3])


def crop_boxes(u, cfg: AugmentConfig):
    """Samples the random-resized-crop boxes as fractions of the image.

    The area is uniform in ``cfg.crop_scale``; the log aspect ratio is
    uniform in ``log(cfg.crop_ratio)`` intersected with ``[log a, -log a]``
    (``a`` the area), which guarantees that the box fits with exactly area
    ``a`` -- no rejection loop, no clamping.

    Args:
        u: float32 [B, N_UNIFORMS]. From :func:`sample_uniforms`.
        cfg: AugmentConfig.

    Returns:
        (x0, y0, width, height), each float32 [B], fractions of the image.
    """
    crop_on = _gate(u[:, _U["crop"]], cfg.p_crop)
    lo, hi = cfg.crop_scale
    area = lo + (hi - lo) * u[:, _U["crop_area"]]
    area = crop_on * area + (1.0 - crop_on)
    log_area = tf.math.log(area)
    r_lo = tf.maximum(_log(cfg.crop_ratio[0]), log_area)
    r_hi = tf.minimum(_log(cfg.crop_ratio[1]), -log_area)
    ratio = tf.exp(r_lo + (r_hi - r_lo) * u[:, _U["crop_ratio"]])
    cw = tf.minimum(tf.sqrt(area * ratio), 1.0)
    ch = tf.minimum(tf.sqrt(area / ratio), 1.0)
    x0 = (1.0 - cw) * u[:, _U["crop_x"]]
    y0 = (1.0 - ch) * u[:, _U["crop_y"]]
    return x0, y0, cw, ch


def geometry_matrices(u, cfg: AugmentConfig, in_hw, out_hw) -> tf.Tensor:
    """Composes flip, crop-resize and rotation into one matrix per image.

    The matrix maps *output* pixel indices ``(col, row, 1)`` to *input* pixel
    indices (the convention of ``ImageProjectiveTransformV3``). Forward order
    of the operations: flip, crop + resize to ``out_hw``, rotate about the
    output centre.

    Args:
        u: float32 [B, N_UNIFORMS]. From :func:`sample_uniforms`.
        cfg: AugmentConfig.
        in_hw: (int|Tensor, int|Tensor). Input height and width.
        out_hw: (int, int). Output height and width.

    Returns:
        float32 [B, 3, 3].
    """
    h_in = tf.cast(in_hw[0], tf.float32)
    w_in = tf.cast(in_hw[1], tf.float32)
    h_out = float(out_hw[0])
    w_out = float(out_hw[1])
    zero = tf.zeros_like(u[:, 0])
    one = tf.ones_like(zero)

    x0, y0, cw, ch = crop_boxes(u, cfg)

    flip_on = u[:, _U["flip"]] < cfg.p_flip
    flip_lr = tf.cast(flip_on & (u[:, _U["flip_lr"]] < 0.5), tf.float32)
    flip_ud = tf.cast(flip_on & (u[:, _U["flip_ud"]] < 0.5), tf.float32)

    rot_on = _gate(u[:, _U["rot"]], cfg.p_rotate)
    theta = rot_on * (2.0 * u[:, _U["rot_angle"]] - 1.0) * (cfg.max_rotation * math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)

    # output index -> output continuous coordinates (pixel centres at i + 0.5)
    to_cont = _mat3([one, zero, one * 0.5, zero, one, one * 0.5, zero, zero, one])
    # inverse rotation about the output centre
    cx, cy = w_out / 2.0, h_out / 2.0
    rot = _mat3([
        cos, sin, cx - cos * cx - sin * cy,
        -sin, cos, cy + sin * cx - cos * cy,
        zero, zero, one,
    ])
    # output canvas -> crop box in input continuous coordinates
    sx, sy = cw * w_in / w_out, ch * h_in / h_out
    crop = _mat3([sx, zero, x0 * w_in, zero, sy, y0 * h_in, zero, zero, one])
    # flips: x -> W - x
    fx, fy = 1.0 - 2.0 * flip_lr, 1.0 - 2.0 * flip_ud
    flip = _mat3([fx, zero, flip_lr * w_in, zero, fy, flip_ud * h_in, zero, zero, one])
    # input continuous -> input index
    to_idx = _mat3([one, zero, -0.5 * one, zero, one, -0.5 * one, zero, zero, one])
    return to_idx @ flip @ crop @ rot @ to_cont


def colour_affine(u, cfg: AugmentConfig, mean) -> tuple[tf.Tensor, tf.Tensor]:
    """Composes brightness, contrast, saturation and hue into ``y = M x + t``.

    Args:
        u: float32 [B, N_UNIFORMS]. From :func:`sample_uniforms`.
        cfg: AugmentConfig.
        mean: float32 [B, 3]. Per-image, per-channel mean of the image the
            jitter is applied to (the contrast pivot).

    Returns:
        (M [B, 3, 3], t [B, 3]) float32.
    """
    on = _gate(u[:, _U["jitter"]], cfg.p_jitter)

    def factor(col, strength):
        f = 1.0 + strength * (2.0 * u[:, col] - 1.0)
        return tf.maximum(on * f + (1.0 - on), 0.0)

    c = factor(_U["contrast"], cfg.contrast)
    s = factor(_U["saturation"], cfg.saturation)
    # a positive shift turns hue the same way as tf.image.adjust_hue (R -> G -> B)
    angle = -on * cfg.hue * (2.0 * u[:, _U["hue"]] - 1.0) * (2.0 * math.pi)
    zero = tf.zeros_like(c)
    one = tf.ones_like(c)
    cos, sin = s * tf.cos(angle), s * tf.sin(angle)
    chroma = _mat3([one, zero, zero, zero, cos, -sin, zero, sin, cos])
    k = tf.constant(_YIQ_INV, tf.float32)[None] @ chroma @ tf.constant(_YIQ, tf.float32)[None]
    km = tf.squeeze(k @ mean[:, :, None], -1)
    if cfg.brightness_mode == "multiplicative":
        b = factor(_U["brightness"], cfg.brightness)
        m = (c * b)[:, None, None] * k
        t = ((1.0 - c) * b)[:, None] * km
    else:
        delta = on * cfg.brightness * (2.0 * u[:, _U["brightness"]] - 1.0)
        m = c[:, None, None] * k
        t = (1.0 - c)[:, None] * km + delta[:, None]
    return m, t


def apply_colour(x, m, t):
    """Applies per-image ``y = M x + t`` as one elementwise expression.

    Args:
        x: float32 [B, H, W, 3].
        m: float32 [B, 3, 3].
        t: float32 [B, 3].

    Returns:
        float32 [B, H, W, 3] (not clipped).
    """
    m = m[:, None, None]  # [B,1,1,3,3]
    t = t[:, None, None]
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    chans = [m[..., i, 0] * r + m[..., i, 1] * g + m[..., i, 2] * b + t[..., i] for i in range(3)]
    return tf.stack(chans, axis=-1)


# ---------------------------------------------------------------------------
# resampling


def _map_coord(c, size, fill_mode):
    size = tf.cast(size, c.dtype)
    if fill_mode == "reflect":
        # reflect about the outer edge of the border pixels: (d c b a | a b c d | d c b a)
        period = 2.0 * size
        c = tf.math.floormod(c + 0.5, period)
        c = tf.where(c >= size, period - c, c) - 0.5
    return tf.clip_by_value(c, 0.0, size - 1.0)


def resample(images, matrices, out_hw, interpolation="bilinear", fill_mode="reflect"):
    """Samples each image at ``matrices @ (col, row, 1)`` (affine part only).

    A gather-based equivalent of ``tf.raw_ops.ImageProjectiveTransformV3``
    for affine matrices, written so that XLA can compile and fuse it.

    Args:
        images: [B, H, W, C] float32 or uint8.
        matrices: float32 [B, 3, 3]. Output index -> input index.
        out_hw: (int, int). Output size.
        interpolation: str. "bilinear" or "nearest".
        fill_mode: str. "reflect", "nearest" or "constant" (zeros).

    Returns:
        float32 [B, out_h, out_w, C] (same value scale as ``images``).
    """
    shape = tf.shape(images)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    flat = tf.reshape(images, [-1, c])
    cols = tf.range(out_hw[1], dtype=tf.float32)[None, None, :]
    rows = tf.range(out_hw[0], dtype=tf.float32)[None, :, None]
    a = matrices[:, :, :, None, None]
    xs = a[:, 0, 0] * cols + a[:, 0, 1] * rows + a[:, 0, 2]
    ys = a[:, 1, 0] * cols + a[:, 1, 1] * rows + a[:, 1, 2]
    if fill_mode == "constant":
        wf, hf = tf.cast(w, tf.float32), tf.cast(h, tf.float32)
        inside = (xs > -1.0) & (xs < wf) & (ys > -1.0) & (ys < hf)
    xs = _map_coord(xs, w, fill_mode)
    ys = _map_coord(ys, h, fill_mode)
    base = (tf.range(b) * (h * w))[:, None, None]
    if interpolation == "nearest":
        xi = tf.cast(tf.floor(xs + 0.5), tf.int32)
        yi = tf.cast(tf.floor(ys + 0.5), tf.int32)
        out = tf.cast(tf.gather(flat, base + yi * w + xi), tf.float32)
    elif interpolation == "bilinear":
        x0f, y0f = tf.floor(xs), tf.floor(ys)
        fx = (xs - x0f)[..., None]
        fy = (ys - y0f)[..., None]
        x0 = tf.cast(x0f, tf.int32)
        y0 = tf.cast(y0f, tf.int32)
        x1 = tf.minimum(x0 + 1, w - 1)
        y1 = tf.minimum(y0 + 1, h - 1)
        r0 = base + y0 * w
        r1 = base + y1 * w

        def g(idx):
            return tf.cast(tf.gather(flat, idx), tf.float32)

        p00, p01, p10, p11 = g(r0 + x0), g(r0 + x1), g(r1 + x0), g(r1 + x1)
        top = p00 + fx * (p01 - p00)
        bottom = p10 + fx * (p11 - p10)
        out = top + fy * (bottom - top)
    else:
        raise ConfigError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    if fill_mode == "constant":
        out = out * tf.cast(inside, tf.float32)[..., None]
    return out


def projective_resample(images, matrices, out_hw, interpolation="bilinear", fill_mode="reflect"):
    """Reference resampler: one ``tf.raw_ops.ImageProjectiveTransformV3`` call.

    Args:
        images: [B, H, W, C] float32.
        matrices: float32 [B, 3, 3]. Output index -> input index.
        out_hw: (int, int). Output size.
        interpolation: str. "bilinear" or "nearest".
        fill_mode: str. "reflect", "nearest" or "constant".

    Returns:
        float32 [B, out_h, out_w, C].
    """
    flat = tf.reshape(matrices, [-1, 9])
    flat = flat[:, :8] / flat[:, 8:9]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32),
        transforms=flat,
        output_shape=tf.constant(list(out_hw), tf.int32),
        fill_value=tf.constant(0.0, tf.float32),
        interpolation=interpolation.upper(),
        fill_mode=fill_mode.upper(),
    )


# ---------------------------------------------------------------------------
# the fused view augmentation

_IH_MEAN = 4 * 127.5
_IH_STD = math.sqrt(4 * (256.0**2 - 1.0) / 12.0)


def _noise(shape, seed, cfg: AugmentConfig, xla: bool):
    alg = "threefry" if xla else "philox"
    if cfg.noise_dist == "normal":
        return tf.random.stateless_normal(shape, seed=seed, alg=alg)
    bits = tf.random.stateless_uniform(
        shape, seed=seed, minval=None, maxval=None, dtype=tf.uint32, alg=alg
    )
    mask = tf.constant(255, tf.uint32)
    total = bits & mask
    for shift in (8, 16, 24):
        total += tf.bitwise.right_shift(bits, tf.constant(shift, tf.uint32)) & mask
    return (tf.cast(total, tf.float32) - _IH_MEAN) * (1.0 / _IH_STD)


def _log(v):
    return math.log(v) if isinstance(v, (int, float)) else tf.math.log(v)


# Numeric config fields travel into the compiled function as one tensor, so
# configs that differ only in numbers share one trace and one XLA compilation.
_NUMERIC = (
    "p_flip", "p_crop", "crop_scale_lo", "crop_scale_hi", "crop_ratio_lo", "crop_ratio_hi",
    "p_rotate", "max_rotation", "p_noise", "noise_std", "p_solarize", "solarize_threshold",
    "p_jitter", "brightness", "contrast", "saturation", "hue",
)


def _numeric_vector(cfg: AugmentConfig) -> np.ndarray:
    d = dataclasses.asdict(cfg)
    d["crop_scale_lo"], d["crop_scale_hi"] = cfg.crop_scale
    d["crop_ratio_lo"], d["crop_ratio_hi"] = cfg.crop_ratio
    return np.array([d[k] for k in _NUMERIC], np.float32)


class _TensorConfig:
    """AugmentConfig look-alike whose numeric fields are scalar tensors."""

    def __init__(self, vec, static):
        for i, name in enumerate(_NUMERIC):
            setattr(self, name, vec[i])
        self.crop_scale = (self.crop_scale_lo, self.crop_scale_hi)
        self.crop_ratio = (self.crop_ratio_lo, self.crop_ratio_hi)
        self.noise_dist, self.brightness_mode, self.fill_mode = static


def _augment_core(images, u, noise_seed, vec, static, out_hw, interpolation, geometric_only,
                  with_noise, xla):
    cfg = _TensorConfig(vec, static)
    scale = 1.0 / 255.0 if images.dtype == tf.uint8 else 1.0
    shape = tf.shape(images)
    mats = geometry_matrices(u, cfg, (shape[1], shape[2]), out_hw)
    if xla:
        x = resample(images, mats, out_hw, interpolation, cfg.fill_mode)
    else:
        x = projective_resample(images, mats, out_hw, interpolation, cfg.fill_mode)
    if geometric_only:
        return x * scale if scale != 1.0 else x
    mean = tf.reduce_mean(x, axis=[1, 2]) * scale
    m, t = colour_affine(u, cfg, mean)
    x = tf.clip_by_value(apply_colour(x, m * scale, t), 0.0, 1.0)
    sol = (u[:, _U["solarize"]] < cfg.p_solarize)[:, None, None, None]
    x = tf.where(sol & (x >= cfg.solarize_threshold), 1.0 - x, x)
    if with_noise:
        amp = _gate(u[:, _U["noise"]], cfg.p_noise) * cfg.noise_std
        x = tf.clip_by_value(
            x + amp[:, None, None, None] * _noise(tf.shape(x), noise_seed, cfg, xla), 0.0, 1.0
        )
    return x


def _make_core(xla):
    def core(images, u, noise_seed, vec, static, out_hw, interpolation, geometric_only, with_noise):
        return _augment_core(images, u, noise_seed, vec, static, out_hw, interpolation,
                             geometric_only, with_noise, xla)

    return tf.function(core, jit_compile=xla or None, autograph=False, reduce_retracing=True)


_core_xla = _make_core(True)
_core_graph = _make_core(False)


def _static_hw(images, output_size):
    if output_size is not None:
        if isinstance(output_size, int):
            return (int(output_size), int(output_size))
        return (int(output_size[0]), int(output_size[1]))
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        raise ConfigError(
            "augment_batch needs a static image size; pass output_size=(H, W) "
            "or give the dataset a static shape (e.g. resize before batching)"
        )
    return (int(h), int(w))


def apply_augmentation(
    images,
    u,
    noise_seed,
    cfg: "AugmentConfig | Mapping | None" = None,
    output_size: "int | Sequence[int] | None" = None,
    geometric_only: bool = False,
    interpolation: str = "bilinear",
    jit: bool = True,
):
    """Applies the augmentations described by explicit per-image uniforms.

    :func:`augment_batch` draws ``u`` and calls this; use it directly to
    replay or to test exact parameters (column layout: ``augment._U``).

    Args:
        images: [B, H, W, 3] float32 in [0, 1], or uint8.
        u: float32 [B, N_UNIFORMS] in [0, 1). Per-image random numbers.
        noise_seed: [2] int tensor. Seed of the pixel noise.
        cfg: AugmentConfig | Mapping | None.
        output_size: int | (int, int) | None. Output size (default: input size).
        geometric_only: bool. Skip every colour operation.
        interpolation: str. "bilinear" or "nearest".
        jit: bool. XLA gather path (True) or ImageProjectiveTransformV3 (False).

    Returns:
        float32 [B, out_h, out_w, 3] in [0, 1].
    """
    cfg = resolve_config(cfg)
    images = tf.convert_to_tensor(images)
    if images.shape.rank != 4:
        raise ConfigError(f"augmentations expect a batch [B, H, W, C], got shape {images.shape}")
    if images.dtype == tf.uint16:
        images = tf.cast(images, tf.float32) * (1.0 / 65535.0)
    elif images.dtype.is_floating and images.dtype != tf.float32:
        images = tf.cast(images, tf.float32)
    elif images.dtype not in (tf.uint8, tf.float32):
        raise ConfigError(
            f"augmentations take uint8/uint16 or float images in [0, 1], got dtype {images.dtype.name}"
        )
    if interpolation not in ("bilinear", "nearest"):
        raise ConfigError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
    out_hw = _static_hw(images, output_size)
    core = _core_xla if jit else _core_graph
    static = (cfg.noise_dist, cfg.brightness_mode, cfg.fill_mode)
    with_noise = cfg.p_noise > 0 and cfg.noise_std > 0
    return core(
        images, tf.cast(u, tf.float32), _as_seed(noise_seed), tf.constant(_numeric_vector(cfg)),
        static, out_hw, interpolation, bool(geometric_only), bool(with_noise),
    )


def augment_batch(
    images,
    seed,
    cfg: "AugmentConfig | Mapping | None" = None,
    output_size: "int | Sequence[int] | None" = None,
    geometric_only: bool = False,
    interpolation: str = "bilinear",
    jit: bool = True,
):
    """Applies the Table S1 augmentations to a batch, independently per image.

    *More From Less*, Supplementary Table S1. Fused: one resample for all
    geometry and one elementwise pass for all colour operations, compiled
    as one XLA cluster. Deterministic given ``seed``; draw a new seed per
    batch and per view (e.g. ``tf.random.experimental.stateless_split``).

    Args:
        images: [B, H, W, 3] float32 in [0, 1], or uint8 (scaled by 1/255).
        seed: [2] int tensor or pair of ints. Stateless seed.
        cfg: AugmentConfig | Mapping | None. Strengths and probabilities.
        output_size: int | (int, int) | None. Output size; defaults to the
            input size. A larger size upsamples as part of the same resample
            (used to fuse "resize back" of a downsampled view).
        geometric_only: bool. Skip every colour operation (nuclear masks).
        interpolation: str. "bilinear", or "nearest" for label-like images.
        jit: bool. XLA-compiled gather resampler (fast); False uses
            ``ImageProjectiveTransformV3`` without XLA (same parameters,
            different noise draws).

    Returns:
        float32 [B, out_h, out_w, 3] in [0, 1].

    Example:
        >>> x = tf.random.uniform([4, 32, 32, 3])
        >>> y = augment_batch(x, [0, 1], {"p_rotate": 1.0})
        >>> y.shape
        TensorShape([4, 32, 32, 3])
    """
    images = tf.convert_to_tensor(images)
    seeds = tf.random.experimental.stateless_split(_as_seed(seed), 2)
    if images.shape.rank != 4:
        raise ConfigError(f"augment_batch expects a batch [B, H, W, C], got shape {images.shape}")
    u = sample_uniforms(tf.shape(images)[0], seeds[0])
    out = apply_augmentation(
        images, u, seeds[1], cfg, output_size, geometric_only, interpolation, jit
    )
    if geometric_only:
        return out
    # drawn from a seed of their own, so turning them on leaves every other draw unchanged
    return grayscale_and_blur(out, tf.random.experimental.stateless_fold_in(_as_seed(seed), 0x6B1), cfg)


def _luma(x):
    return tf.reduce_sum(x * tf.constant([0.299, 0.587, 0.114], x.dtype), axis=-1, keepdims=True)


def gaussian_kernels(sigma, radius: int):
    """Normalised 1-D Gaussian kernels ``[B, 2·radius + 1]``, one per ``sigma`` ``[B]``."""
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    k = tf.exp(-0.5 * tf.square(x[None, :] / tf.cast(sigma, tf.float32)[:, None]))
    return k / tf.reduce_sum(k, axis=1, keepdims=True)


def _blur_axis(x, kernels, radius: int, axis: int):
    """Convolve ``x`` [B, H, W, C] along ``axis`` (1 or 2) with each image's kernel, reflect-padded."""
    pad = [[0, 0], [0, 0], [0, 0], [0, 0]]
    pad[axis] = [radius, radius]
    xp = tf.pad(x, pad, mode="REFLECT")
    n = tf.shape(x)[axis]
    out = tf.zeros_like(x)
    for i in range(2 * radius + 1):  # a handful of taps: shifted copies, weighted per image
        part = xp[:, i:i + n] if axis == 1 else xp[:, :, i:i + n]
        out += kernels[:, i][:, None, None, None] * part
    return out


def grayscale_and_blur(images, seed, cfg=None):
    """BYOL / MoBY's random grayscale and Gaussian blur, independently per image.

    Grill et al. 2020 (BYOL), Appendix B, as used by MoBY (Xie et al. 2021): with probability
    ``p_grayscale`` a view becomes its luma (0.299 R + 0.587 G + 0.114 B) in all three
    channels; then with probability ``p_blur`` it is blurred by a Gaussian of standard
    deviation uniform in ``blur_sigma`` (pixels), separably, reflect-padded, the kernel
    reaching 3 σ_max. Both run after the fused colour pass (so after solarisation, where BYOL
    solarises last); with both probabilities 0 (the More From Less recipe) it returns
    ``images`` unchanged and adds no op.

    Args:
        images: float32 [B, H, W, 3] in [0, 1].
        seed: [2] int tensor. Stateless seed.
        cfg: AugmentConfig | Mapping | None.

    Returns:
        float32 [B, H, W, 3].
    """
    cfg = resolve_config(cfg)
    if cfg.p_grayscale <= 0 and cfg.p_blur <= 0:
        return images
    images = tf.convert_to_tensor(images, tf.float32)
    u = tf.random.stateless_uniform([tf.shape(images)[0], 3], _as_seed(seed))
    if cfg.p_grayscale > 0:
        grey = tf.repeat(_luma(images), 3, axis=-1)
        images = tf.where((u[:, 0] < cfg.p_grayscale)[:, None, None, None], grey, images)
    if cfg.p_blur > 0:
        lo, hi = (float(v) for v in cfg.blur_sigma)
        radius = max(1, int(np.ceil(3.0 * hi)))
        h, w = images.shape[1], images.shape[2]
        if h is not None and w is not None:
            radius = min(radius, int(h) - 1, int(w) - 1)  # reflect padding needs pad < side
        sigma = lo + (hi - lo) * u[:, 2]
        kernels = gaussian_kernels(sigma, radius)
        identity = tf.one_hot(tf.fill(tf.shape(sigma), radius), 2 * radius + 1)
        kernels = tf.where((u[:, 1] < cfg.p_blur)[:, None], kernels, identity)
        images = _blur_axis(_blur_axis(images, kernels, radius, 1), kernels, radius, 2)
    return images


# ---------------------------------------------------------------------------
# stock Keras-layer implementation (benchmark baseline / reference)


def _masked(flags, augmented, original):
    return tf.where(flags[:, None, None, None], augmented, original)


class StockLayers:
    """The Keras 3 core layers of the stock pipeline (built once per config)."""

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg
        self.flip = keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)
        self.rotate = keras.layers.RandomRotation(
            factor=cfg.max_rotation / 360.0, fill_mode=cfg.fill_mode, seed=seed + 1
        )
        self.noise = keras.layers.GaussianNoise(cfg.noise_std, seed=seed + 2)
        self.solarize = keras.layers.Solarization(
            addition_factor=0.0,
            threshold_factor=(cfg.solarize_threshold, cfg.solarize_threshold),
            value_range=(0, 1),
            seed=seed + 3,
        )
        # Keras' saturation factor f maps to the multiplier f / (1 - f);
        # its hue factor f shifts by +-f/2 turns; brightness is additive.
        s_lo, s_hi = max(1.0 - cfg.saturation, 0.0), 1.0 + cfg.saturation
        self.jitter = keras.layers.RandomColorJitter(
            value_range=(0, 1),
            brightness_factor=cfg.brightness if cfg.brightness > 0 else None,
            contrast_factor=cfg.contrast if cfg.contrast > 0 else None,
            saturation_factor=(s_lo / (1 + s_lo), s_hi / (1 + s_hi)) if cfg.saturation > 0 else None,
            hue_factor=2.0 * cfg.hue if cfg.hue > 0 else None,
            seed=seed + 4,
        )


_STOCK_CACHE: dict = {}


@tf.autograph.experimental.do_not_convert
def stock_augment_batch(images, seed, cfg: "AugmentConfig | Mapping | None" = None, layers=None):
    """Table S1 augmentations from Keras 3 core layers (unfused baseline).

    Per-image probabilities are applied by running each layer on the whole
    batch and selecting per image, which is how one gets Table S1's
    probabilities out of Keras' always-on layers. The crop is our own
    random-resized-crop through ``tf.image.crop_and_resize`` with the same
    box distribution as :func:`augment_batch`. Randomness comes from the
    layers' own seed generators, so only the crop and gates follow ``seed``.

    Args:
        images: [B, H, W, 3] float32 in [0, 1] or uint8.
        seed: [2] int tensor. Seed of the crop boxes and per-image gates.
        cfg: AugmentConfig | Mapping | None.
        layers: StockLayers | None. Reused layer objects (built once per config if None;
            build them outside ``tf.data``/``tf.function`` code).

    Returns:
        float32 [B, H, W, 3] in [0, 1].
    """
    cfg = resolve_config(cfg)
    if layers is None:
        key = cfg
        if key not in _STOCK_CACHE:
            _STOCK_CACHE[key] = StockLayers(cfg)
        layers = _STOCK_CACHE[key]
    x = tf.convert_to_tensor(images)
    if x.dtype == tf.uint8:
        x = tf.cast(x, tf.float32) / 255.0
    b = tf.shape(x)[0]
    h, w = _static_hw(x, None)
    u = sample_uniforms(b, seed)
    on = lambda col, p: u[:, _U[col]] < p  # noqa: E731
    if cfg.p_flip > 0:
        x = _masked(on("flip", cfg.p_flip), layers.flip(x, training=True), x)
    # random-resized-crop with the fused path's box distribution; crop_and_resize
    # puts the first/last samples on the box corners, so place them at the
    # centres of the first/last output pixels (half-pixel resize convention)
    x0, y0, cw, ch = crop_boxes(u, cfg)
    ys = [(y0 * h + e * ch - 0.5) / (h - 1) for e in (0.5, h - 0.5)]
    xs = [(x0 * w + e * cw - 0.5) / (w - 1) for e in (0.5, w - 0.5)]
    boxes = tf.clip_by_value(tf.stack([ys[0], xs[0], ys[1], xs[1]], axis=1), 0.0, 1.0)
    x = tf.image.crop_and_resize(x, boxes, tf.range(b), [h, w])
    if cfg.p_rotate > 0:
        x = _masked(on("rot", cfg.p_rotate), layers.rotate(x, training=True), x)
    if cfg.p_jitter > 0:
        x = _masked(on("jitter", cfg.p_jitter), layers.jitter(x, training=True), x)
    if cfg.p_solarize > 0:
        x = _masked(on("solarize", cfg.p_solarize), layers.solarize(x, training=True), x)
    if cfg.p_noise > 0:
        x = _masked(on("noise", cfg.p_noise), layers.noise(x, training=True), x)
    return tf.clip_by_value(x, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Keras layer

_CFG_FIELDS = tuple(f.name for f in dataclasses.fields(AugmentConfig))


def replica_seed(seed):
    """Folds the replica id into a seed so replicas draw different augmentations."""
    seed = _as_seed(seed)
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return seed
    rid = tf.cast(ctx.replica_id_in_sync_group, tf.int64)
    return tf.random.experimental.stateless_fold_in(seed, rid)


@keras.saving.register_keras_serializable(package="histokd")
class TableS1Augment(keras.layers.Layer):
    """Keras layer applying the fused Table S1 augmentations (training only).

    *More From Less*, Supplementary Table S1. At inference (``training``
    false or None) the layer is the identity apart from converting uint8 to
    float32 [0, 1] and, if ``output_size`` is set, resizing bilinearly.
    Each call draws a fresh seed from the layer's ``SeedGenerator``; under a
    distribution strategy the replica id is folded in.

    Args:
        augment: AugmentConfig | dict | None. Probabilities and strengths;
            keyword arguments named like AugmentConfig fields override it.
        seed: int | None. Seed of the layer's seed generator.
        output_size: int | (int, int) | None. Output size (default: input size).
        geometric_only: bool. Only flips, crop and rotation (for masks).
        interpolation: str. "bilinear" or "nearest".
        **kwargs: AugmentConfig fields, then standard Layer arguments.

    Example:
        >>> layer = TableS1Augment(seed=1, p_noise=0.5)
        >>> y = layer(tf.random.uniform([2, 32, 32, 3]), training=True)
    """

    def __init__(
        self,
        augment=None,
        seed=None,
        output_size=None,
        geometric_only=False,
        interpolation="bilinear",
        **kwargs,
    ):
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in _CFG_FIELDS}
        super().__init__(**kwargs)
        self.augment_config = resolve_config(augment, **overrides)
        self.seed = seed
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.output_size = tuple(int(v) for v in output_size) if output_size is not None else None
        self.geometric_only = bool(geometric_only)
        if interpolation not in ("bilinear", "nearest"):
            raise ConfigError(f"interpolation must be 'bilinear' or 'nearest', got {interpolation!r}")
        self.interpolation = interpolation
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = False

    def call(self, inputs, training=None):
        x = tf.convert_to_tensor(inputs)
        if training:
            seed = replica_seed(self.seed_generator.next())
            return augment_batch(
                x,
                seed,
                self.augment_config,
                output_size=self.output_size,
                geometric_only=self.geometric_only,
                interpolation=self.interpolation,
            )
        if x.dtype == tf.uint8:
            x = tf.cast(x, tf.float32) / 255.0
        else:
            x = tf.cast(x, tf.float32)
        if self.output_size is not None and tuple(x.shape[1:3]) != self.output_size:
            method = "bilinear" if self.interpolation == "bilinear" else "nearest"
            x = tf.image.resize(x, self.output_size, method=method)
        return x

    def compute_output_shape(self, input_shape):
        if self.output_size is None:
            return tuple(input_shape)
        return (input_shape[0], *self.output_size, input_shape[-1])

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(
            augment=self.augment_config.to_dict(),
            seed=self.seed,
            output_size=list(self.output_size) if self.output_size is not None else None,
            geometric_only=self.geometric_only,
            interpolation=self.interpolation,
        )
        return config
