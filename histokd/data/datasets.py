"""Config → datasets of one run: the source, stain normalisation, view makers and the
train / validation / evaluation ``tf.data`` pipelines.

Used by the runner (:mod:`histokd.train`), the tasks (:mod:`histokd.tasks`)
and the analysis commands, so every place that reads a run's data reads it the same way.

Batches are ``(x, y)`` with ``x`` a uint8 ``[B, H, W, 3]`` image batch, or, for
``mask_pairs`` sources, a dict ``{"image": ..., "mask": ...}`` of two such batches
(More From Less §2.1, tissue/nuclei distillation). Stain normalisation (More From
Less §2.3) only ever touches the H&E image, never a mask.

Example:
    >>> from histokd.config import load_config
    >>> cfg = load_config("default")
    >>> source = build_data(cfg)
    >>> ds = train_dataset(cfg, source, 32, make_views(cfg), stain_fn(cfg))
"""

from __future__ import annotations

import tensorflow as tf

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the run config is passed in; data never imports the config layer
    from histokd.config import RunConfig


def build_data(cfg: RunConfig):
    """The :class:`histokd.data.Source` that ``cfg.data`` describes."""
    from histokd.data import build_source

    return build_source(cfg.data)


def stain_fn(cfg: RunConfig):
    """The batched stain normaliser of ``cfg.data.stain`` (a :class:`histokd.stain.StainFn`) or None."""
    from histokd.stain import make_stain_fn, stain_normalizes

    if not stain_normalizes(cfg.data.stain.method):
        return None
    return make_stain_fn(cfg.data.stain.method, cfg.data.stain.target, cfg.data.stain.on_failure)


def apply_stain(stain, x):
    """Normalise the image part of a batch: ``x`` is an image batch or ``{"image", "mask"}``."""
    if stain is None:
        return x
    if isinstance(x, dict):
        if "image" not in x:  # a masks-only batch: masks are never stain-normalised
            return x
        out = dict(x)
        out["image"] = stain(x["image"])
        return out
    return stain(x)


def augment_params(cfg: RunConfig) -> dict:
    """``cfg.augment`` as keyword arguments of the view makers."""
    return dict(vars(cfg.augment))


def make_views(cfg: RunConfig, training=True):
    """The view maker of ``cfg.views`` (augmenting only when ``training``): the registered
    view kind's ``from_run_config`` (see :class:`histokd.data.views.ViewKind`).

    ``views.kind: multiscale`` gives MoBY's two multi-scale crops (Swin V2 paper §III-A:
    random resized crop or, with ``views.magnify_prob``, a 2× magnified crop).
    """
    from histokd.registry import VIEWS

    return VIEWS.get(cfg.views.kind).from_run_config(cfg, training)


def _with_stain(ds, stain):
    if stain is None:
        return ds
    return ds.map(lambda x, y: (apply_stain(stain, x), y), num_parallel_calls=tf.data.AUTOTUNE)


def _map_views(ds, view_maker):
    """``ds`` turned into views. A view maker with a ``map`` method pairs every batch with its
    own seed from a seeded ``tf.data.Dataset.random``, so the views do not depend on the
    order in which a parallel map runs (a run is reproducible); a plain callable is mapped."""
    if view_maker is None:
        return ds
    if hasattr(view_maker, "map"):
        return view_maker.map(ds)
    return ds.map(view_maker, num_parallel_calls=tf.data.AUTOTUNE)


def train_dataset(cfg: RunConfig, source, global_batch: int, view_maker, stain=None):
    """Shuffled, repeated training batches, stain-normalised, turned into views by ``view_maker``
    (None when the views are made on the device, ``views.augment_on=device``)."""
    from histokd.data import make_dataset

    ds = make_dataset(source, "train", cfg.data.image_size, global_batch, training=True,
                      seed=cfg.train.seed, on_bad_image=cfg.data.on_bad_image,
                      cache=cfg.data.cache, repeat=True, drop_remainder=True)
    ds = _with_stain(ds, stain)
    return _map_views(ds, view_maker).prefetch(tf.data.AUTOTUNE)


def val_dataset(cfg: RunConfig, source, view_maker, stain=None):
    """Validation batches (views of the val split, same loss as training), or None when the
    val split holds less than one batch."""
    from histokd.data import make_dataset

    if source.num_examples("val") < cfg.train.batch_size:
        return None
    ds = make_dataset(source, "val", cfg.data.image_size, cfg.train.batch_size, training=False,
                      seed=cfg.train.seed + 1, on_bad_image=cfg.data.on_bad_image,
                      cache=cfg.data.cache, drop_remainder=True)
    ds = _with_stain(ds, stain)
    return _map_views(ds, view_maker).prefetch(tf.data.AUTOTUNE)


def eval_dataset(cfg: RunConfig, source, split: str, stain=None, batch_size=None):
    """Unshuffled, un-augmented batches of ``split`` for feature extraction and prediction."""
    from histokd.data import make_dataset

    ds = make_dataset(source, split, cfg.data.image_size, batch_size or max(cfg.train.batch_size, 64),
                      training=False, seed=cfg.train.seed, on_bad_image=cfg.data.on_bad_image,
                      cache=False, repeat=False, drop_remainder=False)
    return _with_stain(ds, stain).prefetch(tf.data.AUTOTUNE)


def branch_input_kinds(cfg: RunConfig) -> dict:
    """Which input each trained encoder reads: ``{"a": "downsampled", "b": "full"}`` etc.

    More From Less §2.2: the sparse encoder is evaluated on downsampled (or mask) inputs,
    the dense encoder on full-resolution images. The run's method answers
    (``Method.branch_input_kinds``; by default its view kind's ``branch_inputs``).
    Kinds: ``full``, ``downsampled`` (images) and ``mask``; see :func:`branch_input`.
    """
    from histokd.registry import METHODS

    return METHODS.get(cfg.model.method).branch_input_kinds(cfg)


def branch_input(x, kind: str):
    """The part of a batch ``x`` an encoder of input ``kind`` reads.

    ``x["mask"]`` for ``mask``, ``x["image"]`` for ``full`` / ``downsampled`` when ``x`` is
    a dict (mask_pairs sources); a plain image batch is returned as it is.

    Example:
        >>> ds.map(lambda x, y: (branch_input(x, "mask"), y))  # doctest: +SKIP
    """
    if not isinstance(x, dict):
        return x
    key = "mask" if kind == "mask" else "image"
    if key not in x:
        from histokd.errors import DataError

        raise DataError(f"an encoder reading {kind!r} inputs needs {key!r} in the batch, which holds "
                        f"{sorted(x)}; set data.input=image to read the H&E images of a mask_pairs source")
    return x[key]


__all__ = ["apply_stain", "augment_params", "branch_input", "branch_input_kinds", "build_data", "eval_dataset",
           "make_views", "stain_fn", "train_dataset", "val_dataset"]
