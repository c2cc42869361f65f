"""Multi-scale crops for self-supervised pre-training: random resized crop + 2× magnification.

Meng Li, "Transformer-Based Self-Supervised Learning and Distillation for Medical
Image Classification", §III-A and §V: pre-training applies "random cropping and 2x
magnification" so that the model sees tumours and tissue at several scales. Here
each image of a batch independently gets, with probability ``magnify_prob``, a
**magnified** crop — a square window of ``1/magnification`` of the field of view per
side (half the side at 2×) at a uniformly random position, resized to the output
size, i.e. the same tissue seen at twice the magnification — and otherwise an
ordinary **random resized crop** (area uniform in ``scale`` of the image, aspect
ratio log-uniform in ``ratio``; the ratio range is intersected with ``[area, 1/area]``
so the window always fits with exactly the drawn area, no rejection loop).

Everything is batched and in-graph: one ``tf.image.crop_and_resize`` (bilinear) per
batch, usable inside ``tf.data.Dataset.map`` after ``batch``.

The registered view kind ``multiscale`` (:class:`MultiscaleViews`, MoBY pre-training)
makes two such views per batch and, with ``views.augment: true``, applies the run's
``augment.*`` augmentation (:func:`histokd.data.augment.augment_batch`) to each view
after its crop, with independent draws per view: MoBY (Xie et al. 2021,
"Self-Supervised Learning with Swin Transformers") follows BYOL's recipe of colour
jitter, grey scale, blur and solarisation after the crop. With ``views.augment: false``
the views are exactly the crops.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from histokd.data.augment import augment_batch, resolve_config
from histokd.data.views.base import SeededViewMaker, ViewKind, _augment_dict
from histokd.errors import ConfigError
from histokd.registry import VIEWS


def _check(scale, ratio, magnify_prob, magnification):
    lo, hi = float(scale[0]), float(scale[1])
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {tuple(scale)}")
    if not 0.0 < float(ratio[0]) <= float(ratio[1]):
        raise ConfigError(f"crop ratio must satisfy 0 < lo <= hi, got {tuple(ratio)}")
    if not 0.0 <= float(magnify_prob) <= 1.0:
        raise ConfigError(f"magnify_prob must be in [0, 1], got {magnify_prob}")
    if float(magnification) < 1.0:
        raise ConfigError(f"magnification must be >= 1 (2 = half the field of view), got {magnification}")


def _seeds(seed, n):
    """``n`` seeds derived from ``seed``.

    None → unseeded draws; a Python int → op-level seeds of stateful draws (a fresh,
    reproducible draw on every execution, also inside ``tf.data`` maps); a tensor
    [2] (or [1]) → stateless seeds, the same draw for the same seed.
    """
    if seed is None:
        return [None] * n
    if isinstance(seed, int):
        return [int(seed) * 8 + k for k in range(n)]
    base = tf.reshape(tf.cast(tf.convert_to_tensor(seed), tf.int64), [-1])
    return [tf.stack([base[0], base[-1] * 16 + k]) for k in range(n)]


def _uniform(shape, lo, hi, seed):
    if seed is None or isinstance(seed, int):
        return tf.random.uniform(shape, lo, hi, seed=seed)
    return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)


def sample_multiscale_boxes(batch_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5,
                            magnification=2.0, aspect=1.0, seed=None):
    """Crop windows for a batch, in ``tf.image.crop_and_resize`` normalised coordinates.

    Args:
        batch_size: int or scalar tensor. B.
        scale: (lo, hi). Area fraction of ordinary crops.
        ratio: (lo, hi). Width/height ratio (in pixels) of ordinary crops, log-uniform.
        magnify_prob: float. Probability that an image gets a magnified crop instead.
        magnification: float. Magnified crops span 1/magnification of each side.
        aspect: float. Image width / height (1 for square tiles).
        seed: None, int (op-level seed: reproducible sequence of draws) or [2] int tensor
            (stateless: the same draw for the same seed).

    Returns:
        ``(boxes, magnified)``: float32 [B, 4] as (y1, x1, y2, x2) in [0, 1] and bool [B].

    Example:
        >>> boxes, mag = sample_multiscale_boxes(8, magnify_prob=0.5, seed=1)
    """
    _check(scale, ratio, magnify_prob, magnification)
    s_area, s_ratio, s_y, s_x, s_mag = _seeds(seed, 5)
    b = batch_size
    area = _uniform([b], float(scale[0]), float(scale[1]), s_area)
    # log-ratio range intersected with [log area, -log area]: the window then fits exactly
    log_lo = tf.maximum(math.log(float(ratio[0])), tf.math.log(area))
    log_hi = tf.minimum(math.log(float(ratio[1])), -tf.math.log(area))
    log_hi = tf.maximum(log_hi, log_lo)
    u = _uniform([b], 0.0, 1.0, s_ratio)
    r = tf.exp(log_lo + u * (log_hi - log_lo))
    # r is the pixel aspect (w/h); in normalised coordinates w·h = area and (w·W)/(h·H) = r
    w = tf.minimum(tf.sqrt(area * r / aspect), 1.0)
    h = tf.minimum(tf.sqrt(area / r * aspect), 1.0)
    side = 1.0 / float(magnification)
    magnified = _uniform([b], 0.0, 1.0, s_mag) < float(magnify_prob)
    h = tf.where(magnified, side, h)
    w = tf.where(magnified, side, w)
    y1 = _uniform([b], 0.0, 1.0, s_y) * (1.0 - h)
    x1 = _uniform([b], 0.0, 1.0, s_x) * (1.0 - w)
    boxes = tf.stack([y1, x1, y1 + h, x1 + w], axis=1)
    return boxes, magnified


def _to_float(images):
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def _hw(images):
    s = tf.shape(images)
    return s[1], s[2]


def multiscale_crop(images, size=None, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5,
                    magnification=2.0, seed=None, return_boxes=False):
    """Random resized crop or 2× magnified crop, per image, resized to ``size``.

    Args:
        images: tensor [B, H, W, C], uint8 (scaled to [0, 1]) or float in [0, 1].
        size: int, (h, w) or None. Output size (default: the input size).
        scale, ratio, magnify_prob, magnification, seed: see :func:`sample_multiscale_boxes`.
        return_boxes: bool. Also return ``(boxes, magnified)``.

    Returns:
        float32 [B, h, w, C] (and the boxes when asked).

    Example:
        >>> views = multiscale_crop(tf.random.uniform([8, 64, 64, 3]), magnify_prob=0.5, seed=3)
    """
    images = _to_float(images)
    if images.shape.rank != 4:
        raise ConfigError(f"multiscale_crop expects a batch [B, H, W, C]; got shape {images.shape}")
    if size is None:
        h, w = images.shape[1], images.shape[2]
        if h is None or w is None:
            raise ConfigError("multiscale_crop needs size= when the image size is not static")
        size = (int(h), int(w))
    elif isinstance(size, int):
        size = (size, size)
    H, W = images.shape[1], images.shape[2]
    aspect = (W / H) if (H and W) else 1.0
    b = tf.shape(images)[0]
    boxes, magnified = sample_multiscale_boxes(b, scale, ratio, magnify_prob, magnification, aspect, seed)
    out = tf.image.crop_and_resize(images, boxes, tf.range(b), crop_size=tuple(int(s) for s in size),
                                   method="bilinear")
    out = tf.clip_by_value(out, 0.0, 1.0)
    return (out, (boxes, magnified)) if return_boxes else out


@keras.saving.register_keras_serializable(package="histokd")
class MultiScaleCrop(keras.layers.Layer):
    """Keras layer form of :func:`multiscale_crop` (identity resize when not training).

    TensorFlow-only (it runs ``tf.image.crop_and_resize``); meant for tf.data
    pipelines and view makers.

    Args:
        size: int or (h, w) or None. Output size (None: input size).
        scale: (lo, hi). Area fraction of random resized crops (default 0.2–1).
        ratio: (lo, hi). Aspect-ratio range (default 3/4–4/3).
        magnify_prob: float. Probability of a 2× magnified crop per image (default 0.5).
        magnification: float. 2 = half the field of view.
        seed: int or None. Op-level seed: each batch gets fresh windows, reproducibly.

    Example:
        >>> crop = MultiScaleCrop(224, magnify_prob=0.5, seed=0)
        >>> views = crop(images, training=True)
    """

    def __init__(self, size=None, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5, magnification=2.0,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        _check(scale, ratio, magnify_prob, magnification)
        self.size = None if size is None else ((int(size), int(size)) if isinstance(size, int) else
                                                tuple(int(s) for s in size))
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.magnify_prob = float(magnify_prob)
        self.magnification = float(magnification)
        self.seed = None if seed is None else int(seed)

    def call(self, images, training=True):
        if not training:
            x = _to_float(images)
            return x if self.size is None else tf.image.resize(x, self.size, method="bilinear")
        # an int seed seeds stateful draws: fresh windows on every batch, reproducible run to run
        return multiscale_crop(images, self.size, self.scale, self.ratio, self.magnify_prob, self.magnification,
                               seed=self.seed)

    def compute_output_shape(self, input_shape):
        if self.size is None:
            return tuple(input_shape)
        return (input_shape[0],) + self.size + (input_shape[-1],)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(size=None if self.size is None else list(self.size), scale=list(self.scale),
                   ratio=list(self.ratio), magnify_prob=self.magnify_prob, magnification=self.magnification,
                   seed=self.seed)
        return cfg


def multiscale_pair(images, size=None, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5,
                    magnification=2.0, seed=None):
    """Two independent multi-scale views of a batch, as MoBY pre-training reads them.

    Args:
        images: tensor [B, H, W, C], uint8 or float in [0, 1].
        size, scale, ratio, magnify_prob, magnification: see :func:`multiscale_crop`.
        seed: None, int or [2] int tensor (e.g. from ``tf.data``'s element index).

    Returns:
        dict ``{"view_a": [B, h, w, C], "view_b": [B, h, w, C]}`` float32 in [0, 1].

    Example:
        >>> ds = ds.batch(32).map(lambda x, y: (multiscale_pair(x, 224), y))
    """
    if seed is None:
        sa = sb = None
    elif isinstance(seed, int):
        sa, sb = 2 * seed, 2 * seed + 1
    else:
        base = tf.cast(tf.reshape(tf.convert_to_tensor(seed), [-1]), tf.int64)
        sa = tf.stack([base[0], 2 * base[-1]])
        sb = tf.stack([base[0], 2 * base[-1] + 1])
    kw = dict(size=size, scale=scale, ratio=ratio, magnify_prob=magnify_prob, magnification=magnification)
    return {"view_a": multiscale_crop(images, seed=sa, **kw), "view_b": multiscale_crop(images, seed=sb, **kw)}


def make_multiscale_views(size=None, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5, magnification=2.0):
    """View-maker factory: a callable ``images → {"view_a", "view_b"}`` of multi-scale crops.

    Example:
        >>> make = VIEWS.get("multiscale").make
        >>> views = make(size=224, magnify_prob=0.5)(images)
    """
    _check(scale, ratio, magnify_prob, magnification)

    def view_maker(images, seed=None):
        return multiscale_pair(images, size, scale, ratio, magnify_prob, magnification, seed=seed)

    return view_maker


class MultiscaleViewMaker(SeededViewMaker):
    """MoBY's view maker: two multi-scale crops, each then augmented (optional).

    ``vm(images, labels)`` returns ``({"view_a", "view_b"}, labels)``. Every batch's
    views are a function of one stateless seed, split between the crops and the two
    views' augmentations (so switching the augmentation on leaves the crops untouched);
    :meth:`map` draws those seeds from a seeded ``tf.data.Dataset.random``, so a run is
    reproducible even under a parallel map.

    Args:
        size: int. Output size of every view.
        scale, ratio, magnify_prob, magnification: see :func:`sample_multiscale_boxes`.
        seed: int. Seed of the crops and of the augmentation's generator.
        aug_cfg: AugmentConfig | dict | None. The augmentation after the crop; None: none.

    Example:
        >>> vm = MultiscaleViewMaker(64, seed=0, aug_cfg={"p_crop": 0.0})
        >>> views, y = vm(tf.zeros([4, 64, 64, 3], tf.uint8), tf.zeros([4]))
    """

    def __init__(self, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5, magnification=2.0,
                 seed=0, aug_cfg=None):
        self._crops = make_multiscale_views(size=size, scale=scale, ratio=ratio, magnify_prob=magnify_prob,
                                            magnification=magnification)
        self.size = size
        self.seed = int(seed)
        self.cfg = None if aug_cfg is None else resolve_config(aug_cfg)
        self._generator = None

    def __call__(self, images, labels=None, seed=None):
        """Views of one batch; ``seed`` ([2] int tensor) makes them a function of the seed
        (:meth:`map` gives every batch its own), else a seed is drawn from the generator."""
        if seed is None:
            seed = self._draw_seed()
        crop_seed, sa, sb = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3))
        views = self._crops(images, seed=crop_seed)
        if self.cfg is not None:
            views = {"view_a": augment_batch(views["view_a"], sa, self.cfg),
                     "view_b": augment_batch(views["view_b"], sb, self.cfg)}
        return views if labels is None else (views, labels)

    def map(self, dataset, num_parallel_calls=tf.data.AUTOTUNE, deterministic=None):
        """Maps the view maker over a batched ``(images, labels)`` dataset, pairing every batch
        with a seed from a seeded ``tf.data.Dataset.random`` (reproducible under parallel maps)."""
        return self._map_with_seeds(dataset, lambda el, s: self(el[0], el[1], seed=s), num_parallel_calls,
                                    deterministic)


@VIEWS.register("multiscale")
class MultiscaleViews(ViewKind):
    """Two multi-scale crops (random resized or 2x magnified), then ``augment.*`` per view.

    Swin V2 paper §III-A ("random cropping and 2x magnification") with MoBY's
    augmentation after the crop (Xie et al. 2021). Made on the host only.
    """

    name = "multiscale"
    supports_device_augment = False

    @classmethod
    def make(cls, size=None, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.5, magnification=2.0):
        """The crop pair alone: a callable ``images -> {"view_a", "view_b"}`` (see :func:`make_multiscale_views`)."""
        return make_multiscale_views(size, scale, ratio, magnify_prob, magnification)

    @classmethod
    def from_run_config(cls, cfg, training: bool = True):
        """Crops of ``views.crop_scale`` / ``views.magnify_prob`` / ``views.magnification``, augmented
        by ``augment.*`` when ``views.augment`` and ``training``."""
        aug = _augment_dict(cfg) if cfg.views.augment and training else None
        return MultiscaleViewMaker(cfg.data.image_size, scale=tuple(cfg.views.crop_scale),
                                   magnify_prob=cfg.views.magnify_prob, magnification=cfg.views.magnification,
                                   seed=cfg.train.seed, aug_cfg=aug)

    @classmethod
    def branch_inputs(cls, cfg):
        return {"a": "full", "b": "full"}

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        if cfg.data.source == "mask_pairs":
            raise ConfigError("views.kind=multiscale is not available on mask_pairs data; use mask, "
                              "mask_symmetric, asymmetric, symmetric or identity")
        if cfg.views.augment_on == "device":
            raise ConfigError("views.kind=multiscale makes its views on the host: views.augment_on=device is not "
                              "supported; use views.augment_on=host")
