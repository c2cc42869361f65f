"""Batched, in-graph Macenko stain normalisation.

More From Less (Farndale et al.), §2.3: "All patches are colour-normalised
using the Macenko method" (Macenko et al., "A method for normalizing histology
slides for quantitative analysis", ISBI 2009). This module is that step,
written as one batched TensorFlow graph, so it runs inside
``tf.data.Dataset.map`` (after ``batch``), inside a Keras model and on NumPy
arrays, with no Python loop over images and no ``py_function``.

Algorithm (the reference is torchstain's numpy backend, itself ported from
schaugf/HEnorm_python; defaults Io=240, alpha=1, beta=0.15):

1. OD = -ln((I + 1) / Io) for every pixel.
2. Tissue = pixels whose OD is >= beta in *every* channel (optionally also
   Rec. 601 luma / 255 < ``luminosity_threshold``).
3. Unbiased 3x3 covariance of the tissue OD, batched ``eigh``; the plane of the
   two largest eigenvectors.
4. phi = atan2(projection on the largest, projection on the second).
5. phi_min / phi_max = alpha-th / (100 - alpha)-th percentiles of phi over the
   tissue (linear interpolation, as ``np.percentile``); v = E [cos phi, sin phi].
6. Haematoxylin is the vector with the larger red OD component.
7. Concentrations C = pinv(HE) OD (closed-form least squares of a 3x2 system).
8. maxC = 99th percentile of each row of C over all pixels.
9. Output = Io exp(-HE_ref C maxC_ref / maxC), clipped to 255 and truncated to
   uint8 (torchstain's ``astype(np.uint8)``).

Batched design. Percentiles are exact order statistics, never a full sort.
Values outside the tissue are pushed to -inf; the k-th largest maximum of
groups of 16 consecutive values (``NthElement``) bounds the ~1 % tail from
below, the fewer than k groups above that bound are packed into a small
candidate set (with k copies of the bound for ties and +inf padding that puts
each image's wanted rank at one common position), and one ``NthElement`` on
that set picks the order statistic (:func:`_upper_order_stats`), which is
interpolated exactly like ``np.percentile``. The angle percentiles are
selected on a pseudo-angle (:func:`pseudo_angle`, a strictly increasing
function of ``atan2`` made of a few multiply-adds), and only the selected
order statistics are turned into angles before the interpolation, so no
per-pixel ``atan2`` is evaluated. The recolouring folds pinv(HE), the maxC
rescale and HE_ref into one 3x3 matrix per image. The four per-pixel passes
(OD + tissue mask + covariance sums; pseudo-angles; concentrations;
recolouring) and the small steps of the selection each run as one
XLA-compiled kernel when the tile size is static (the training pipeline, the
Keras layer, ``histokd normalize``); ``HISTOKD_MACENKO_XLA=0`` or an unknown
tile size runs the same math with TensorFlow's kernels (compiling per tile
size would be unbounded there) and the previous ``top_k`` selection
(:func:`_top_desc`) where N is unknown.

Speed. ``macenko_transform`` runs the batch in chunks of 4 tiles
(``tf.map_fn``, two chunks in flight; padded, so a tile's output does not
depend on its batch): a chunk's intermediates stay in cache and the two cores
work on different chunks instead of synchronising on every op of one huge
batch; ``histokd normalize`` and the benchmark size TensorFlow's pools for
that (intra-op 1, inter-op 2). XLA:CPU is asked to run each kernel's steps on
the calling thread (:func:`prefer_sequential_xla_cpu`): by default it spreads
them over the intra-op pool, where the two chunks' kernels queue behind each
other (1.65-1.7 cores busy instead of 1.85). ``scripts/bench_stain.py`` (256
Kather tiles 224x224, 2 cores, medians of 5 runs, three runs; AVX-512 Xeon,
2026-12-05): 1,369-1,407 tiles/s against torchstain torch 238-241, numpy
153-155, macenko-pca 156-159, tensorflow 35-37 in the same runs, i.e.
5.75-5.83x the fastest peer, at 91-96 % of the floor pass (1,422-1,500; each
run's figures are in README.md). With TensorFlow's default pools (2, 2) the
same machine gives 986 tiles/s (4.1x). What each step bought, side by side on that machine
(tiles/s, interleaved runs): group-max ``top_k`` selection + shared covariance
products, the previous design, ~900-990; the ``NthElement`` selection and one
fused integrand per covariance sum ~1,000-1,070; sequential XLA:CPU kernels
~1,280-1,340; chunks of 4 instead of 8 +4-5 %. Per 8 tiles on one core the
step now costs ~11 ms: ~50 % the per-pixel passes (the OD pass alone ~3 ms:
XLA:CPU hands each of the ten covariance sums to its reduction library as a
separate array), ~40 % the four selections (``NthElement`` ~1.7 ms, the
rest packing and counting).

Measured and rejected (same process, side by side): OD and recolouring
through 256-entry lookup tables (``tf.gather`` is 2-5x slower than
``log``/``exp``); per-image histograms (``bincount``/``unsorted_segment_*``
cost 1.5-11 ns per value, more than the selection); ``top_k`` anywhere in the
selection (~20 ns per value for k of a few hundred, against ~4-8 for
``NthElement``); packing candidates by ``tf.where`` (the chunk loop then ran on
~1.3 cores); strided groups (a tighter bound, but the strided gather costs
what it saves); covariance sums as a matrix product (oneDNN, XLA dot) or as
one variadic XLA reduction (no faster than ten fused sums); the two angle
tails from one row with group minima (XLA fused it worse); TensorFlow's
pools at (2, 2), (2, 1) or (1, 4) and 3-4 chunks in flight (all slower than
(1, 2) with two). Estimating the statistics on a pixel subsample breaks
parity (stride 2 already puts 9 % of real Kather tiles above 1 grey level),
and compiling the whole step with XLA is slower (XLA's CPU ``top_k`` and
``atan2`` are several times slower than TensorFlow's kernels).

Deliberate differences from torchstain's numpy backend (parity is tested in
``tests/stain/test_parity.py``: mean absolute difference < 0.05 grey levels per
tile on real Kather tiles, identical H/E order):

* float32 instead of float64, and a one-pass covariance. The output is
  truncated to integers, so a pixel whose exact value lies within ~1e-4 of an
  integer can move by one grey level. For the same reason the XLA passes and
  TensorFlow's kernels (unknown tile sizes, ``HISTOKD_MACENKO_XLA=0``), whose
  ``log``/``exp`` round differently in the last bit, agree to one grey level
  on well under 1 % of pixels rather than bit for bit.
* Robustness policy (torchstain has none: it raises or returns NaN). A tile is
  *passed through unchanged*, and reported as such, when fewer than
  ``min_tissue_pixels`` pixels pass the tissue mask (background-only,
  near-white, tiny tissue); when the third eigenvalue holds more than
  ``max_residual_fraction`` of the tissue OD variance (no stain plane: pure
  noise); when the largest eigenvalue exceeds ``max_eigen_ratio`` times the
  second, or the two stain vectors are less than ``min_stain_angle`` degrees
  apart (a single stain: the least squares would be ill-conditioned); when a
  stain vector has an OD component below ``min_stain_component`` (not a
  stain); or when anything is non-finite. The decision is a per-image
  ``tf.where`` (slideflow's ``original_on_error``), so it needs no Python
  branching. Known limit: a single-stain tile with strong sensor or JPEG noise
  looks like faint two-stain tissue to these statistics and is normalised
  (finite, but its colours are not meaningful).

Example:
    >>> import numpy as np
    >>> from histokd.stain import MacenkoNormalizer
    >>> norm = MacenkoNormalizer(target="torchstain")
    >>> tiles = np.full((2, 64, 64, 3), 255, np.uint8)   # background only
    >>> out, passed = norm.transform(tiles, return_passthrough=True)
    >>> passed.tolist()   # both tiles returned unchanged
    [True, True]
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

import keras

from histokd.errors import StainError

# torchstain's defaults (torchstain/numpy/normalizers/macenko.py).
DEFAULT_IO = 240.0
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 0.15

# Robustness policy defaults (module docstring). Chosen from the statistics of
# real H&E tiles (Kather 2016: residual fraction <= 0.06, eigen ratio <= 115,
# stain angle >= 11 degrees, components >= 0.12) against pure noise (residual
# fraction ~0.33) and clean single-stain tiles (eigen ratio >= 400, angle < 5).
DEFAULT_MIN_TISSUE_PIXELS = 100
DEFAULT_MAX_RESIDUAL_FRACTION = 0.2
DEFAULT_MAX_EIGEN_RATIO = 300.0
DEFAULT_MIN_STAIN_ANGLE = 6.0
DEFAULT_MIN_STAIN_COMPONENT = -0.1

_MAXC_PERCENTILE = 99.0

#: Names and defaults of the constants every Macenko entry point accepts.
CONSTANT_DEFAULTS: Dict[str, Any] = {
    "io": DEFAULT_IO,
    "alpha": DEFAULT_ALPHA,
    "beta": DEFAULT_BETA,
    "luminosity_threshold": None,
    "min_tissue_pixels": DEFAULT_MIN_TISSUE_PIXELS,
    "max_residual_fraction": DEFAULT_MAX_RESIDUAL_FRACTION,
    "max_eigen_ratio": DEFAULT_MAX_EIGEN_RATIO,
    "min_stain_angle": DEFAULT_MIN_STAIN_ANGLE,
    "min_stain_component": DEFAULT_MIN_STAIN_COMPONENT,
}


def check_constants(**constants) -> Dict[str, Any]:
    """Validate Macenko constants; returns the full set with defaults filled in.

    Raises:
        StainError: an unknown name or a value out of range, with the fix.
    """
    unknown = sorted(set(constants) - set(CONSTANT_DEFAULTS))
    if unknown:
        raise StainError(
            f"unknown Macenko constant(s) {unknown}; valid names: {sorted(CONSTANT_DEFAULTS)}"
        )
    c = dict(CONSTANT_DEFAULTS)
    c.update({k: v for k, v in constants.items()})
    try:
        c["io"] = float(c["io"])
        c["alpha"] = float(c["alpha"])
        c["beta"] = float(c["beta"])
        c["min_tissue_pixels"] = int(c["min_tissue_pixels"])
        for k in ("max_residual_fraction", "max_eigen_ratio", "min_stain_angle",
                  "min_stain_component"):
            c[k] = float(c[k])
        if c["luminosity_threshold"] is not None:
            c["luminosity_threshold"] = float(c["luminosity_threshold"])
    except (TypeError, ValueError) as e:
        raise StainError(f"Macenko constants must be numbers: {e}") from None
    if not 0.0 < c["io"] <= 65535.0:
        raise StainError(f"io (transmitted light) must be in (0, 65535], got {c['io']}; torchstain uses 240")
    if not 0.0 <= c["alpha"] < 50.0:
        raise StainError(f"alpha (angle percentile) must be in [0, 50), got {c['alpha']}; torchstain uses 1")
    if not c["beta"] >= 0.0:
        raise StainError(f"beta (OD threshold) must be >= 0, got {c['beta']}; torchstain uses 0.15")
    lt = c["luminosity_threshold"]
    if lt is not None and not 0.0 < lt <= 1.0:
        raise StainError(f"luminosity_threshold must be in (0, 1] or None, got {lt}; StainTools uses 0.8")
    return c


# --------------------------------------------------------------------------- fit


@dataclass(frozen=True)
class MacenkoFit:
    """A fitted Macenko target: stain matrix and 99th-percentile max concentrations.

    JSON-able; stored in run metadata and in exported models.

    Args:
        stain_matrix: 3x2 nested sequence. Rows R, G, B; columns haematoxylin, eosin
            (unit OD vectors).
        max_concentrations: 2 floats. 99th-percentile concentrations of H and E.
        source: str. Where the fit came from ("preset:torchstain", "image:PATH", ...).
        extra: dict. Free-form JSON-able notes (e.g. the constants used to fit).

    Example:
        >>> fit = MacenkoFit([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],
        ...                  [1.9705, 1.0308], source="preset:torchstain")
        >>> MacenkoFit.from_json(fit.to_json()) == fit
        True
    """

    stain_matrix: Tuple[Tuple[float, float], ...]
    max_concentrations: Tuple[float, float]
    source: str = ""
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        try:
            he = np.asarray(self.stain_matrix, dtype=np.float64)
            mc = np.asarray(self.max_concentrations, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise StainError(f"a Macenko fit must hold numbers: {e}") from None
        if he.shape != (3, 2):
            raise StainError(
                f"a Macenko stain matrix must be 3x2 (rows R,G,B; columns H,E), got shape "
                f"{he.shape}; pass [[H_r,E_r],[H_g,E_g],[H_b,E_b]]"
            )
        if mc.shape != (2,):
            raise StainError(
                f"max_concentrations must hold 2 numbers (H, E), got {mc.tolist()}"
            )
        if not (np.all(np.isfinite(he)) and np.all(np.isfinite(mc)) and np.all(mc > 0)):
            raise StainError(
                "a Macenko fit must be finite with positive max concentrations; got "
                f"stain_matrix={he.tolist()}, max_concentrations={mc.tolist()}. Refit on an "
                "image with H&E-stained tissue or use target='torchstain'"
            )
        object.__setattr__(self, "stain_matrix", tuple(tuple(float(v) for v in r) for r in he))
        object.__setattr__(self, "max_concentrations", tuple(float(v) for v in mc))
        object.__setattr__(self, "source", str(self.source))
        object.__setattr__(self, "extra", dict(self.extra or {}))

    @property
    def he(self) -> np.ndarray:
        """The 3x2 stain matrix as a float32 array."""
        return np.asarray(self.stain_matrix, dtype=np.float32)

    @property
    def max_c(self) -> np.ndarray:
        """The two max concentrations as a float32 array."""
        return np.asarray(self.max_concentrations, dtype=np.float32)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict (inverse of :meth:`from_dict`)."""
        d = {
            "stain_matrix": [list(r) for r in self.stain_matrix],
            "max_concentrations": list(self.max_concentrations),
            "source": self.source,
        }
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MacenkoFit":
        if isinstance(d, MacenkoFit):
            return d
        try:
            return cls(
                d["stain_matrix"], d["max_concentrations"], d.get("source", ""),
                dict(d.get("extra", {}) or {}),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise StainError(
                f"not a Macenko fit: {d!r} ({type(e).__name__}: {e}); expected a dict with "
                "'stain_matrix' (3x2) and 'max_concentrations' (2 numbers), as written by "
                "MacenkoFit.to_dict()"
            ) from None

    def to_json(self, path: Optional[str] = None) -> str:
        """JSON text; also written to ``path`` when given."""
        s = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(s + "\n")
        return s

    @classmethod
    def from_json(cls, text_or_path: str) -> "MacenkoFit":
        """Parse JSON text, or read it from a file path."""
        text = text_or_path
        if not text.lstrip().startswith("{") and os.path.isfile(text):
            with open(text, encoding="utf-8") as f:
                text = f.read()
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise StainError(f"not a JSON Macenko fit ({e}): {text_or_path[:200]!r}") from None


# ----------------------------------------------------------------- batched core


def tissue_threshold(io: float = DEFAULT_IO, beta: float = DEFAULT_BETA) -> int:
    """Largest uint8 value v with -ln((v+1)/io) >= beta in float64 (-1 if none).

    A pixel is tissue iff its brightest channel is <= this value, which lets the
    mask be computed on the uint8 input exactly as torchstain's float64 test.
    """
    v = np.arange(256, dtype=np.float64)
    ok = -np.log((v + 1.0) / io) >= beta
    return int(np.nonzero(ok)[0].max()) if ok.any() else -1


def _uses_groups(n_static, k, group: int) -> bool:
    """Whether :func:`_top_desc` runs its two-stage selection for these sizes."""
    return group > 1 and isinstance(k, int) and n_static is not None and k * group * 2 < n_static


def _group_max(rows, group: int):
    """[B,R,N] -> [B,R,ceil(N/group)]: maxima of ``group`` consecutive entries
    (-inf padding); computed inside the per-pixel XLA passes when they run."""
    n = rows.shape[-1]
    pad = (-n) % group
    if pad:
        rows = tf.pad(rows, [[0, 0], [0, 0], [0, pad]], constant_values=-np.inf)
    shp = tf.shape(rows)
    return tf.reduce_max(tf.reshape(rows, [shp[0], shp[1], (n + pad) // group, group]), axis=-1)


def _top_desc(rows, k, group: int = 16, gmax=None, sort: bool = True):
    """The ``k`` largest entries of each row, sorted descending (``sort=False``: in no
    particular order, for :func:`_percentile_from_top` with ``presorted=False``); exact.

    Two-stage selection: the k largest values of a row all lie in the k groups
    (of ``group`` consecutive entries) with the largest maxima, so ``top_k`` runs
    over N/group group maxima and then over k*group candidates instead of over N
    values, and far less in the worst case (monotone rows, e.g. an intensity
    gradient). The smallest of those k group maxima, T, is a lower bound of the
    k-th largest value (k distinct entries are >= T), so candidates below T are
    set to -inf before the second ``top_k``: ~k of the k*group candidates
    remain, which halves the cost of that ``top_k``.

    Args:
        rows: float32 [B, R, N].
        k: int (or int32 scalar tensor when N is not static).
        group: int. Group size; 1 disables the two-stage selection.
        gmax: optional [B, R, ceil(N/group)]; ``_group_max(rows, group)`` when
            already computed (by the pass that made ``rows``).

    Returns:
        float32 [B, R, k].
    """
    n_static = rows.shape[-1]
    if _uses_groups(n_static, k, group):
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


def _lerp(lo, hi, t):
    """np.percentile's linear interpolation, evaluated from the nearer end like numpy."""
    return tf.where(t >= 0.5, hi - (hi - lo) * (1.0 - t), lo + (hi - lo) * t)


def _percentile_from_top(top, counts, q, value_fn=None, presorted=True):
    """``np.percentile(valid, q)`` (linear) from the top values of a row.

    With ``presorted=False`` the k values come in any order. The two order statistics
    needed sit ``k - 1 - d`` and ``k - d`` places from the *bottom* of the k values
    (d: rank from the top), and a row of N pixels at the 99th percentile has
    d = k - 2: only the 3 smallest of the k values need ordering (``top_k`` of the
    negated values with k = the largest such bottom rank + 1 over the batch), not all
    k. Rows with fewer valid values (little tissue) need more of them ordered; the
    result is the same exact order statistic either way.

    Args:
        top: float32 [B, k]; the k largest valid values (-inf padding), descending
            unless ``presorted=False``.
        counts: int32 [B]; number of valid values in the row.
        q: python float; the percentile. The needed ranks must be among the k values.
        value_fn: optional callable mapping the two selected order statistics to
            the quantity to interpolate (a monotone increasing re-parametrisation
            of the selected values, e.g. pseudo-angle -> angle).

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
    return _lerp(lo, hi, t)


_TRI64 = np.triu(np.ones((64, 64), np.float32))


def _running_count_above(gmax, bound):
    """Inclusive running count of ``gmax > bound`` along the last axis, int32 [B,R,G].

    Blocks of 64 are counted by a product with a triangular matrix of ones (exact in
    float32) plus the running block totals: XLA's CPU scan (a windowed reduction) is
    ~1.7x slower on these sizes."""
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
    (The count is a float32 sum, exact below 2**24 entries: XLA's CPU reduction
    library handles float sums several times faster than int32 ones.)"""
    le = tf.reduce_sum(tf.where(aug <= lo[..., None], 1.0, 0.0), -1)
    above = tf.reduce_min(tf.where(aug > lo[..., None], aug, np.inf), -1)
    return le, above


def _candidates(rows, gi, n_gt, bound, d, *, k, group):
    """The candidate set of :func:`_upper_order_stats`: [B,R,(k-1)*group + k + (k-1)].

    The groups ``gi`` [B,R,k-1] of ``rows`` (slots past ``n_gt`` [B,R,1]: -inf), k copies
    of ``bound`` [B,R,1], and k - 1 - d [B] copies of +inf (the rest -inf)."""
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


def _upper_order_stats(rows, gmax, counts, q, k, group, xla=False):
    """The two order statistics that ``np.percentile(valid, q)`` interpolates, for an
    upper-tail ``q`` (>= 50), selected exactly with two ``NthElement`` calls on small arrays.

    ``rows`` holds N values per row (invalid ones -inf, no NaN: the per-pixel passes
    map NaN to -inf), ``gmax`` the maxima of its consecutive groups of ``group``
    entries. With d the rank from the top of the lower order statistic (d <= k - 1):

    1. ``bound`` = the k-th largest group maximum (``NthElement`` over N/group values).
       At least k entries are >= bound, so the row's top k all are; every entry
       > bound lies in one of the (< k) groups whose maximum is > bound.
    2. Those groups are packed into k - 1 slots (running count + ``searchsorted``; empty
       slots -inf) and k copies of ``bound`` are appended: the top k of this
       candidate set equal the row's top k (ties at the bound included).
    3. d differs per row (tissue pixel counts); k - 1 - d copies of +inf are appended
       so that the wanted value has rank k - 1 from the top in every row, and one
       ``NthElement`` at that common position picks it.
    4. The next order statistic is the same value when enough entries tie with it,
       else the smallest candidate above it.

    Exact (equal to sorting the row), also with ties, -inf padding and monotone rows.
    Against ``top_k`` over the group maxima and then over the k*group candidates
    (the previous design, kept in :func:`_top_desc`) it does the selection in 25-35 %
    less time (16 rows of 50,176 values, one core): TensorFlow's ``top_k`` costs
    ~20 ns per entry for k of a few hundred, ``NthElement`` ~8.

    Args:
        rows: float32 [B, R, N] with N static and a multiple of ``group``.
        gmax: float32 [B, R, N / group].
        counts: int32 [B]; valid entries per row (the same for the R rows of an item).
        q: python float >= 50.
        k: python int; top values that cover the tail (:func:`_k_for`), >= 2.
        group: python int.
        xla: run the small elementwise steps (running count, candidate set, next value)
            as XLA kernels.

    Returns:
        (lo, hi, t): float32 [B, R], [B, R], [B, 1]; the percentile is
        ``_lerp(lo, hi, t)`` (or of a monotone re-parametrisation of lo and hi).
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
    running = _kernel(_running_count_above, xla)(gmax, bound)  # [B,R,G]
    flat = tf.reshape(running, [-1, n_groups])
    slots = tf.range(1, k, dtype=tf.int32)  # k - 1 slots
    gi = tf.searchsorted(flat, tf.tile(slots[None], [tf.shape(flat)[0], 1]), side="left")
    gi = tf.reshape(gi, [b, r, k - 1])
    aug = _kernel(_candidates, xla, k=k, group=group)(rows, gi, running[..., -1:], bound, d)
    size = (k - 1) * group + k + (k - 1)
    pos = size - k  # ascending position of rank k - 1 from the top
    lo = tf.raw_ops.NthElement(input=aug, n=pos)  # [B,R]
    le, above = _kernel(_next_above, xla)(aug, lo)
    hi = tf.where((le >= float(pos + 2)) | tf.equal(d, 0)[:, None], lo, above)
    return lo, hi, t


def _group_path(n_static, k, group: int) -> bool:
    """Whether :func:`_upper_order_stats` applies (static N, a multiple of the group)."""
    return _uses_groups(n_static, k, group) and n_static % group == 0 and k >= 2


def _k_for(n_static, n_dynamic, tail_percent: float):
    """How many top values cover a tail of ``tail_percent`` % of N values (+2 for interpolation)."""
    if n_static is not None:
        return int(max(1, min(n_static, math.ceil(tail_percent / 100.0 * max(n_static - 1, 0)) + 2)))
    kf = tf.math.ceil(tail_percent / 100.0 * tf.cast(tf.maximum(n_dynamic - 1, 0), tf.float32)) + 2.0
    return tf.maximum(1, tf.minimum(n_dynamic, tf.cast(kf, tf.int32)))


def pseudo_angle(x, y):
    """A strictly increasing function of ``atan2(y, x)`` on (-pi, pi], in (-2, 2].

    ``d = y / (|x| + |y|)`` is ``d`` for x >= 0, ``2 - d`` for x < 0 <= y and
    ``-2 - d`` for x, y < 0 (0 at the origin): a few multiply-adds and one
    division instead of an ``atan2``, so order statistics of angles can be
    selected on it and only the selected values converted
    (:func:`pseudo_angle_to_angle`).
    """
    s = tf.abs(x) + tf.abs(y)
    d = y / tf.where(s > 0.0, s, 1.0)
    return tf.where(x >= 0.0, d, tf.where(y >= 0.0, 2.0 - d, -2.0 - d))


def pseudo_angle_to_angle(p):
    """Inverse of :func:`pseudo_angle`: the angle atan2(y, x) in (-pi, pi]."""
    back = tf.abs(p) > 1.0  # x < 0
    d = tf.where(back, tf.where(p > 0.0, 2.0 - p, -2.0 - p), p)
    r = 1.0 - tf.abs(d)
    return tf.math.atan2(d, tf.where(back, -r, r))


# Per-pixel passes of the decomposition and of the recolouring. On CPU each runs
# as one XLA-fused loop (see _kernel) instead of a chain of TensorFlow ops that
# each stream the batch through memory; the math is the same either way.


def _od_and_stats(x, io, threshold, luminosity_threshold):
    """x [B,N,3] (uint8, or float 0..255) -> (OD planar [B,3,N], tissue mask [B,N] float,
    sums [B,10] = (n, s_r, s_g, s_b, s_rr, s_rg, s_rb, s_gg, s_gb, s_bb) over tissue)."""
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
    # Each sum's integrand is written from od and the mask directly (no shared
    # masked products): XLA's CPU backend then fuses every integrand into its own
    # reduction instead of materialising the shared products in memory (8 tiles
    # of 224^2, one core: this pass 4.3 -> 3.1 ms).
    zero = tf.zeros_like(r)
    sums = [_pixel_sum(tf.where(mask, t, zero))
            for t in (tf.ones_like(r), r, g, b, r * r, r * g, r * b, g * g, g * b, b * b)]
    return od, maskf, tf.stack(sums, axis=1)


def _pixel_sum(t):
    """[B,N] -> [B]: the sum over pixels as 128 interleaved partial sums (one reduction
    over the outer axis of [B, N/128, 128], then over the 128), when N allows. XLA's CPU
    code vectorises a reduction over an outer axis and not one over the minor axis;
    ten separate sums of the pass also fuse better than one over a stacked [B,10,N]
    array (the pass: ~20 % less time on 8 tiles of 224², same sums to float32 rounding)."""
    n = t.shape[-1]
    if n is None or n % 128:
        return tf.reduce_sum(t, axis=-1)
    return tf.reduce_sum(tf.reduce_sum(tf.reshape(t, [-1, n // 128, 128]), axis=1), axis=-1)


def _angle_rows(od, maskf, plane, group=0):
    """[B,2,N]: pseudo-angle of each tissue pixel in the stain plane (row 0) and its
    negation (row 1), -inf outside the tissue; for the upper and lower tails.
    With ``group``, also their :func:`_group_max`."""
    px = tf.reduce_sum(od * plane[:, :, 0:1], axis=1)  # on the second eigenvector
    py = tf.reduce_sum(od * plane[:, :, 1:2], axis=1)  # on the largest
    p = pseudo_angle(px, py)
    valid = (maskf > 0.0) & tf.logical_not(tf.math.is_nan(p))  # NaN only from NaN/negative float input
    rows = tf.stack([tf.where(valid, p, -np.inf), tf.where(valid, -p, -np.inf)], axis=1)
    return (rows, _group_max(rows, group)) if group else rows


def _concentrations(od, pinv, group=0):
    """C = pinv(HE) OD: [B,2,3] x [B,3,N] -> [B,2,N], as three multiply-adds per pixel.
    With ``group``, also its :func:`_group_max`."""
    # (explicit slices, no new-axis indexing: grappler mis-shapes the latter here)
    c = pinv[:, :, 0:1] * od[:, 0:1] + pinv[:, :, 1:2] * od[:, 1:2] + pinv[:, :, 2:3] * od[:, 2:3]
    c = tf.where(tf.math.is_nan(c), -np.inf, c)  # (the selection needs an order; such tiles pass through)
    return (c, _group_max(c, group)) if group else c


def _recolour(od, m, io):
    """io * exp(m OD) clipped to 255, truncated to uint8 (torchstain's astype), as [B,N,3].

    od: OD planar [B,3,N]; m: [B,3,3] (output channel, OD channel)."""
    z = (m[:, :, 0:1] * od[:, 0:1] + m[:, :, 1:2] * od[:, 1:2] + m[:, :, 2:3] * od[:, 2:3]) + math.log(io)
    out = tf.cast(tf.minimum(tf.exp(z), 255.0), tf.uint8)  # exp > 0: truncation == floor
    return tf.transpose(out, [0, 2, 1])


def xla_enabled() -> bool:
    """Whether the per-pixel passes are XLA-compiled (``HISTOKD_MACENKO_XLA=0`` turns it off)."""
    return os.environ.get("HISTOKD_MACENKO_XLA", "1").strip().lower() not in ("0", "false", "no", "off")


_KERNELS: Dict[Tuple, Any] = {}

#: XLA:CPU option set by :func:`prefer_sequential_xla_cpu` (see there).
XLA_CPU_SEQUENTIAL_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
_XLA_CPU_CHECKED = False


def _xla_knows_flag(name: str) -> bool:
    """Whether the installed TensorFlow's XLA defines the debug option ``name`` (its
    shared libraries hold the name). XLA aborts the process on an unknown flag in
    ``XLA_FLAGS``, so a flag is only ever added after this check."""
    import glob
    import mmap

    root = os.path.dirname(tf.__file__)
    paths = sorted(glob.glob(os.path.join(root, "libtensorflow_cc*"))
                   + glob.glob(os.path.join(root, "libtensorflow_framework*"))
                   + glob.glob(os.path.join(root, "python", "_pywrap_tensorflow_internal*")))
    needle = name.encode()
    for path in paths:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def prefer_sequential_xla_cpu() -> bool:
    """Ask XLA:CPU to run each compiled kernel's steps one after another on the calling
    thread (``--xla_cpu_enable_concurrency_optimized_scheduler=false``); returns whether
    the flag is in ``XLA_FLAGS`` afterwards.

    By default XLA:CPU runs independent steps of a kernel concurrently on TensorFlow's
    intra-op pool. The Macenko transform already keeps every core busy with whole
    chunks of tiles (one chunk per core); the default then makes the two chunks'
    kernels queue for the same pool: the OD pass alone ran at 3.3 ms per 8 tiles on one
    stream and 3.6 ms per chunk with two in flight, against 3.0 and 1.7 with the flag,
    and the whole transform went from ~1,000-1,070 to ~1,280-1,340 tiles/s
    (``scripts/bench_stain.py``, 2 cores). The flag only changes how XLA:CPU schedules
    its steps, not what they compute.

    XLA reads ``XLA_FLAGS`` once, at the first XLA compilation of the process, so this
    is called before the first Macenko kernel is built and has no effect if XLA already
    compiled something. It adds nothing when the user's ``XLA_FLAGS`` already sets the
    option, when ``HISTOKD_XLA_CPU_CONCURRENCY=1`` (keep XLA's default), or when the
    installed XLA does not know the option (XLA would abort on it).
    """
    global _XLA_CPU_CHECKED
    flags = os.environ.get("XLA_FLAGS", "")
    if _XLA_CPU_CHECKED or XLA_CPU_SEQUENTIAL_FLAG in flags:
        return XLA_CPU_SEQUENTIAL_FLAG in flags
    _XLA_CPU_CHECKED = True
    keep = os.environ.get("HISTOKD_XLA_CPU_CONCURRENCY", "").strip().lower()
    if keep in ("1", "true", "yes", "on") or not _xla_knows_flag(XLA_CPU_SEQUENTIAL_FLAG):
        return False
    os.environ["XLA_FLAGS"] = (flags + f" --{XLA_CPU_SEQUENTIAL_FLAG}=false").strip()
    return True


def _kernel(fn, xla: bool, **static):
    """``fn`` with keyword constants bound, XLA-compiled when ``xla`` (cached per constants).

    Only used where every shape is static (fixed tile size); XLA then compiles
    once per shape. TensorFlow's own kernels run otherwise. The first XLA kernel
    calls :func:`prefer_sequential_xla_cpu`.
    """
    if not xla:
        return lambda *a: fn(*a, **static)
    key = (fn.__name__,) + tuple(sorted(static.items()))
    k = _KERNELS.get(key)
    if k is None:
        prefer_sequential_xla_cpu()
        k = tf.function(lambda *a: fn(*a, **static), jit_compile=True, autograph=False)
        _KERNELS[key] = k
    return k


def _small_matmul(a, b):
    """``a @ b`` for batches of tiny matrices ([B,m,k] x [B,k,n], k, m, n <= 3) as a
    broadcast multiply and sum: a batched GEMM call (oneDNN) costs ~20 us per call on
    one thread and ~8x that when it splits such a batch over two threads."""
    return tf.reduce_sum(tf.expand_dims(a, -1) * tf.expand_dims(b, -3), axis=-2)


def _decompose_planar(
    x,
    *,
    io: float = DEFAULT_IO,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    luminosity_threshold: Optional[float] = None,
    min_tissue_pixels: int = DEFAULT_MIN_TISSUE_PIXELS,
    max_residual_fraction: float = DEFAULT_MAX_RESIDUAL_FRACTION,
    max_eigen_ratio: float = DEFAULT_MAX_EIGEN_RATIO,
    min_stain_angle: float = DEFAULT_MIN_STAIN_ANGLE,
    min_stain_component: float = DEFAULT_MIN_STAIN_COMPONENT,
    select_group: int = 16,
    xla: Optional[bool] = None,
):
    """:func:`macenko_decompose` on pixels ``x`` [B,N,3]; ``od`` is returned planar [B,3,N]."""
    b = tf.shape(x)[0]
    n_static = x.shape[1]
    n_pix = tf.shape(x)[1]
    if xla is None:
        xla = xla_enabled()
    xla = bool(xla) and n_static is not None
    threshold = tissue_threshold(io, beta) if x.dtype.is_integer else io * math.exp(-beta) - 1.0

    od, maskf, sums = _kernel(_od_and_stats, xla, io=float(io), threshold=threshold,
                              luminosity_threshold=luminosity_threshold)(x)
    n_tf = sums[:, 0]  # [B] (exact in float32 below 2**24 pixels)
    n_t = tf.cast(n_tf, tf.int32)

    # Unbiased covariance from the one-pass sums. Tissue OD is O(1) (>= beta), so
    # the E[xx^T] - mean mean^T cancellation costs < 2 of float32's 7 digits.
    s1 = sums[:, 1:4]
    srr, srg, srb, sgg, sgb, sbb = (sums[:, i] for i in range(4, 10))
    s2 = tf.stack([tf.stack([srr, srg, srb], -1), tf.stack([srg, sgg, sgb], -1),
                   tf.stack([srb, sgb, sbb], -1)], axis=1)  # [B,3,3]
    n_safe = tf.maximum(n_tf, 1.0)[:, None, None]
    mean = s1[:, :, None] / n_safe
    cov = (s2 - n_safe * mean * tf.linalg.matrix_transpose(mean)) / tf.maximum(
        n_tf - 1.0, 1.0
    )[:, None, None]
    cov_ok = tf.reduce_all(tf.math.is_finite(cov), axis=[1, 2]) & (n_t >= 2)
    cov = tf.where(cov_ok[:, None, None], cov, tf.eye(3, batch_shape=[b]))
    evals, evecs = tf.linalg.eigh(cov)  # ascending
    e_sec = evecs[:, :, 1]
    e_lg = evecs[:, :, 2]
    # Either eigenvector sign gives the same stain vectors; a positive largest
    # axis keeps the tissue projections positive, so phi stays away from +-pi.
    e_lg = e_lg * tf.where(tf.reduce_sum(e_lg, -1, keepdims=True) < 0, -1.0, 1.0)
    e_sec = e_sec * tf.where(tf.reduce_sum(e_sec, -1, keepdims=True) < 0, -1.0, 1.0)
    plane = tf.stack([e_sec, e_lg], axis=-1)  # [B,3,2]

    # phi = atan2(projection on largest, projection on second). The alpha-th and
    # (100-alpha)-th percentiles are selected on a pseudo-angle (same order) and
    # only the selected values are turned into angles.
    # In the XLA pass the selection's group maxima come with the rows (no extra pass).
    k_phi = _k_for(n_static, n_pix, min(alpha, 100.0 - alpha))
    fuse_phi = select_group if xla and _uses_groups(n_static, k_phi, select_group) else 0
    rows = _kernel(_angle_rows, xla, group=fuse_phi)(od, maskf, plane)  # [B,2,N] (+ maxima)
    rows, gmax = rows if fuse_phi else (rows, None)
    if _group_path(n_static, k_phi, select_group):
        if gmax is None:
            gmax = _group_max(rows, select_group)
        lo, hi, t = _upper_order_stats(rows, gmax, n_t, 100.0 - alpha, k_phi, select_group, xla)
        phi_max = _lerp(pseudo_angle_to_angle(lo[:, 0]), pseudo_angle_to_angle(hi[:, 0]), t[:, 0])
        phi_min = -_lerp(-pseudo_angle_to_angle(-lo[:, 1]), -pseudo_angle_to_angle(-hi[:, 1]), t[:, 0])
    else:
        top_phi = _top_desc(rows, k_phi, select_group, gmax, sort=False)
        phi_max = _percentile_from_top(top_phi[:, 0], n_t, 100.0 - alpha, pseudo_angle_to_angle,
                                       presorted=False)
        phi_min = -_percentile_from_top(top_phi[:, 1], n_t, 100.0 - alpha,
                                        lambda v: -pseudo_angle_to_angle(-v), presorted=False)

    def vec(a):
        return tf.reduce_sum(plane * tf.expand_dims(tf.stack([tf.cos(a), tf.sin(a)], axis=-1), 1), -1)

    v_min, v_max = vec(phi_min), vec(phi_max)  # [B,3]
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    h = tf.where(h_first, v_min, v_max)
    e = tf.where(h_first, v_max, v_min)
    he = tf.stack([h, e], axis=-1)  # [B,3,2]

    # Closed-form least squares: pinv(HE) = (HE^T HE)^-1 HE^T.
    g = _small_matmul(tf.linalg.matrix_transpose(he), he)  # [B,2,2]
    det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
    safe_det = tf.where(tf.abs(det) > 1e-12, det, 1.0)
    ginv = tf.stack(
        [tf.stack([g[:, 1, 1], -g[:, 0, 1]], -1), tf.stack([-g[:, 1, 0], g[:, 0, 0]], -1)], 1
    ) / safe_det[:, None, None]
    pinv = _small_matmul(ginv, tf.linalg.matrix_transpose(he))  # [B,2,3]

    # maxC: 99th percentile of each concentration row over all pixels.
    k_c = _k_for(n_static, n_pix, 100.0 - _MAXC_PERCENTILE)
    fuse_c = select_group if xla and _uses_groups(n_static, k_c, select_group) else 0
    conc = _kernel(_concentrations, xla, group=fuse_c)(od, pinv)  # [B,2,N] (+ maxima)
    conc, gmax = conc if fuse_c else (conc, None)
    n_all = tf.fill([b], n_pix)
    if _group_path(n_static, k_c, select_group):
        if gmax is None:
            gmax = _group_max(conc, select_group)
        lo, hi, t = _upper_order_stats(conc, gmax, n_all, _MAXC_PERCENTILE, k_c, select_group, xla)
        max_c = _lerp(lo, hi, t)
    else:
        top_c = _top_desc(conc, k_c, select_group, gmax, sort=False)  # [B,2,k], unordered
        max_c = tf.stack(
            [_percentile_from_top(top_c[:, i], n_all, _MAXC_PERCENTILE, presorted=False)
             for i in range(2)], -1
        )

    # Robustness policy.
    cos_he = tf.reduce_sum(h * e, -1) / tf.maximum(tf.norm(h, axis=-1) * tf.norm(e, axis=-1), 1e-12)
    ok = (
        cov_ok
        & (n_t >= max(int(min_tissue_pixels), 2))
        & (tf.maximum(evals[:, 0], 0.0) <= float(max_residual_fraction) * tf.reduce_sum(evals, -1))
        & (evals[:, 2] <= float(max_eigen_ratio) * evals[:, 1])
        & (evals[:, 1] > 0.0)
        & (tf.abs(cos_he) < math.cos(math.radians(float(min_stain_angle))))
        & (tf.reduce_min(he, axis=[1, 2]) >= float(min_stain_component))
        & (tf.abs(det) > 1e-6)
        & tf.reduce_all(max_c > 1e-6, -1)
        & tf.reduce_all(tf.math.is_finite(max_c), -1)
        & tf.reduce_all(tf.math.is_finite(he), [1, 2])
    )
    return {
        "od": od,
        "stain_matrix": he,
        "pinv": pinv,
        "max_c": max_c,
        "n_tissue": n_t,
        "ok": ok,
        "eigvals": evals,
    }, xla


def _pixels(images):
    """[B,H,W,3] images -> ([B,N,3] pixels with N static when H and W are)."""
    x = tf.convert_to_tensor(images)
    if x.shape.rank != 4 or (x.shape[-1] is not None and x.shape[-1] != 3):
        raise StainError(
            f"Macenko expects a batch of RGB images [B,H,W,3], got shape {x.shape}; "
            "add a batch axis (x[None]) or convert gray/RGBA to RGB first"
        )
    shape = tf.shape(x)
    x = tf.reshape(x, [shape[0], shape[1] * shape[2], 3])
    if x.shape[1] is None and images.shape[1] is not None and images.shape[2] is not None:
        x = tf.ensure_shape(x, [None, int(images.shape[1]) * int(images.shape[2]), 3])
    return x


def macenko_decompose(images, **constants):
    """Per-image Macenko decomposition of a batch, entirely in TensorFlow ops.

    Args:
        images: [B, H, W, 3] uint8 (or float holding 0..255 values) tensor.
        io, alpha, beta: float. Transmitted light, angle percentile, OD threshold.
        luminosity_threshold: float or None. Extra tissue condition luma/255 < value
            (Rec. 601 luma; a cheap stand-in for StainTools' LAB L/255 < 0.8).
        min_tissue_pixels, max_residual_fraction, max_eigen_ratio, min_stain_angle,
            min_stain_component: robustness policy (module docstring).
        select_group: int. Group size of the two-stage exact top-k (1 = plain top_k).
        xla: bool or None. XLA-compile the per-pixel passes (None: yes unless
            ``HISTOKD_MACENKO_XLA=0``; only when H and W are static).

    Returns:
        dict of tensors: ``od`` [B,N,3] float32 (OD of all pixels),
        ``stain_matrix`` [B,3,2] (H, E columns), ``pinv`` [B,2,3], ``max_c`` [B,2],
        ``n_tissue`` [B] int32, ``ok`` [B] bool (False = pass the tile through) and
        ``eigvals`` [B,3] (ascending, for diagnostics).
    """
    x = tf.convert_to_tensor(images)
    dec, _ = _decompose_planar(_pixels(x), **constants)
    dec["od"] = tf.transpose(dec["od"], [0, 2, 1])
    return dec


def _select_tiles(ok, new, old):
    """Per-tile choice without a broadcasting select in the common all-ok case."""
    def mixed():
        return tf.where(tf.reshape(ok, [-1] + [1] * (new.shape.rank - 1)), new, old)

    return tf.cond(tf.reduce_all(ok), lambda: new, mixed)


#: Tiles per chunk of the transform (see :func:`macenko_transform`).
DEFAULT_CHUNK_SIZE = 4
_PARALLEL_CHUNKS = 2


def _chunked(fn, x, chunk: int):
    """``fn`` (uint8 [chunk,H,W,3] -> (uint8 [chunk,H,W,3], bool [chunk])) over
    fixed-size chunks of ``x``; the last chunk is padded with black tiles (which
    the robustness policy passes through) and the padding is dropped."""
    b = tf.shape(x)[0]
    pad = (chunk - b % chunk) % chunk
    xp = tf.pad(x, [[0, pad], [0, 0], [0, 0], [0, 0]])
    dyn = tf.shape(xp)
    inner = [x.shape[i] if x.shape[i] is not None else dyn[i] for i in (1, 2, 3)]
    xc = tf.reshape(xp, [-1, chunk] + inner)
    out, passed = tf.map_fn(
        fn,
        xc,
        parallel_iterations=_PARALLEL_CHUNKS,
        fn_output_signature=(
            tf.TensorSpec([chunk] + list(x.shape[1:]), tf.uint8),
            tf.TensorSpec([chunk], tf.bool),
        ),
    )
    out = tf.reshape(out, dyn)[:b]
    return tf.ensure_shape(out, x.shape), tf.reshape(passed, [-1])[:b]


def macenko_transform(
    images,
    target_he,
    target_max_c,
    *,
    io: float = DEFAULT_IO,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    **kwargs,
):
    """Normalise a uint8 batch to a target stain matrix; graph-safe.

    The batch is processed in chunks of ``chunk_size`` tiles (``tf.map_fn``,
    two chunks in flight): every intermediate of a chunk stays in cache and the
    two CPU cores work on different chunks instead of synchronising on each
    op of one huge batch. A chunk always holds ``chunk_size`` tiles (the last
    one is padded), so a tile's result does not depend on the size of the
    batch it came in (batched matmul rounding can depend on the batch size).

    Args:
        images: [B,H,W,3] uint8 tensor.
        target_he: [3,2] float32 target stain matrix (H, E columns).
        target_max_c: [2] float32 target max concentrations.
        io: float. Transmitted light intensity.
        chunk_size: int or None. Tiles per chunk; None or 0 = the whole batch at once.
        **kwargs: further constants of :func:`macenko_decompose`.

    Returns:
        (uint8 [B,H,W,3] tensor, bool [B] tensor of passed-through tiles).
    """
    x = tf.convert_to_tensor(images)
    if x.dtype != tf.uint8:
        raise StainError(f"macenko_transform expects uint8 images, got {x.dtype}")
    he_ref = tf.convert_to_tensor(target_he, tf.float32)
    mc_ref = tf.convert_to_tensor(target_max_c, tf.float32)
    chunk = int(chunk_size or 0)
    if x.shape.rank == 4 and chunk > 0 and x.shape[0] != chunk:
        return _chunked(lambda t: _transform_batch(t, he_ref, mc_ref, io, kwargs), x, chunk)
    return _transform_batch(x, he_ref, mc_ref, io, kwargs)


def _transform_batch(x, he_ref, mc_ref, io, kwargs):
    """:func:`macenko_transform` on one batch (or chunk), no chunking."""
    dec, xla = _decompose_planar(_pixels(x), io=io, **kwargs)
    ok = dec["ok"]
    scale = mc_ref[None, :] / tf.where(ok[:, None], dec["max_c"], 1.0)  # [B,2]
    # out = io exp(-HE_ref diag(scale) pinv od): one 3x3 matrix per image.
    m_t = _small_matmul(he_ref[None] * scale[:, None, :], dec["pinv"])  # [B,3,3]
    m_t = tf.where(ok[:, None, None], m_t, tf.zeros_like(m_t))
    out = _kernel(_recolour, xla, io=float(io))(dec["od"], -m_t)
    out = tf.reshape(out, tf.shape(x))
    return _select_tiles(ok, out, x), tf.logical_not(ok)


# ------------------------------------------------------------------- fitting


def fit_macenko(images, **constants) -> MacenkoFit:
    """Fit a Macenko target (stain matrix + maxC) on one or more images.

    The pixels of all images are pooled, as if they were one image (torchstain
    fits one image; with one image the result is the same).

    Args:
        images: one uint8 RGB image [H,W,3], a batch [B,H,W,3], or a list of
            images of any sizes.
        **constants: Macenko constants (``io``, ``alpha``, ``beta``, ...).

    Returns:
        MacenkoFit.

    Raises:
        StainError: the images hold no usable H&E tissue.

    Example:
        >>> fit = fit_macenko(np.asarray(PIL.Image.open("target.png").convert("RGB")))
    """
    c = check_constants(**constants)
    if isinstance(images, (list, tuple)):
        arrs = [_as_uint8_array(a, "target image") for a in images]
    else:
        arrs = [_as_uint8_array(images, "target image")]
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrs], axis=0)
    if pixels.shape[0] < 2:
        raise StainError("cannot fit a Macenko target on fewer than 2 pixels")
    dec = _decompose_fn(c)(tf.constant(pixels.reshape(1, -1, 1, 3)))
    he = dec["stain_matrix"].numpy()[0]
    max_c = dec["max_c"].numpy()[0]
    if not bool(dec["ok"].numpy()[0]):
        raise StainError(
            f"the target image(s) hold no usable H&E tissue ({int(dec['n_tissue'].numpy()[0])} "
            f"tissue pixels of {pixels.shape[0]}; stain matrix {np.round(he, 3).tolist()}); "
            "choose a target image with well-stained tissue, or use target='torchstain'"
        )
    return MacenkoFit(he, max_c, source="fit", extra={"constants": {
        k: c[k] for k in ("io", "alpha", "beta", "luminosity_threshold")}})


_DECOMPOSE_CACHE: Dict[Tuple, Any] = {}


def _key(c: Dict[str, Any]) -> Tuple:
    return tuple(sorted(c.items()))


def _decompose_fn(c: Dict[str, Any]):
    """A cached tf.function running :func:`macenko_decompose` with constants ``c``."""
    key = ("decompose", xla_enabled()) + _key(c)
    fn = _DECOMPOSE_CACHE.get(key)
    if fn is None:
        fn = tf.function(lambda x: macenko_decompose(x, **c), reduce_retracing=True)
        _DECOMPOSE_CACHE[key] = fn
    return fn


#: Distinct tile sizes that get their own compiled graph (per set of constants);
#: further sizes share one dynamic-shape graph (TensorFlow kernels, no retracing).
MAX_STATIC_SIZES = 16
_STATIC_SIZES: Dict[Tuple, set] = {}


def _transform_fn(c: Dict[str, Any], h: Optional[int], w: Optional[int]):
    """A cached tf.function (shared by all normalisers with the same constants and
    tile size) running :func:`macenko_transform`; h/w None = any size (slower:
    the top-k sizes are then dynamic, and the per-pixel passes are not XLA-compiled).

    Each new static size costs a trace and an XLA compilation (~1 s); after
    :data:`MAX_STATIC_SIZES` distinct sizes (a folder of images of many sizes)
    new sizes go to the one dynamic-shape graph instead, which is traced once.
    """
    if h is None or w is None:
        h = w = None
    base = (xla_enabled(),) + _key(c)
    key = ("transform", h, w) + base
    fn = _DECOMPOSE_CACHE.get(key)
    if fn is None and h is not None:
        sizes = _STATIC_SIZES.setdefault(base, set())
        if len(sizes) >= MAX_STATIC_SIZES:
            return _transform_fn(c, None, None)
        sizes.add((h, w))
    if fn is None:
        fn = tf.function(
            lambda x, he, mc: macenko_transform(x, he, mc, **c),
            input_signature=[
                tf.TensorSpec([None, h, w, 3], tf.uint8),
                tf.TensorSpec([3, 2], tf.float32),
                tf.TensorSpec([2], tf.float32),
            ],
        )
        _DECOMPOSE_CACHE[key] = fn
    return fn


def _as_uint8_array(a, what="images") -> np.ndarray:
    """A NumPy uint8 RGB array from an array-like; clear errors for the usual mistakes."""
    if isinstance(a, tf.Tensor):
        a = a.numpy()
    a = np.asarray(a)
    if a.dtype == np.uint8:
        pass
    elif np.issubdtype(a.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 255:
        a = a.astype(np.uint8)
    elif a.size == 0:
        raise StainError(f"{what} is empty")
    else:
        raise StainError(
            f"{what} must be uint8 RGB (0..255), got dtype {a.dtype}"
            + (f" with values in [{a.min():.3g}, {a.max():.3g}]" if a.size else "")
            + "; convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for [0,1] "
            "floats, or use the MacenkoNormalization layer, which takes floats"
        )
    if a.ndim < 3 or a.shape[-1] != 3:
        raise StainError(
            f"{what} must be RGB with 3 channels last ([H,W,3] or [B,H,W,3]), got shape "
            f"{a.shape}; convert gray or RGBA images to RGB first"
        )
    return a


# ---------------------------------------------------------------- normaliser


class MacenkoNormalizer:
    """Batched Macenko normaliser: ``fit`` a target, ``transform`` uint8 batches.

    More From Less §2.3 ("All patches are colour-normalised using the Macenko
    method"). ``transform`` is pure TensorFlow: call it on a symbolic tensor
    inside ``tf.data.Dataset.map`` (after ``batch``) or a ``tf.function``; on
    NumPy input it returns NumPy.

    Args:
        target: str, path, MacenkoFit, dict or image array. A preset name
            ("torchstain", the de-facto reference; see
            :data:`histokd.stain.presets.PRESETS`), a path to an image (fitted on
            load) or to a JSON fit, a fit, or image(s) to fit.
        io: float. Transmitted light intensity (torchstain: 240).
        alpha: float. Angle percentile (torchstain: 1).
        beta: float. OD threshold of the tissue mask (torchstain: 0.15).
        luminosity_threshold: float or None. Extra tissue condition luma/255 < value.
        min_tissue_pixels, max_residual_fraction, max_eigen_ratio, min_stain_angle,
            min_stain_component: robustness policy (module docstring).

    Example:
        >>> norm = MacenkoNormalizer("torchstain")
        >>> ds = ds.batch(64).map(norm.transform)            # in-graph
        >>> out, passed = norm.transform(tiles_uint8, return_passthrough=True)
    """

    def __init__(self, target: Any = "torchstain", **constants):
        self.constants = check_constants(**constants)
        self.target_fit = None
        self.set_target(target)

    # -- target --------------------------------------------------------------
    def set_target(self, target: Any) -> MacenkoFit:
        """Set the target (preset name, path, fit, dict or images); returns the fit."""
        from histokd.stain.presets import resolve_target

        self.target_fit = resolve_target(target, **self.constants)
        self._he = tf.constant(self.target_fit.he)
        self._max_c = tf.constant(self.target_fit.max_c)
        return self.target_fit

    def fit(self, target_images) -> MacenkoFit:
        """Fit the target on image(s) (pixels pooled); returns the fit and uses it."""
        fit = fit_macenko(target_images, **self.constants)
        return self.set_target(fit)

    # -- transform -----------------------------------------------------------
    def transform_tensor(self, images):
        """In-graph transform of a uint8 [B,H,W,3] tensor -> (uint8 tensor, passthrough [B]).

        Runs as a nested, cached ``tf.function`` call: inside ``Dataset.map`` that
        gets the regular function runtime (graph optimisation, parallel op
        scheduling), measurably faster than inlining the ops into the map function.
        """
        x = tf.convert_to_tensor(images)
        if x.dtype != tf.uint8 or x.shape.rank != 4:
            raise StainError(
                f"Macenko transform expects a uint8 [B,H,W,3] batch, got {x.dtype} {x.shape}; "
                "apply it after decode and batch, before scaling to [0,1]"
            )
        h, w = x.shape[1], x.shape[2]
        fn = _transform_fn(self.constants, h, w)
        return fn(x, self._he, self._max_c)

    def transform(self, images, return_passthrough: bool = False):
        """Normalise images to the target.

        Args:
            images: uint8 RGB; a tf.Tensor [B,H,W,3] (symbolic or eager) or a NumPy
                array [H,W,3] / [B,H,W,3].
            return_passthrough: bool. Also return a bool [B] array, True where a
                tile failed the robustness policy and was returned unchanged.

        Returns:
            Images of the input's kind and shape (NumPy in -> NumPy out), and the
            passthrough flags when asked.
        """
        if isinstance(images, tf.Tensor) and not tf.executing_eagerly():
            out, passed = self.transform_tensor(images)
            return (out, passed) if return_passthrough else out
        if isinstance(images, tf.Tensor) or tf.is_tensor(images):
            x = tf.convert_to_tensor(images)
            out, passed = self.transform_tensor(x)
            return (out, passed) if return_passthrough else out
        a = _as_uint8_array(images)
        single = a.ndim == 3
        if single:
            a = a[None]
        if a.ndim != 4:
            raise StainError(f"images must be [H,W,3] or [B,H,W,3], got shape {a.shape}")
        if a.shape[0] == 0:
            out, passed = a.copy(), np.zeros([0], bool)
        else:
            o, p = self.transform_tensor(tf.constant(a))
            out, passed = o.numpy(), p.numpy()
        if single:
            out = out[0]
        return (out, passed) if return_passthrough else out

    __call__ = transform

    def decompose(self, images) -> Dict[str, np.ndarray]:
        """Per-image stain matrices, max concentrations, tissue counts and ok flags (NumPy)."""
        a = _as_uint8_array(images)
        if a.ndim == 3:
            a = a[None]
        dec = _decompose_fn(self.constants)(tf.constant(a))
        return {k: v.numpy() for k, v in dec.items() if k != "od"}

    # -- config --------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        """JSON-able config: the target fit and the constants."""
        return {"target": self.target_fit.to_dict(), **self.constants}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "MacenkoNormalizer":
        config = dict(config)
        target = config.pop("target", "torchstain")
        if isinstance(target, dict):
            target = MacenkoFit.from_dict(target)
        return cls(target, **config)

    def __repr__(self):
        return f"MacenkoNormalizer(target={self.target_fit.source!r}, io={self.constants['io']})"


# --------------------------------------------------------------- Keras layer


@keras.saving.register_keras_serializable(package="histokd")
class MacenkoNormalization(keras.layers.Layer):
    """Keras layer: Macenko-normalise its input to a fixed target (export-ready).

    Put it in front of an exported classifier so the model normalises its own
    input exactly as the training pipeline did (More From Less §2.3). The fit
    (stain matrix + maxC) is part of the layer config, so a ``.keras`` file
    reloads with the same target. Tiles that fail the robustness policy pass
    through unchanged.

    Float inputs in ``value_range`` are quantised to 0..255 first, like the
    uint8 tiles of the data pipeline, and the output is the normalised uint8
    value scaled back to ``value_range``, so the layer reproduces the pipeline
    bit for bit. uint8 inputs give uint8 outputs.

    Args:
        fit: MacenkoFit, dict, preset name or path. The target (default torchstain's).
        value_range: (low, high). Range of float inputs (default (0, 1)).
        **constants: Macenko constants (``io``, ``alpha``, ``beta``, ...).

    Example:
        >>> inp = keras.Input((224, 224, 3))
        >>> x = MacenkoNormalization(fit="torchstain")(inp)
        >>> model = keras.Model(inp, classifier(x))
    """

    def __init__(self, fit: Any = "torchstain", value_range=(0.0, 1.0), **kwargs):
        constants = {k: kwargs.pop(k) for k in list(kwargs) if k in CONSTANT_DEFAULTS}
        super().__init__(**kwargs)
        from histokd.stain.presets import resolve_target

        self.constants = check_constants(**constants)
        self.stain_fit = resolve_target(fit, **self.constants)
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise StainError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.value_range = (lo, hi)
        # XLA on CPU lowers top_k to sorts (measured ~5x slower here), and dynamic
        # tile sizes make top_k uncompilable: keep the model out of
        # jit_compile="auto" (the per-pixel passes inside are XLA-compiled anyway).
        self.supports_jit = False

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        he = tf.constant(self.stain_fit.he)
        mc = tf.constant(self.stain_fit.max_c)
        # the same cached graph as MacenkoNormalizer / make_stain_fn: identical
        # results whether the layer runs eagerly or inside a model's tf.function
        fn = _transform_fn(self.constants, x.shape[1], x.shape[2])
        if x.dtype == tf.uint8:
            out, _ = fn(x, he, mc)
            return out
        lo, hi = self.value_range
        xf = tf.cast(x, tf.float32)
        q = tf.cast(tf.clip_by_value(tf.round((xf - lo) * (255.0 / (hi - lo))), 0.0, 255.0), tf.uint8)
        out, passed = fn(q, he, mc)
        outf = tf.cast(out, tf.float32) * ((hi - lo) / 255.0) + lo
        outf = _select_tiles(tf.logical_not(passed), outf, xf)
        return tf.cast(outf, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs):
        # same dtype as the input (uint8 in -> uint8 out), not compute_dtype
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"fit": self.stain_fit.to_dict(), "value_range": list(self.value_range)})
        config.update(self.constants)
        return config


# ------------------------------------------------------- data-pipeline hook


def _cpu_counter(name: str):
    """An int64 counter variable that is never mirrored by a distribution strategy.

    ``ResourceVariable`` constructed directly bypasses the strategy's variable
    creator, so the counter stays a plain host variable that tf.data map
    functions can update even when the pipeline is built inside
    ``strategy.scope()``.
    """
    from tensorflow.python.ops import resource_variable_ops

    with tf.init_scope(), tf.device("/CPU:0"):
        return resource_variable_ops.ResourceVariable(
            tf.constant(0, tf.int64), trainable=False, name=name
        )


class StainFn:
    """A graph-safe stain step for ``tf.data`` with per-run passthrough counters.

    Made by :func:`make_stain_fn`. ``fn(images)`` maps a uint8 [B,H,W,3] batch to
    a uint8 batch and adds to two int64 counters (``tiles``, ``passed_through``)
    inside the graph, so the counts survive ``Dataset.map``. Read them with
    :meth:`counts` after (or during) a run; :meth:`reset_counts` zeroes them.
    ``fn.with_count(images)`` is the stateless alternative: it returns
    ``(images, n_passed_through)`` for pipelines that carry the count along.

    Example:
        >>> stain = make_stain_fn("macenko", "torchstain", "passthrough")
        >>> ds = ds.batch(64).map(stain, num_parallel_calls=tf.data.AUTOTUNE)
        >>> ...; stain.counts()   # {'tiles': 6400, 'passed_through': 12}
    """

    def __init__(self, method: str, normalizer: Optional[MacenkoNormalizer], on_failure: str):
        self.method = method
        self.normalizer = normalizer
        self.on_failure = on_failure
        self.tiles = _cpu_counter("histokd_stain_tiles")
        self.passed_through = _cpu_counter("histokd_stain_passed_through")

    def with_count(self, images):
        """(uint8 images, int32 number of passed-through tiles); no side effects."""
        x = tf.convert_to_tensor(images)
        if x.dtype != tf.uint8:
            raise StainError(
                f"the stain step expects uint8 [B,H,W,3] batches (apply it after decode and "
                f"batch, before scaling to [0,1]); got {x.dtype}"
            )
        if self.normalizer is None:
            return x, tf.constant(0, tf.int32)
        out, passed = self.normalizer.transform_tensor(x)
        n_fail = tf.reduce_sum(tf.cast(passed, tf.int32))
        if self.on_failure == "error":
            assert_op = tf.debugging.assert_equal(
                n_fail, 0,
                message=(
                    "histokd.stain: tile(s) in this batch could not be Macenko-normalised "
                    "(background-only, near-white, pure noise, single stain or too little "
                    "tissue). Set data.stain.on_failure: passthrough to keep such tiles "
                    "unchanged (they are counted), or remove them from the dataset."
                ),
            )
            with tf.control_dependencies([assert_op]):
                out = tf.identity(out)
        return out, n_fail

    def __call__(self, images):
        out, n_fail = self.with_count(images)
        upd = [
            self.tiles.assign_add(tf.cast(tf.shape(out)[0], tf.int64)),
            self.passed_through.assign_add(tf.cast(n_fail, tf.int64)),
        ]
        with tf.control_dependencies(upd):
            return tf.identity(out)

    def counts(self) -> Dict[str, int]:
        """{'tiles': seen, 'passed_through': returned unchanged} since the last reset."""
        return {"tiles": int(self.tiles.numpy()), "passed_through": int(self.passed_through.numpy())}

    def reset_counts(self):
        self.tiles.assign(0)
        self.passed_through.assign(0)

    def metadata(self) -> Dict[str, Any]:
        """JSON-able description for run metadata and exported models."""
        if self.normalizer is None:
            return {"method": "none"}
        return {
            "method": self.method,
            "on_failure": self.on_failure,
            "fit": self.normalizer.target_fit.to_dict(),
            "constants": dict(self.normalizer.constants),
        }

    def layer(self, value_range=(0.0, 1.0)) -> Optional["MacenkoNormalization"]:
        """The matching :class:`MacenkoNormalization` layer for export (None for 'none')."""
        if self.normalizer is None:
            return None
        return MacenkoNormalization(
            fit=self.normalizer.target_fit, value_range=value_range, **self.normalizer.constants
        )


def make_stain_fn(
    method: str = "macenko",
    target: Any = "torchstain",
    on_failure: str = "passthrough",
    **constants,
) -> StainFn:
    """Build the ``data.stain`` step: a callable for ``Dataset.map`` after ``batch``.

    Args:
        method: "none" or "macenko".
        target: preset name ("torchstain"), image path, JSON fit path, fit or dict.
        on_failure: "passthrough" (return failing tiles unchanged and count them) or
            "error" (raise InvalidArgumentError in the pipeline, naming the fix).
        **constants: Macenko constants (``io``, ``alpha``, ``beta``, ...).

    Returns:
        StainFn: ``fn(uint8 [B,H,W,3]) -> uint8 [B,H,W,3]`` with ``fn.counts()``.

    Example:
        >>> stain = make_stain_fn("macenko", "torchstain")
        >>> ds = tf.data.Dataset.from_tensor_slices(tiles).batch(32).map(stain)
    """
    m = (method or "none").lower()
    if m not in ("none", "macenko"):
        raise StainError(f"unknown stain method {method!r}; use 'none' or 'macenko'")
    if on_failure not in ("passthrough", "error"):
        raise StainError(f"unknown on_failure {on_failure!r}; use 'passthrough' or 'error'")
    normalizer = MacenkoNormalizer(target, **constants) if m == "macenko" else None
    return StainFn(m, normalizer, on_failure)
