"""How the Macenko transform is run fast: fused per-pixel passes, XLA kernels, graph caches, chunks.

:mod:`histokd.stain.macenko` states the algorithm (Macenko et al., ISBI 2009);
this module holds what makes it fast on a CPU without changing what it computes:

* **Per-pixel passes.** Each pass over the pixels (OD + tissue mask + the ten
  covariance sums; pseudo-angles in the stain plane; concentrations; recolouring)
  is written so that XLA:CPU fuses it into one loop instead of a chain of
  TensorFlow ops that each stream the batch through memory.
* **XLA kernels** (:func:`kernel`). A pass is XLA-compiled when every shape is
  static (a fixed tile size: the training pipeline, the Keras layer, ``histokd
  normalize``); one compiled kernel per function and constants, cached.
  ``HISTOKD_MACENKO_XLA=0`` runs the same math with TensorFlow's kernels.
* **Graph caches** (:func:`transform_graph`, :func:`decompose_graph`). One traced
  ``tf.function`` per set of constants and tile size, shared by every normaliser;
  beyond :data:`MAX_STATIC_SIZES` sizes, one dynamic-shape graph.
* **Chunks** (:func:`chunked`). A batch runs as fixed-size chunks of tiles,
  :data:`PARALLEL_CHUNKS` in flight: a chunk's intermediates stay in cache and
  the cores work on different chunks instead of synchronising on every op.

XLA:CPU runs fastest here with the scheduling option that
:func:`histokd.runtime.prefer_sequential_xla_cpu` sets; this module never sets it
(a library must not change process-wide settings). Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

#: Tiles per chunk of the transform (see :func:`chunked`).
DEFAULT_CHUNK_SIZE = 4
#: Chunks in flight: the independent chains of kernels the transform runs, i.e. the
#: ``streams`` of :func:`histokd.runtime.apply_cpu_threads` for a Macenko job.
PARALLEL_CHUNKS = 2


# ------------------------------------------------------------------ compiling


def xla_enabled() -> bool:
    """Whether the per-pixel passes are XLA-compiled (``HISTOKD_MACENKO_XLA=0`` turns it off)."""
    return os.environ.get("HISTOKD_MACENKO_XLA", "1").strip().lower() not in ("0", "false", "no", "off")


_KERNELS: Dict[Tuple, Any] = {}


def kernel(fn: Callable, xla: bool, **static) -> Callable:
    """``fn`` with keyword constants bound, XLA-compiled when ``xla`` (cached per constants).

    Only used where every shape is static (fixed tile size); XLA then compiles once
    per shape. TensorFlow's own kernels run otherwise.

    Args:
        fn: callable. A pass or a small step of the selection.
        xla: bool. Compile with XLA.
        **static: python constants bound to ``fn`` (part of the cache key).
    """
    if not xla:
        return lambda *a: fn(*a, **static)
    key = (fn.__name__,) + tuple(sorted(static.items()))
    k = _KERNELS.get(key)
    if k is None:
        k = tf.function(lambda *a: fn(*a, **static), jit_compile=True, autograph=False)
        _KERNELS[key] = k
    return k


# ------------------------------------------------------------ per-pixel passes


def pseudo_angle(x, y):
    """A strictly increasing function of ``atan2(y, x)`` on (-pi, pi], in (-2, 2].

    ``d = y / (|x| + |y|)`` is ``d`` for x >= 0, ``2 - d`` for x < 0 <= y and
    ``-2 - d`` for x, y < 0 (0 at the origin): a few multiply-adds and one
    division instead of an ``atan2`` per pixel, so order statistics of angles can
    be selected on it and only the selected values converted
    (:func:`pseudo_angle_to_angle`).

    Args:
        x: float32 tensor. Abscissae.
        y: float32 tensor. Ordinates, same shape.
    """
    s = tf.abs(x) + tf.abs(y)
    d = y / tf.where(s > 0.0, s, 1.0)
    return tf.where(x >= 0.0, d, tf.where(y >= 0.0, 2.0 - d, -2.0 - d))


def pseudo_angle_to_angle(p):
    """Inverse of :func:`pseudo_angle`: the angle atan2(y, x) in (-pi, pi].

    Args:
        p: float32 tensor of pseudo-angles.
    """
    back = tf.abs(p) > 1.0  # x < 0
    d = tf.where(back, tf.where(p > 0.0, 2.0 - p, -2.0 - p), p)
    r = 1.0 - tf.abs(d)
    return tf.math.atan2(d, tf.where(back, -r, r))


def group_max(rows, group: int):
    """[B,R,N] -> [B,R,ceil(N/group)]: maxima of ``group`` consecutive entries (-inf padding).

    The selection's prefilter (:mod:`histokd.stain._select`); computed inside the
    pass that makes the rows when that pass is XLA-compiled.

    Args:
        rows: float32 [B, R, N].
        group: int. Group size.
    """
    n = rows.shape[-1]
    pad = (-n) % group
    if pad:
        rows = tf.pad(rows, [[0, 0], [0, 0], [0, pad]], constant_values=-np.inf)
    shp = tf.shape(rows)
    return tf.reduce_max(tf.reshape(rows, [shp[0], shp[1], (n + pad) // group, group]), axis=-1)


def pixel_sum(t):
    """[B,N] -> [B]: the sum over pixels as 128 interleaved partial sums when N allows.

    XLA's CPU code vectorises a reduction over an outer axis ([B, N/128, 128] summed
    over N/128) and not one over the minor axis; the result is the same sum to
    float32 rounding.
    """
    n = t.shape[-1]
    if n is None or n % 128:
        return tf.reduce_sum(t, axis=-1)
    return tf.reduce_sum(tf.reduce_sum(tf.reshape(t, [-1, n // 128, 128]), axis=1), axis=-1)


def od_and_stats(x, io, threshold, luminosity_threshold):
    """Steps 1-3 of Macenko in one pass: OD, tissue mask, the sums of the OD covariance.

    Args:
        x: [B,N,3] uint8 (or float holding 0..255 values).
        io: float. Transmitted light.
        threshold: the tissue test on the input's scale: brightest channel <= it.
        luminosity_threshold: float or None. Extra tissue test luma/255 < value.

    Returns:
        (OD planar [B,3,N], tissue mask [B,N] float, sums [B,10] =
        (n, s_r, s_g, s_b, s_rr, s_rg, s_rb, s_gg, s_gb, s_bb) over the tissue).
    """
    xp = tf.transpose(x, [0, 2, 1])  # [B,3,N]
    xf = tf.cast(xp, tf.float32)
    if x.dtype.is_integer:
        od = math.log(io) - tf.math.log(xf + 1.0)  # x + 1 is exact for integers
        mask = tf.reduce_max(xp, axis=1) <= tf.cast(threshold, x.dtype)
    else:
        od = math.log(io) - tf.math.log1p(xf)
        mask = tf.reduce_max(xf, axis=1) <= threshold
    if luminosity_threshold is not None:
        lum = 0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]
        mask = tf.logical_and(mask, lum < 255.0 * float(luminosity_threshold))
    maskf = tf.cast(mask, tf.float32)
    r, g, b = od[:, 0], od[:, 1], od[:, 2]
    # Each integrand is written from od and the mask directly (no shared masked
    # products), so XLA:CPU fuses each into its own reduction instead of
    # materialising the shared products in memory.
    zero = tf.zeros_like(r)
    sums = [pixel_sum(tf.where(mask, t, zero))
            for t in (tf.ones_like(r), r, g, b, r * r, r * g, r * b, g * g, g * b, b * b)]
    return od, maskf, tf.stack(sums, axis=1)


def angle_rows(od, maskf, plane, group=0):
    """Step 4: the pseudo-angle of each tissue pixel in the stain plane, as two rows.

    Row 0 holds the pseudo-angles, row 1 their negation (the lower tail as an upper
    one); -inf outside the tissue. With ``group``, also their :func:`group_max`.

    Args:
        od: float32 [B,3,N]. OD, planar.
        maskf: float32 [B,N]. Tissue mask.
        plane: float32 [B,3,2]. Second and largest eigenvectors.
        group: int. Group size of the selection's prefilter (0: none).
    """
    px = tf.reduce_sum(od * plane[:, :, 0:1], axis=1)  # on the second eigenvector
    py = tf.reduce_sum(od * plane[:, :, 1:2], axis=1)  # on the largest
    p = pseudo_angle(px, py)
    valid = (maskf > 0.0) & tf.logical_not(tf.math.is_nan(p))  # NaN only from NaN/negative float input
    rows = tf.stack([tf.where(valid, p, -np.inf), tf.where(valid, -p, -np.inf)], axis=1)
    return (rows, group_max(rows, group)) if group else rows


def concentrations(od, pinv, group=0):
    """Step 7: C = pinv(HE) OD, [B,2,3] x [B,3,N] -> [B,2,N], as three multiply-adds per pixel.

    Args:
        od: float32 [B,3,N]. OD, planar.
        pinv: float32 [B,2,3].
        group: int. Group size of the selection's prefilter (0: none); with it, also
            the :func:`group_max` of C.
    """
    # (explicit slices, no new-axis indexing: grappler mis-shapes the latter here)
    c = pinv[:, :, 0:1] * od[:, 0:1] + pinv[:, :, 1:2] * od[:, 1:2] + pinv[:, :, 2:3] * od[:, 2:3]
    c = tf.where(tf.math.is_nan(c), -np.inf, c)  # (the selection needs an order; such tiles pass through)
    return (c, group_max(c, group)) if group else c


def recolour(od, m, io):
    """Step 9: io * exp(m OD) clipped to 255, truncated to uint8 (torchstain's astype), [B,N,3].

    Args:
        od: float32 [B,3,N]. OD, planar.
        m: float32 [B,3,3] (output channel, OD channel).
        io: float. Transmitted light.
    """
    z = (m[:, :, 0:1] * od[:, 0:1] + m[:, :, 1:2] * od[:, 1:2] + m[:, :, 2:3] * od[:, 2:3]) + math.log(io)
    out = tf.cast(tf.minimum(tf.exp(z), 255.0), tf.uint8)  # exp > 0: truncation == floor
    return tf.transpose(out, [0, 2, 1])


def small_matmul(a, b):
    """``a @ b`` for batches of tiny matrices ([B,m,k] x [B,k,n], k, m, n <= 3).

    A broadcast multiply and sum: a batched GEMM call (oneDNN) has a large fixed
    cost per call, more still when it splits such a batch over threads.
    """
    return tf.reduce_sum(tf.expand_dims(a, -1) * tf.expand_dims(b, -3), axis=-2)


def select_tiles(ok, new, old):
    """Per-tile choice of ``new`` where ``ok`` else ``old``; no broadcasting select when all ok."""
    def mixed():
        return tf.where(tf.reshape(ok, [-1] + [1] * (new.shape.rank - 1)), new, old)

    return tf.cond(tf.reduce_all(ok), lambda: new, mixed)


# ---------------------------------------------------------------------- chunks


def chunked(fn, x, chunk: int):
    """``fn`` over fixed-size chunks of ``x``, :data:`PARALLEL_CHUNKS` in flight.

    The last chunk is padded with black tiles (which the robustness policy passes
    through) and the padding is dropped, so a tile's output does not depend on the
    size of the batch it came in.

    Args:
        fn: callable. uint8 [chunk,H,W,3] -> (uint8 [chunk,H,W,3], bool [chunk]).
        x: uint8 [B,H,W,3] tensor.
        chunk: int. Tiles per chunk.
    """
    b = tf.shape(x)[0]
    pad = (chunk - b % chunk) % chunk
    xp = tf.pad(x, [[0, pad], [0, 0], [0, 0], [0, 0]])
    dyn = tf.shape(xp)
    inner = [x.shape[i] if x.shape[i] is not None else dyn[i] for i in (1, 2, 3)]
    xc = tf.reshape(xp, [-1, chunk] + inner)
    out, passed = tf.map_fn(
        fn,
        xc,
        parallel_iterations=PARALLEL_CHUNKS,
        fn_output_signature=(
            tf.TensorSpec([chunk] + list(x.shape[1:]), tf.uint8),
            tf.TensorSpec([chunk], tf.bool),
        ),
    )
    out = tf.reshape(out, dyn)[:b]
    return tf.ensure_shape(out, x.shape), tf.reshape(passed, [-1])[:b]


# --------------------------------------------------------------- graph caches


_GRAPHS: Dict[Tuple, Any] = {}

#: Distinct tile sizes that get their own compiled graph (per set of constants);
#: further sizes share one dynamic-shape graph (TensorFlow kernels, no retracing).
MAX_STATIC_SIZES = 16
_STATIC_SIZES: Dict[Tuple, set] = {}


def _key(c: Dict[str, Any]) -> Tuple:
    return tuple(sorted(c.items()))


def decompose_graph(decompose: Callable, c: Dict[str, Any]):
    """A cached ``tf.function`` running ``decompose(x, **c)`` (any input shape).

    Args:
        decompose: callable. :func:`histokd.stain.macenko.macenko_decompose`.
        c: dict. Validated Macenko constants.
    """
    key = ("decompose", xla_enabled()) + _key(c)
    fn = _GRAPHS.get(key)
    if fn is None:
        fn = tf.function(lambda x: decompose(x, **c), reduce_retracing=True)
        _GRAPHS[key] = fn
    return fn


def transform_graph(transform: Callable, c: Dict[str, Any], h: Optional[int], w: Optional[int]):
    """A cached ``tf.function`` running ``transform(x, he, max_c, **c)`` for tiles of h x w.

    Shared by all normalisers with the same constants and tile size. h/w None = any
    size (slower: the selection sizes are then dynamic and the per-pixel passes are
    not XLA-compiled). Each new static size costs a trace and an XLA compilation
    (~1 s); after :data:`MAX_STATIC_SIZES` distinct sizes (a folder of images of
    many sizes) new sizes go to the one dynamic-shape graph, traced once.

    Args:
        transform: callable. :func:`histokd.stain.macenko.macenko_transform`.
        c: dict. Validated Macenko constants.
        h, w: int or None. Tile size.
    """
    if h is None or w is None:
        h = w = None
    base = (xla_enabled(),) + _key(c)
    key = ("transform", h, w) + base
    fn = _GRAPHS.get(key)
    if fn is None and h is not None:
        sizes = _STATIC_SIZES.setdefault(base, set())
        if len(sizes) >= MAX_STATIC_SIZES:
            return transform_graph(transform, c, None, None)
        sizes.add((h, w))
    if fn is None:
        fn = tf.function(
            lambda x, he, mc: transform(x, he, mc, **c),
            input_signature=[
                tf.TensorSpec([None, h, w, 3], tf.uint8),
                tf.TensorSpec([3, 2], tf.float32),
                tf.TensorSpec([2], tf.float32),
            ],
        )
        _GRAPHS[key] = fn
    return fn
