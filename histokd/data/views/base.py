"""Batched, in-graph view makers for the joint-embedding methods, and the view-kind base.

*More From Less*, Section 2.1: "the first image in an asymmetric pair might
always be a lower resolution than the second image, while in a symmetric
pair, both images would be the same resolution"; downsampled images "are
always resized to 224 x 224 px using linear interpolation"; "all images are
then subject to random augmentations" (Table S1). Tissue-nuclei distillation
pairs the nuclear-type mask with its image.

A view maker turns a *batch* of uint8 images into a dict of float32 [0, 1]
views, after ``dataset.batch``:

============  ===============================================================
kind          views
============  ===============================================================
asymmetric    ``view_a`` = augment(downsample(x, r)), ``view_b`` = augment(x)
symmetric     ``view_a``, ``view_b`` = two independent augment(downsample(x, r))
identity      ``image`` = augment(downsample(x, r)) (supervised baseline)
mask          ``view_a`` = geometric augment(mask), ``view_b`` = augment(image)
              (asymmetric image <-> mask pairs, Table 2)
mask_symmetric ``view_a``, ``view_b`` = two independent geometric augment(mask)
              (symmetric mask <-> mask pairs, Table 2)
eval          ``image`` = downsample(x, r) (no augmentation; feature extraction)
============  ===============================================================

Batches of a mask-pair source (:class:`histokd.data.sources.MaskPairSource`) are
dicts ``{"image", "mask"}`` (or ``{"mask"}`` with ``data.input: mask``). The image
kinds (asymmetric, symmetric, identity, eval) read ``x["image"]``; ``identity`` and
``eval`` on a mask-only dict read the mask and, like every mask view, augment it
geometrically only (supervised training on masks, Table 2).

As in the paper, downsampling comes *first* and the augmentations are
applied to the degraded image at the working size. The two views of a pair
get independent augmentation draws. Masks get flips, crop and rotation only
(no colour operations, nearest-neighbour sampling so the type colours stay
exact), drawn independently of the image's geometry because the paper
treats mask and image as two branches exactly like two views.

**Downsampling.** ``resize(x, r)`` with ``antialias=True`` (a triangle
filter as wide as the scale factor), then bilinear back to the working size.
The antialiased down-step integrates over the pixels that fall into each
low-resolution pixel, as a real low-magnification scan does; a plain
bilinear down-step (``antialias=False``) would only look at 4 of the
32 x 32 pixels behind each 7 px output pixel and produce aliasing noise
rather than lower magnification. ``Downsample(r, antialias=False)`` gives
TensorFlow's default behaviour if you need it. The down-step is computed as
two small matrix products (:func:`separable_resize`), numerically equal to
``tf.image.resize(..., antialias=True)`` but, unlike it, compilable by XLA,
so the view maker and ``Downsample`` also work inside a ``jit_compile``
training step or exported model.

In the fused augmented path the "resize back" and the augmentation's
resample are one operation: the augmentation samples the r x r image
directly at the working size (bilinear), which equals resize-then-augment
except that the image is interpolated once instead of twice.

Example:
    >>> vm = make_view_maker("asymmetric", image_size=224, downsample=7, seed=0)
    >>> ds = ds.batch(32, drop_remainder=True)
    >>> ds = vm.map(ds)                   # deterministic, one seed per batch
    >>> # or: ds.map(vm, num_parallel_calls=tf.data.AUTOTUNE)
"""

from __future__ import annotations

import functools
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf

from histokd.data.augment import (
    AugmentConfig,
    augment_batch,
    replica_seed,
    resolve_config,
)
from histokd.errors import ConfigError, DataError

__all__ = [
    "ViewKind",
    "KINDS",
    "MASK_KINDS",
    "Downsample",
    "ViewMaker",
    "ViewMakerLayer",
    "make_view_maker",
    "make_views",
    "downsample_batch",
    "separable_resize",
    "resize_matrix",
]

KINDS = ("asymmetric", "symmetric", "identity", "mask", "mask_symmetric", "eval")
#: Kinds whose views are made from nuclear-type masks (no downsampling, geometric augmentation only).
MASK_KINDS = ("mask", "mask_symmetric")


def _to_float(images):
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) * (1.0 / 255.0)
    if images.dtype == tf.uint16:
        return tf.cast(images, tf.float32) * (1.0 / 65535.0)
    return tf.cast(images, tf.float32)


def _hw(images):
    h, w = images.shape[1], images.shape[2]
    dyn = tf.shape(images)
    return (h if h is not None else dyn[1], w if w is not None else dyn[2])


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, antialias: bool = True) -> np.ndarray:
    """1-D linear-interpolation weights, [n_out, n_in], as ``tf.image.resize``.

    Reproduces TensorFlow's bilinear resize with half-pixel centres and, when
    ``antialias`` and downsampling, its triangle filter widened by the scale
    factor (``ScaleAndTranslate``); weights falling outside the image are
    dropped and the rest renormalised (= edge clamping).

    Args:
        n_in: int. Input length.
        n_out: int. Output length.
        antialias: bool. Widen the kernel when downsampling.

    Returns:
        float32 numpy array [n_out, n_in] whose rows sum to 1.
    """
    scale = n_out / n_in
    width = max(1.0 / scale, 1.0) if antialias else 1.0
    centre = (np.arange(n_out)[:, None] + 0.5) / scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] + 0.5 - centre) / width)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def separable_resize(images, size, antialias: bool = True):
    """Resizes float images with two small matrix products (XLA-compatible).

    Numerically equal to ``tf.image.resize(images, size, "bilinear",
    antialias=antialias)`` (to ~1e-6), but built from ``einsum`` so that it
    also compiles under XLA, where ``ScaleAndTranslate`` (TF's antialiased
    resize) has no kernel. Needs a static input size.

    Args:
        images: float32 [B, H, W, C].
        size: (int, int). Output height and width.
        antialias: bool. Antialias when downsampling.

    Returns:
        float32 [B, size[0], size[1], C].
    """
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        return tf.image.resize(images, size, method="bilinear", antialias=antialias)
    wh = tf.constant(resize_matrix(int(h), int(size[0]), bool(antialias)))
    ww = tf.constant(resize_matrix(int(w), int(size[1]), bool(antialias)))
    x = tf.einsum("oh,bhwc->bowc", wh, images)
    return tf.einsum("pw,bowc->bopc", ww, x)


def downsample_batch(images, size: int | None, output_size=None, antialias: bool = True):
    """Downsamples a batch to ``size`` x ``size`` and resizes it back (bilinear).

    Args:
        images: [B, H, W, C] float32 [0, 1] or uint8 (scaled by 1/255).
        size: int | None. Low resolution r; None or r >= H and W is the identity.
        output_size: (int, int) | None. Size to resize back to (default H, W).
        antialias: bool. Antialias the down-step (see module docstring).

    Returns:
        float32 [B, out_h, out_w, C].

    Example:
        >>> downsample_batch(tf.zeros([2, 224, 224, 3]), 7).shape
        TensorShape([2, 224, 224, 3])
    """
    x = _to_float(images)
    h, w = _hw(x)
    out = tuple(output_size) if output_size is not None else (h, w)
    if size is not None and not (isinstance(h, int) and isinstance(w, int) and size >= h and size >= w):
        x = separable_resize(x, (size, size), antialias=antialias)
    if tuple(x.shape[1:3]) != tuple(out):
        x = tf.image.resize(x, out, method="bilinear")
    return x


@keras.saving.register_keras_serializable(package="histokd")
class Downsample(keras.layers.Layer):
    """Reduces information density: resize to r x r, then bilinear back.

    *More From Less*, Section 2.1 (multi-magnification distillation): patches
    are downsampled to r px (224/112/56/28/14/7) and "resized to 224 x 224 px
    using linear interpolation". The down-step is antialiased by default (see
    the module docstring). Identity when ``size`` >= the input size (and no
    other ``image_size`` is asked for). uint8 inputs are scaled to [0, 1]; the
    output is float32. Used inside exported classifiers, so it is
    serialisable; it also compiles under XLA.

    Args:
        size: int. Low resolution r in pixels.
        image_size: int | None. Side to resize back to; None: the input size.
        antialias: bool. Antialias the down-step.
        **kwargs: standard Layer arguments.

    Example:
        >>> layer = Downsample(7, 224)
        >>> layer(tf.random.uniform([1, 224, 224, 3])).shape
        TensorShape([1, 224, 224, 3])
    """

    def __init__(self, size: int, image_size: int | None = None, antialias: bool = True, **kwargs):
        super().__init__(**kwargs)
        if size is None or isinstance(size, bool) or int(size) < 1:
            raise ConfigError(f"Downsample size must be a positive integer, got {size!r}")
        if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 1):
            raise ConfigError(f"Downsample image_size must be a positive integer or None, got {image_size!r}")
        self.size = int(size)
        self.image_size = int(image_size) if image_size is not None else None
        self.antialias = bool(antialias)

    def call(self, inputs):
        out = (self.image_size, self.image_size) if self.image_size is not None else None
        return downsample_batch(inputs, self.size, output_size=out, antialias=self.antialias)

    def compute_output_shape(self, input_shape):
        if self.image_size is None:
            return tuple(input_shape)
        return (input_shape[0], self.image_size, self.image_size, input_shape[-1])

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, image_size=self.image_size, antialias=self.antialias)
        return config


# ---------------------------------------------------------------------------
# view making (shared by the tf.data callable and the Keras layer)


def _split_mask_inputs(inputs):
    if isinstance(inputs, Mapping):
        try:
            return inputs["mask"], inputs["image"]
        except KeyError:
            raise DataError(
                f"kind='mask' needs a dict with keys 'mask' and 'image', got keys {sorted(inputs)}"
            ) from None
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        return inputs[0], inputs[1]
    raise DataError(
        "kind='mask' needs (mask, image) or {'mask': ..., 'image': ...} batches; "
        "pair each image with its 3-channel nuclear-type mask in the dataset"
    )


def _mask_of(inputs):
    """The mask batch of a mask_symmetric input: ``{"mask", ...}``, ``(mask, image)`` or the mask itself."""
    if isinstance(inputs, Mapping):
        if "mask" not in inputs:
            raise DataError(f"kind='mask_symmetric' needs a dict with key 'mask', got keys {sorted(inputs)}; "
                            "read a mask_pairs source (data.source: mask_pairs)")
        return inputs["mask"]
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        return inputs[0]
    return inputs


def _image_of(inputs, kind):
    """(batch, is_mask) read by an image kind: ``x["image"]`` of a pair dict, a mask-only dict's mask."""
    if not isinstance(inputs, Mapping):
        return inputs, False
    if "image" in inputs:
        return inputs["image"], False
    if "mask" in inputs and kind in ("identity", "eval"):
        return inputs["mask"], True
    raise DataError(f"kind={kind!r} reads H&E images but the batch holds only {sorted(inputs)}; "
                    "set data.input=image (a mask-only batch suits views.kind identity or mask_symmetric)")


def _prepare(images, image_size, method="bilinear"):
    """Checks rank/channels and brings a batch to the working size (keeps uint8)."""
    x = tf.convert_to_tensor(images)
    if x.shape.rank != 4:
        raise DataError(
            f"view makers expect batched images [B, H, W, 3], got shape {x.shape}; "
            "call dataset.batch(...) before mapping the view maker"
        )
    if x.shape[-1] is not None and x.shape[-1] != 3:
        raise DataError(
            f"view makers expect RGB images with 3 channels, got {x.shape[-1]}; "
            "convert gray/RGBA images to RGB when decoding"
        )
    if tuple(x.shape[1:3]) != (image_size, image_size):
        if method == "nearest":
            x = tf.image.resize(_to_float(x), [image_size, image_size], method="nearest")
        else:  # antialiased when shrinking, so larger tiles do not alias
            x = separable_resize(_to_float(x), (image_size, image_size), antialias=True)
    return x


def _small(x, r, image_size, antialias):
    """The r x r image (float [0, 1]) or x itself when r is None / >= the size."""
    if r is None or r >= image_size:
        return x
    return separable_resize(_to_float(x), (r, r), antialias=antialias)


def make_views(
    kind: str,
    inputs,
    seed,
    image_size: int,
    downsample: int | None = None,
    cfg: AugmentConfig | None = None,
    antialias: bool = True,
    mask_interpolation: str = "nearest",
):
    """Makes the views of one batch.

    Args:
        kind: str. One of :data:`KINDS`.
        inputs: [B, S, S, 3] uint8/float images, (mask, image) or {"mask", "image"} for
            "mask", {"mask", ...} or a mask batch for "mask_symmetric" (see the module docstring).
        seed: [2] int tensor. Stateless seed of this batch (ignored if cfg is None).
        image_size: int. Working size S of every view.
        downsample: int | None. Low resolution r.
        cfg: AugmentConfig | None. None: no augmentation.
        antialias: bool. Antialias the down-step.
        mask_interpolation: str. Resampling of masks ("nearest" keeps colours exact).

    Returns:
        dict of float32 [B, S, S, 3] views in [0, 1].
    """
    size = (image_size, image_size)
    if kind == "eval":
        cfg = None
    seeds = (
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
        if cfg is not None
        else (None, None)
    )

    def view(x, r, s):
        small = _small(x, r, image_size, antialias)
        if cfg is None:
            return downsample_batch(small, None, output_size=size)
        return augment_batch(small, s, cfg, output_size=size)

    if kind == "mask":
        mask, image = _split_mask_inputs(inputs)
        mask = _prepare(mask, image_size, method="nearest")
        image = _prepare(image, image_size)
        if cfg is None:
            return {"view_a": _to_float(mask), "view_b": _to_float(image)}
        return {
            "view_a": augment_batch(
                mask, seeds[0], cfg, output_size=size, geometric_only=True,
                interpolation=mask_interpolation,
            ),
            "view_b": augment_batch(image, seeds[1], cfg, output_size=size),
        }
    if kind == "mask_symmetric":
        mask = _prepare(_mask_of(inputs), image_size, method="nearest")
        if cfg is None:
            m = _to_float(mask)
            return {"view_a": m, "view_b": m}
        return {
            "view_a": augment_batch(mask, seeds[0], cfg, output_size=size, geometric_only=True,
                                    interpolation=mask_interpolation),
            "view_b": augment_batch(mask, seeds[1], cfg, output_size=size, geometric_only=True,
                                    interpolation=mask_interpolation),
        }
    inputs, is_mask = _image_of(inputs, kind)
    if is_mask:  # supervised on masks: geometric augmentation only, type ids kept exact
        mask = _prepare(inputs, image_size, method="nearest")
        if cfg is None:
            return {"image": _to_float(mask)}
        return {"image": augment_batch(mask, seeds[0], cfg, output_size=size, geometric_only=True,
                                       interpolation=mask_interpolation)}
    x = _prepare(inputs, image_size)
    if kind == "asymmetric":
        return {"view_a": view(x, downsample, seeds[0]), "view_b": view(x, None, seeds[1])}
    if kind == "symmetric":
        small = _small(x, downsample, image_size, antialias)
        return {"view_a": view(small, None, seeds[0]), "view_b": view(small, None, seeds[1])}
    if kind in ("identity", "eval"):
        return {"image": view(x, downsample, seeds[0])}
    raise ConfigError(f"unknown view kind {kind!r}; valid kinds: {', '.join(KINDS)}")


def _check(kind, image_size, downsample):
    if kind not in KINDS:
        raise ConfigError(f"unknown view kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")
    if downsample is not None:
        if not isinstance(downsample, int) or downsample < 1:
            raise ConfigError(f"downsample must be a positive integer or null, got {downsample!r}")
        if kind in MASK_KINDS:
            raise ConfigError(
                f"kind={kind!r} makes views from nuclear-type masks at full resolution; "
                "set views.downsample to null"
            )


class SeededViewMaker:
    """Per-batch seeds of a view maker (shared by :class:`ViewMaker` and MoBY's multiscale maker).

    A subclass sets ``seed`` (int) and takes ``seed=`` in ``__call__``. :meth:`_draw_seed`
    draws a seed from a ``tf.random.Generator`` (for calls without one, e.g. inside a
    training step); :meth:`_map_with_seeds` pairs every dataset element with its own seed
    from a seeded ``tf.data.Dataset.random``, so the views do not depend on the order in
    which a parallel map runs.
    """

    seed = 0
    _generator = None

    def _draw_seed(self):
        if self._generator is None:
            with tf.init_scope():
                self._generator = tf.random.Generator.from_seed(self.seed)
        return self._generator.make_seeds(1)[:, 0]

    def _map_with_seeds(self, dataset, fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=None):
        seeds = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).batch(2)
        return tf.data.Dataset.zip((dataset, seeds)).map(
            fn, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


class ViewMaker(SeededViewMaker):
    """Callable for ``dataset.map`` that turns a batch into a dict of views.

    Use :func:`make_view_maker` to build one. ``vm(images, labels)`` returns
    ``(views, labels)``; ``vm(images)`` returns ``views``. Without an explicit
    ``seed`` a per-call seed is drawn from a ``tf.random.Generator`` (different
    every batch and epoch, but the batch<->seed pairing depends on the order
    parallel map calls run); :meth:`map` pairs every batch with a seed from a
    seeded ``tf.data.Dataset.random`` and is reproducible for a fixed seed.

    Args:
        kind: str. One of :data:`KINDS`.
        image_size: int. Working size S.
        downsample: int | None. Low resolution r.
        augment: bool. Apply the Table S1 augmentations.
        aug_cfg: AugmentConfig | dict | None. Augmentation strengths.
        seed: int. Base seed.
        antialias: bool. Antialias the down-step.
        mask_interpolation: str. "nearest" (default) or "bilinear" for masks.

    Example:
        >>> vm = ViewMaker("asymmetric", 64, downsample=7)
        >>> views, y = vm(tf.zeros([8, 64, 64, 3], tf.uint8), tf.zeros([8]), seed=[0, 1])
        >>> sorted(views)
        ['view_a', 'view_b']
    """

    def __init__(
        self,
        kind: str,
        image_size: int,
        downsample: int | None = None,
        augment: bool = True,
        aug_cfg=None,
        seed: int = 0,
        antialias: bool = True,
        mask_interpolation: str = "nearest",
    ):
        _check(kind, image_size, downsample)
        self.kind = kind
        self.image_size = int(image_size)
        self.downsample = downsample
        self.augment = bool(augment) and kind != "eval"
        self.cfg = resolve_config(aug_cfg) if self.augment else None
        self.seed = int(seed)
        self.antialias = bool(antialias)
        self.mask_interpolation = mask_interpolation
        self._generator = None

    def __call__(self, images, labels=None, seed=None):
        if self.cfg is not None and seed is None:
            seed = self._draw_seed()
        elif seed is None:
            seed = tf.constant([0, 0], tf.int64)
        views = make_views(
            self.kind, images, seed, self.image_size, self.downsample, self.cfg,
            self.antialias, self.mask_interpolation,
        )
        return views if labels is None else (views, labels)

    def map(self, dataset: tf.data.Dataset, num_parallel_calls=tf.data.AUTOTUNE, deterministic=None):
        """Maps the view maker over a batched dataset with one seed per batch.

        Args:
            dataset: tf.data.Dataset of ``images`` or ``(images, labels)``
                (for kind "mask": ``(mask, image)``/``{"mask", "image"}``, optionally with labels).
            num_parallel_calls: int. Parallelism of the map.
            deterministic: bool | None. Passed to ``Dataset.map``.

        Returns:
            tf.data.Dataset of ``views`` or ``(views, labels)``.
        """
        spec = dataset.element_spec
        # a 2-tuple is (images, labels), except (mask, image) batches of the mask kinds
        with_labels = isinstance(spec, tuple) and len(spec) == 2 and (
            self.kind not in MASK_KINDS or isinstance(spec[0], (tuple, dict))
            or getattr(spec[1], "shape", None) is None or spec[1].shape.rank != 4
        )
        if with_labels:
            fn = lambda el, s: self(el[0], el[1], seed=s)  # noqa: E731
        else:
            fn = lambda el, s: self(el, seed=s)  # noqa: E731
        return self._map_with_seeds(dataset, fn, num_parallel_calls, deterministic)

    def get_config(self) -> dict:
        return dict(
            kind=self.kind, image_size=self.image_size, downsample=self.downsample,
            augment=self.augment, aug_cfg=self.cfg.to_dict() if self.cfg else None,
            seed=self.seed, antialias=self.antialias, mask_interpolation=self.mask_interpolation,
        )


def make_view_maker(
    kind: str,
    image_size: int,
    downsample: int | None = None,
    augment: bool = True,
    aug_cfg=None,
    seed: int = 0,
    **kwargs,
) -> ViewMaker:
    """Builds a batched view maker for ``dataset.map`` after ``batch``.

    *More From Less*, Section 2.1 and Table S1.

    Args:
        kind: str. "asymmetric", "symmetric", "identity", "mask", "mask_symmetric" or "eval".
        image_size: int. Working size S (224 in the paper).
        downsample: int | None. Low resolution r (7..224); None = full resolution.
        augment: bool. Apply Table S1 augmentations (ignored for "eval").
        aug_cfg: AugmentConfig | dict | None. Augmentation strengths/probabilities.
        seed: int. Base seed.
        **kwargs: ``antialias``, ``mask_interpolation`` (see :class:`ViewMaker`).

    Returns:
        ViewMaker: ``(images_uint8 [B,S,S,3], labels) -> (dict_of_views, labels)``.

    Example:
        >>> vm = make_view_maker("asymmetric", 224, downsample=7)
        >>> ds = ds.batch(32).map(vm, num_parallel_calls=tf.data.AUTOTUNE)
    """
    return ViewMaker(kind, image_size, downsample, augment, aug_cfg, seed, **kwargs)


@keras.saving.register_keras_serializable(package="histokd")
class ViewMakerLayer(keras.layers.Layer):
    """View making as a Keras layer, to run inside the training step on device.

    For ``augment_on: device``: the dataset yields raw uint8 batches and the
    method calls this layer at the start of its train step, so resampling and
    colour work run on the accelerator. With ``training`` true it augments
    (fresh seed per call from a ``SeedGenerator``, replica id folded in); at
    inference it only downsamples.

    Args:
        kind: str. One of :data:`KINDS`.
        image_size: int. Working size S.
        downsample: int | None. Low resolution r.
        augment: bool. Apply the Table S1 augmentations when training.
        aug_cfg: AugmentConfig | dict | None.
        seed: int | None. Seed of the layer's seed generator.
        antialias: bool. Antialias the down-step.
        mask_interpolation: str. Resampling of masks.
        **kwargs: standard Layer arguments.

    Example:
        >>> layer = ViewMakerLayer("asymmetric", 64, downsample=7, seed=0)
        >>> views = layer(tf.zeros([4, 64, 64, 3], tf.uint8), training=True)
    """

    def __init__(
        self,
        kind: str,
        image_size: int,
        downsample: int | None = None,
        augment: bool = True,
        aug_cfg=None,
        seed: int | None = None,
        antialias: bool = True,
        mask_interpolation: str = "nearest",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check(kind, image_size, downsample)
        self.kind = kind
        self.image_size = int(image_size)
        self.downsample = downsample
        self.augment = bool(augment)
        self.aug_cfg = resolve_config(aug_cfg)
        self.seed = seed
        self.antialias = bool(antialias)
        self.mask_interpolation = mask_interpolation
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        use_aug = bool(training) and self.augment
        seed = replica_seed(self.seed_generator.next()) if use_aug else tf.constant([0, 0], tf.int64)
        return make_views(
            self.kind, inputs, seed, self.image_size, self.downsample,
            self.aug_cfg if use_aug else None, self.antialias, self.mask_interpolation,
        )

    def _names(self):
        return ("image",) if self.kind in ("identity", "eval") else ("view_a", "view_b")

    def compute_output_spec(self, inputs, training=None):
        batch = (next(iter(inputs.values())) if isinstance(inputs, Mapping) else
                 inputs[1] if isinstance(inputs, (tuple, list)) else inputs).shape[0]
        shape = (batch, self.image_size, self.image_size, 3)
        return {n: keras.KerasTensor(shape, dtype="float32") for n in self._names()}

    def get_config(self):
        config = super().get_config()
        config.update(
            kind=self.kind, image_size=self.image_size, downsample=self.downsample,
            augment=self.augment, aug_cfg=self.aug_cfg.to_dict(), seed=self.seed,
            antialias=self.antialias, mask_interpolation=self.mask_interpolation,
        )
        return config


# ---------------------------------------------------------------------------
# view kinds: what the registry holds


class ViewKind:
    """Base of a registered view kind (``views.kind``): how a batch becomes views.

    A subclass registers itself in :data:`histokd.registry.VIEWS` and says which
    batch keys it yields (:attr:`outputs`), builds its view maker from a run
    configuration (:meth:`from_run_config`), says which input each branch's encoder
    reads at evaluation (:meth:`branch_inputs`) and rejects configurations it cannot
    serve (:meth:`validate`). The runner and the config validation only call these.

    Attributes:
        name: str. The ``views.kind`` key.
        outputs: tuple[str, ...]. Keys of the views dict a view maker returns.
        supports_device_augment: bool. Whether ``views.augment_on: device`` works
            (a :class:`ViewMakerLayer` can make the views inside the train step).
        reads_images: bool. Whether the kind needs H&E images in the batch (so it
            cannot read a masks-only ``data.input: mask`` source).

    Example:
        >>> from histokd.registry import VIEWS
        >>> VIEWS.get("asymmetric").outputs
        ('view_a', 'view_b')
    """

    name = ""
    outputs = ("view_a", "view_b")
    supports_device_augment = True
    reads_images = True

    @classmethod
    def make(cls, image_size, downsample=None, augment=True, aug_cfg=None, seed=0, **kwargs):
        """The view maker of this kind from explicit arguments (see :func:`make_view_maker`)."""
        return make_view_maker(cls.name, image_size, downsample, augment, aug_cfg, seed, **kwargs)

    @classmethod
    def from_run_config(cls, cfg, training: bool = True):
        """The view maker of a run: ``(images, labels) -> (views, labels)``.

        Args:
            cfg: RunConfig. Reads ``data.image_size``, ``views`` (downsample, augment),
                ``augment`` and ``train.seed``.
            training: bool. Augment only when true (and ``views.augment``).
        """
        return cls.make(cfg.data.image_size, downsample=cfg.views.downsample,
                        augment=cfg.views.augment and training, aug_cfg=_augment_dict(cfg), seed=cfg.train.seed)

    @classmethod
    def branch_inputs(cls, cfg) -> dict:
        """Which input each branch's encoder reads: ``{"a": "downsampled", "b": "full"}`` etc.

        Values are ``full``, ``downsampled`` (images) and ``mask`` (More From Less §2.2:
        the sparse encoder is evaluated on downsampled or mask inputs, the dense one on
        full-resolution images).
        """
        raise NotImplementedError

    @classmethod
    def validate(cls, cfg):
        """Reject a run configuration this kind cannot serve.

        Args:
            cfg: RunConfig.

        Raises:
            ConfigError: with what to change.
        """
        d = cfg.data
        if cls.reads_images and d.source == "mask_pairs" and d.input == "mask":
            raise ConfigError(f"data.input=mask yields masks only, but views.kind={cfg.views.kind} reads H&E images; "
                              "use views.kind identity (supervised on masks) or mask_symmetric, or data.input=image")


def _augment_dict(cfg) -> dict:
    """``cfg.augment`` as a mapping for :func:`resolve_config`."""
    import dataclasses

    return dataclasses.asdict(cfg.augment)


def _down(cfg) -> str:
    """``downsampled`` when ``views.downsample`` degrades the image, else ``full``."""
    r = cfg.views.downsample
    return "downsampled" if r and r < cfg.data.image_size else "full"
