"""Exact percentiles of large rows without a sort: the order-statistics engine of Macenko.

Macenko et al. (ISBI 2009) need three percentiles per tile: the alpha-th and
(100 - alpha)-th percentile of the stain-plane angles and the 99th percentile of
each concentration. :func:`upper_percentiles` gives them exactly as
``np.percentile`` (linear interpolation) from the few order statistics of the
upper tail, for a whole batch of rows at once and inside a graph.

How. Values outside the tissue are -inf. The k-th largest maximum of groups of
``group`` consecutive values bounds the tail from below; the fewer than k groups
above the bound are packed into a small candidate set (with k copies of the bound
for ties and +inf padding that moves each row's wanted rank to one common
position), and one ``NthElement`` on that set picks the order statistic
(:func:`upper_order_stats`). Where N is not static the previous two-stage
``top_k`` selection (:func:`top_desc`) is used. Angles are selected on a
pseudo-angle (:func:`histokd.stain._kernels.pseudo_angle`: same order as
``atan2``, a few multiply-adds) and only the selected values are turned into
angles (the ``value_fns`` of :func:`upper_percentiles`).

Why not the obvious alternatives: a full sort or ``top_k`` over N values costs
several times the selection, and histograms cost more per value than it.
Figures and the variants tried: docs/benchmarks.md (Stain normalisation).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from histokd.stain._kernels import group_max, kernel


def k_for(n_static, n_dynamic, tail_percent: float):
    """How many top values cover a tail of ``tail_percent`` % of N values (+2 for interpolation).

    Args:
        n_static: int or None. N when static.
        n_dynamic: int32 scalar tensor. N at run time (used when ``n_static`` is None).
        tail_percent: float. Size of the tail in percent.
    """
    if n_static is not None:
        return int(max(1, min(n_static, math.ceil(tail_percent / 100.0 * max(n_static - 1, 0)) + 2)))
    kf = tf.math.ceil(tail_percent / 100.0 * tf.cast(tf.maximum(n_dynamic - 1, 0), tf.float32)) + 2.0
    return tf.maximum(1, tf.minimum(n_dynamic, tf.cast(kf, tf.int32)))


def uses_groups(n_static, k, group: int) -> bool:
    """Whether the group-maximum prefilter pays off for these sizes (k * group * 2 < N)."""
    return group > 1 and isinstance(k, int) and n_static is not None and k * group * 2 < n_static


def group_path(n_static, k, group: int) -> bool:
    """Whether :func:`upper_order_stats` applies (static N, a multiple of the group)."""
    return uses_groups(n_static, k, group) and n_static % group == 0 and k >= 2


def fused_group(n_static, k, group: int, xla: bool) -> int:
    """The group size whose maxima an XLA per-pixel pass should emit with its rows (0: none).

    Computing the maxima in the pass that makes the rows saves one more pass over them.
    """
    return group if xla and uses_groups(n_static, k, group) else 0


def lerp(lo, hi, t):
    """np.percentile's linear interpolation, evaluated from the nearer end like numpy."""
    return tf.where(t >= 0.5, hi - (hi - lo) * (1.0 - t), lo + (hi - lo) * t)


# ----------------------------------------------------------------- top_k path


def top_desc(rows, k, group: int = 16, gmax=None, sort: bool = True):
    """The ``k`` largest entries of each row, exact; sorted descending unless ``sort=False``.

    Two-stage selection: the k largest values of a row all lie in the k groups
    (of ``group`` consecutive entries) with the largest maxima, so ``top_k`` runs
    over N/group group maxima and then over k*group candidates instead of over N
    values (and far less in the worst case, monotone rows). The smallest of those
    k group maxima is a lower bound of the k-th largest value, so candidates below
    it are set to -inf before the second ``top_k``.

    Args:
        rows: float32 [B, R, N].
        k: int (or int32 scalar tensor when N is not static).
        group: int. Group size; 1 disables the two-stage selection.
        gmax: optional [B, R, ceil(N/group)]; ``group_max(rows, group)`` when
            already computed (by the pass that made ``rows``).
        sort: bool. Sort the result (``False``: any order, for
            :func:`percentile_from_top` with ``presorted=False``).

    Returns:
        float32 [B, R, k].
    """
    n_static = rows.shape[-1]
    if uses_groups(n_static, k, group):
        pad = (-n_static) % group
        if pad:
            rows = tf.pad(rows, [[0, 0], [0, 0], [0, pad]], constant_values=-np.inf)
        n_groups = (n_static + pad) // group
        shp = tf.shape(rows)
        grouped = tf.reshape(rows, [shp[0], shp[1], n_groups, group])
        if gmax is None:
            gmax = tf.reduce_max(grouped, axis=-1)  # [B,R,G]
        gtop, idx = tf.math.top_k(gmax, k=min(k, n_groups), sorted=False)
        cand = tf.reshape(tf.gather(grouped, idx, batch_dims=2), [shp[0], shp[1], -1])
        bound = tf.reduce_min(gtop, axis=-1, keepdims=True)
        rows = tf.where(cand >= bound, cand, -np.inf)
    top = tf.math.top_k(rows, k=k, sorted=False).values
    return tf.sort(top, axis=-1, direction="DESCENDING") if sort else top


def percentile_from_top(top, counts, q, value_fn=None, presorted=True):
    """``np.percentile(valid, q)`` (linear) from the top values of a row.

    With ``presorted=False`` the k values come in any order: only the few smallest
    of them (the needed ranks sit near the bottom of the k values for an upper-tail
    ``q``) are ordered, by ``top_k`` of the negated values.

    Args:
        top: float32 [B, k]; the k largest valid values (-inf padding), descending
            unless ``presorted=False``.
        counts: int32 [B]; number of valid values in the row.
        q: float; the percentile. The needed ranks must be among the k values.
        value_fn: optional callable mapping the two selected order statistics to
            the quantity to interpolate (a monotone increasing re-parametrisation,
            e.g. pseudo-angle -> angle).
        presorted: bool. Whether ``top`` is sorted descending.

    Returns:
        float32 [B].
    """
    n = tf.cast(counts, tf.float64)
    p = (float(q) / 100.0) * tf.maximum(n - 1.0, 0.0)
    f = tf.floor(p)
    t = tf.cast(p - f, tf.float32)
    kk = tf.shape(top, out_type=tf.int64)[-1]
    d = tf.clip_by_value(tf.cast(n - 1.0 - f, tf.int64), 0, kk - 1)  # rank of s_f from the top
    d2 = tf.maximum(d - 1, 0)  # rank of s_{f+1}
    if presorted:
        lo = tf.gather(top, d[:, None], batch_dims=1)[:, 0]
        hi = tf.gather(top, d2[:, None], batch_dims=1)[:, 0]
    else:
        b_lo, b_hi = kk - 1 - d, kk - 1 - d2  # ranks from the bottom; b_lo <= b_hi
        m = tf.cast(tf.reduce_max(b_hi) + 1, tf.int32)
        asc = -tf.math.top_k(-top, k=m, sorted=True).values  # the m smallest, ascending
        lo = tf.gather(asc, b_lo[:, None], batch_dims=1)[:, 0]
        hi = tf.gather(asc, b_hi[:, None], batch_dims=1)[:, 0]
    if value_fn is not None:
        lo, hi = value_fn(lo), value_fn(hi)
    return lerp(lo, hi, t)


# ------------------------------------------------------------ NthElement path


_TRI64 = np.triu(np.ones((64, 64), np.float32))


def _running_count_above(gmax, bound):
    """Inclusive running count of ``gmax > bound`` along the last axis, int32 [B,R,G].

    Blocks of 64 are counted by a product with a triangular matrix of ones (exact in
    float32) plus the running block totals: XLA's CPU scan is slower on these sizes.
    """
    n = gmax.shape[-1]
    above = tf.where(gmax > bound, 1.0, 0.0)
    if n is None or n % 64:
        return tf.cast(tf.cumsum(above, axis=-1), tf.int32)
    blocks = tf.reshape(above, [-1, n // 64, 64])
    inner = tf.einsum("ngi,ij->ngj", blocks, tf.constant(_TRI64))
    run = inner + tf.cumsum(inner[..., -1:], axis=-2, exclusive=True)
    return tf.reshape(tf.cast(run, tf.int32), tf.shape(gmax))


def _next_above(aug, lo):
    """Per row: how many entries are <= lo, and the smallest entry > lo (+inf if none).

    The count is a float32 sum (exact below 2**24 entries): XLA's CPU reduction
    library handles float sums much faster than int32 ones.
    """
    le = tf.reduce_sum(tf.where(aug <= lo[..., None], 1.0, 0.0), -1)
    above = tf.reduce_min(tf.where(aug > lo[..., None], aug, np.inf), -1)
    return le, above


def _candidates(rows, gi, n_gt, bound, d, *, k, group):
    """The candidate set of :func:`upper_order_stats`: [B,R,(k-1)*group + k + (k-1)].

    The groups ``gi`` [B,R,k-1] of ``rows`` (slots past ``n_gt`` [B,R,1]: -inf), k copies
    of ``bound`` [B,R,1], and k - 1 - d [B] copies of +inf (the rest -inf).
    """
    shp = tf.shape(rows)
    b, r = shp[0], rows.shape[1]
    n_groups = rows.shape[-1] // group
    slots = tf.range(1, k, dtype=tf.int32)
    gi = tf.minimum(gi, n_groups - 1)
    vals = tf.gather(tf.reshape(rows, [b, r, n_groups, group]), gi, batch_dims=2)  # [B,R,k-1,group]
    vals = tf.where(slots[:, None] <= n_gt[..., None], vals, -np.inf)
    plus = tf.where(tf.range(k - 1)[None, :] < (k - 1 - d)[:, None], np.inf, -np.inf)  # [B,k-1]
    return tf.concat([tf.reshape(vals, [b, r, (k - 1) * group]), tf.broadcast_to(bound, [b, r, k]),
                      tf.broadcast_to(plus[:, None, :], [b, r, k - 1])], -1)


def upper_order_stats(rows, gmax, counts, q, k, group, xla=False):
    """The two order statistics ``np.percentile(valid, q)`` interpolates, for ``q`` >= 50.

    Selected exactly with two ``NthElement`` calls on small arrays. ``rows`` holds N
    values per row (invalid ones -inf, no NaN), ``gmax`` the maxima of its consecutive
    groups of ``group`` entries. With d the rank from the top of the lower order
    statistic (d <= k - 1):

    1. ``bound`` = the k-th largest group maximum. At least k entries are >= bound,
       so the row's top k all are; every entry > bound lies in one of the (< k)
       groups whose maximum is > bound.
    2. Those groups are packed into k - 1 slots (running count + ``searchsorted``;
       empty slots -inf) and k copies of ``bound`` are appended: the top k of this
       candidate set equal the row's top k (ties at the bound included).
    3. d differs per row (tissue pixel counts); k - 1 - d copies of +inf are appended
       so that the wanted value has rank k - 1 from the top in every row, and one
       ``NthElement`` at that common position picks it.
    4. The next order statistic is the same value when enough entries tie with it,
       else the smallest candidate above it.

    Exact (equal to sorting the row), also with ties, -inf padding and monotone rows.

    Args:
        rows: float32 [B, R, N] with N static and a multiple of ``group``.
        gmax: float32 [B, R, N / group].
        counts: int32 [B]; valid entries per row (the same for the R rows of an item).
        q: float >= 50.
        k: int; top values that cover the tail (:func:`k_for`), >= 2.
        group: int.
        xla: bool. Run the small elementwise steps (running count, candidate set,
            next value) as XLA kernels.

    Returns:
        (lo, hi, t): float32 [B, R], [B, R], [B, 1]; the percentile is
        ``lerp(lo, hi, t)`` (or of a monotone re-parametrisation of lo and hi).
    """
    shp = tf.shape(rows)
    b, r = shp[0], rows.shape[1]
    n_groups = gmax.shape[-1]
    n = tf.cast(counts, tf.float64)
    p = (float(q) / 100.0) * tf.maximum(n - 1.0, 0.0)
    f = tf.floor(p)
    t = tf.cast(p - f, tf.float32)[:, None]
    d = tf.clip_by_value(tf.cast(n - 1.0 - f, tf.int32), 0, k - 1)  # [B] rank of s_f from the top
    bound = tf.raw_ops.NthElement(input=gmax, n=n_groups - k)[..., None]  # [B,R,1]
    running = kernel(_running_count_above, xla)(gmax, bound)  # [B,R,G]
    flat = tf.reshape(running, [-1, n_groups])
    slots = tf.range(1, k, dtype=tf.int32)  # k - 1 slots
    gi = tf.searchsorted(flat, tf.tile(slots[None], [tf.shape(flat)[0], 1]), side="left")
    gi = tf.reshape(gi, [b, r, k - 1])
    aug = kernel(_candidates, xla, k=k, group=group)(rows, gi, running[..., -1:], bound, d)
    size = (k - 1) * group + k + (k - 1)
    pos = size - k  # ascending position of rank k - 1 from the top
    lo = tf.raw_ops.NthElement(input=aug, n=pos)  # [B,R]
    le, above = kernel(_next_above, xla)(aug, lo)
    hi = tf.where((le >= float(pos + 2)) | tf.equal(d, 0)[:, None], lo, above)
    return lo, hi, t


# ---------------------------------------------------------------- entry point


def upper_percentiles(rows, counts, q, *, k, group, gmax=None, xla=False, value_fns=None):
    """``np.percentile`` (linear) of each row of ``rows`` for an upper-tail ``q``, exactly.

    Args:
        rows: float32 [B, R, N]; invalid entries -inf.
        counts: int32 [B]; valid entries per row.
        q: float >= 50. The percentile.
        k: int (or int32 scalar when N is not static); :func:`k_for` of the tail.
        group: int. Group size of the prefilter (1: plain ``top_k``).
        gmax: optional float32 [B, R, N / group]; the group maxima when a pass made them.
        xla: bool. XLA-compile the small steps of the selection (static shapes only).
        value_fns: optional sequence of R callables, one per row: a monotone increasing
            re-parametrisation applied to the two selected order statistics before the
            interpolation (e.g. pseudo-angle -> angle). None: interpolate the values.

    Returns:
        float32 [B, R].
    """
    n_static = rows.shape[-1]
    n_rows = rows.shape[1]
    if group_path(n_static, k, group):
        if gmax is None:
            gmax = group_max(rows, group)
        lo, hi, t = upper_order_stats(rows, gmax, counts, q, k, group, xla)
        if value_fns is None:
            return lerp(lo, hi, t)
        return tf.stack([lerp(fn(lo[:, i]), fn(hi[:, i]), t[:, 0])
                         for i, fn in enumerate(value_fns)], -1)
    top = top_desc(rows, k, group, gmax, sort=False)  # [B,R,k], unordered
    fns = value_fns if value_fns is not None else [None] * n_rows
    return tf.stack([percentile_from_top(top[:, i], counts, q, fn, presorted=False)
                     for i, fn in enumerate(fns)], -1)
