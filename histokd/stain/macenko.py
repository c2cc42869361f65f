"""Batched, in-graph Macenko stain normalisation: the algorithm.

More From Less (Farndale et al.), §2.3: "All patches are colour-normalised
using the Macenko method" (Macenko et al., "A method for normalizing histology
slides for quantitative analysis", ISBI 2009). This module is that step,
written as one batched TensorFlow graph, so it runs inside
``tf.data.Dataset.map`` (after ``batch``), inside a Keras model and on NumPy
arrays, with no Python loop over images and no ``py_function``. The user-facing
normaliser, Keras layer and data-pipeline step are in
:mod:`histokd.stain.normalizer`.

Algorithm (the reference is torchstain's numpy backend, itself ported from
schaugf/HEnorm_python; defaults Io=240, alpha=1, beta=0.15), in
:func:`macenko_decompose` and :func:`macenko_transform`:

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

How it is made fast, without changing the numbers (details in the two private
modules; figures per machine and the variants tried in docs/benchmarks.md):

* Percentiles (steps 5 and 8) are exact order statistics of the upper tail,
  never a full sort (:mod:`histokd.stain._select`); the angle percentiles are
  selected on a pseudo-angle with the order of ``atan2``, so no per-pixel
  ``atan2`` is evaluated.
* The per-pixel passes (steps 1-3, 4, 7, 9) each run as one fused XLA kernel
  when the tile size is static, and the batch runs as chunks of 4 tiles, two in
  flight (:mod:`histokd.stain._kernels`). The recolouring folds pinv(HE), the
  maxC rescale and HE_ref into one 3x3 matrix per image.
  ``HISTOKD_MACENKO_XLA=0`` or an unknown tile size runs the same math with
  TensorFlow's kernels.
* Process-wide settings help further but are never changed by this module: the
  ``histokd normalize`` and ``histokd train`` commands size TensorFlow's thread
  pools (intra-op 1, inter-op 2 on 2 cores: one core per chunk in flight) and
  call :func:`histokd.runtime.prefer_sequential_xla_cpu` (XLA:CPU then runs each
  kernel's steps on the calling thread instead of queueing the two chunks'
  kernels on one pool). In a notebook or script, call them first, before
  TensorFlow runs its first op::

      from histokd import runtime
      runtime.prefer_sequential_xla_cpu()
      runtime.apply_cpu_threads("auto", streams=2)   # two chunks in flight

  Without them the normaliser gives the same results, only slower.

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

from histokd.errors import StainError
from histokd.stain import _kernels, _select
from histokd.stain._kernels import (  # noqa: F401  (re-exported: part of the algorithm's statement)
    DEFAULT_CHUNK_SIZE,
    PARALLEL_CHUNKS,
    kernel,
    pseudo_angle,
    pseudo_angle_to_angle,
    xla_enabled,
)

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
    mask be computed on the uint8 input exactly as torchstain's float64 test (step 2).

    Args:
        io: float. Transmitted light.
        beta: float. OD threshold.
    """
    v = np.arange(256, dtype=np.float64)
    ok = -np.log((v + 1.0) / io) >= beta
    return int(np.nonzero(ok)[0].max()) if ok.any() else -1


def _covariance(sums):
    """Unbiased 3x3 covariance of the tissue OD from its one-pass sums [B,10].

    Tissue OD is O(1) (>= beta), so the E[xx^T] - mean mean^T cancellation costs
    < 2 of float32's 7 digits.
    """
    n_tf = sums[:, 0]  # exact in float32 below 2**24 pixels
    s1 = sums[:, 1:4]
    srr, srg, srb, sgg, sgb, sbb = (sums[:, i] for i in range(4, 10))
    s2 = tf.stack([tf.stack([srr, srg, srb], -1), tf.stack([srg, sgg, sgb], -1),
                   tf.stack([srb, sgb, sbb], -1)], axis=1)  # [B,3,3]
    n_safe = tf.maximum(n_tf, 1.0)[:, None, None]
    mean = s1[:, :, None] / n_safe
    return (s2 - n_safe * mean * tf.linalg.matrix_transpose(mean)) / tf.maximum(
        n_tf - 1.0, 1.0
    )[:, None, None]


def _pinv(he):
    """Closed-form least squares of the 3x2 system: pinv(HE) = (HE^T HE)^-1 HE^T, and det."""
    g = _kernels.small_matmul(tf.linalg.matrix_transpose(he), he)  # [B,2,2]
    det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
    safe_det = tf.where(tf.abs(det) > 1e-12, det, 1.0)
    ginv = tf.stack(
        [tf.stack([g[:, 1, 1], -g[:, 0, 1]], -1), tf.stack([-g[:, 1, 0], g[:, 0, 0]], -1)], 1
    ) / safe_det[:, None, None]
    return _kernels.small_matmul(ginv, tf.linalg.matrix_transpose(he)), det  # [B,2,3]


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

    # Steps 1-3: OD, tissue mask, covariance of the tissue OD and its eigenvectors.
    od, maskf, sums = kernel(_kernels.od_and_stats, xla, io=float(io), threshold=threshold,
                             luminosity_threshold=luminosity_threshold)(x)
    n_t = tf.cast(sums[:, 0], tf.int32)
    cov = _covariance(sums)
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

    # Steps 4-5: the alpha-th and (100-alpha)-th percentiles of phi. Row 0 of the
    # angle rows holds the pseudo-angles (upper tail -> phi_max), row 1 their
    # negation (its upper tail -> phi_min); only the selected values become angles.
    k_phi = _select.k_for(n_static, n_pix, min(alpha, 100.0 - alpha))
    fuse = _select.fused_group(n_static, k_phi, select_group, xla)
    rows = kernel(_kernels.angle_rows, xla, group=fuse)(od, maskf, plane)  # [B,2,N] (+ group maxima)
    rows, gmax = rows if fuse else (rows, None)
    phi = _select.upper_percentiles(
        rows, n_t, 100.0 - alpha, k=k_phi, group=select_group, gmax=gmax, xla=xla,
        value_fns=(pseudo_angle_to_angle, lambda v: -pseudo_angle_to_angle(-v)))
    phi_max, phi_min = phi[:, 0], -phi[:, 1]

    def vec(a):
        return tf.reduce_sum(plane * tf.expand_dims(tf.stack([tf.cos(a), tf.sin(a)], axis=-1), 1), -1)

    # Step 6: the stain vectors, haematoxylin first (larger red OD component).
    v_min, v_max = vec(phi_min), vec(phi_max)  # [B,3]
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    h = tf.where(h_first, v_min, v_max)
    e = tf.where(h_first, v_max, v_min)
    he = tf.stack([h, e], axis=-1)  # [B,3,2]

    # Steps 7-8: concentrations and their 99th percentiles over all pixels.
    pinv, det = _pinv(he)
    k_c = _select.k_for(n_static, n_pix, 100.0 - _MAXC_PERCENTILE)
    fuse = _select.fused_group(n_static, k_c, select_group, xla)
    conc = kernel(_kernels.concentrations, xla, group=fuse)(od, pinv)  # [B,2,N] (+ group maxima)
    conc, gmax = conc if fuse else (conc, None)
    max_c = _select.upper_percentiles(conc, tf.fill([b], n_pix), _MAXC_PERCENTILE, k=k_c,
                                      group=select_group, gmax=gmax, xla=xla)

    # Robustness policy (module docstring).
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
        return _kernels.chunked(lambda t: _transform_batch(t, he_ref, mc_ref, io, kwargs), x, chunk)
    return _transform_batch(x, he_ref, mc_ref, io, kwargs)


def _transform_batch(x, he_ref, mc_ref, io, kwargs):
    """:func:`macenko_transform` on one batch (or chunk), no chunking."""
    dec, xla = _decompose_planar(_pixels(x), io=io, **kwargs)
    ok = dec["ok"]
    # Step 9.
    scale = mc_ref[None, :] / tf.where(ok[:, None], dec["max_c"], 1.0)  # [B,2]
    # out = io exp(-HE_ref diag(scale) pinv od): one 3x3 matrix per image.
    m_t = _kernels.small_matmul(he_ref[None] * scale[:, None, :], dec["pinv"])  # [B,3,3]
    m_t = tf.where(ok[:, None, None], m_t, tf.zeros_like(m_t))
    out = kernel(_kernels.recolour, xla, io=float(io))(dec["od"], -m_t)
    out = tf.reshape(out, tf.shape(x))
    return _kernels.select_tiles(ok, out, x), tf.logical_not(ok)


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
        arrs = [as_uint8_array(a, "target image") for a in images]
    else:
        arrs = [as_uint8_array(images, "target image")]
    pixels = np.concatenate([a.reshape(-1, 3) for a in arrs], axis=0)
    if pixels.shape[0] < 2:
        raise StainError("cannot fit a Macenko target on fewer than 2 pixels")
    dec = decompose_fn(c)(tf.constant(pixels.reshape(1, -1, 1, 3)))
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


def decompose_fn(c: Dict[str, Any]):
    """The cached tf.function running :func:`macenko_decompose` with constants ``c``.

    Args:
        c: dict. Validated constants (:func:`check_constants`).
    """
    return _kernels.decompose_graph(macenko_decompose, c)


def transform_fn(c: Dict[str, Any], h: Optional[int], w: Optional[int]):
    """The cached tf.function running :func:`macenko_transform` for tiles of h x w.

    Called as ``fn(uint8 [B,h,w,3], he [3,2], max_c [2]) -> (uint8, passed [B])``.

    Args:
        c: dict. Validated constants (:func:`check_constants`).
        h, w: int or None. Tile size (None: any size, slower).
    """
    return _kernels.transform_graph(macenko_transform, c, h, w)


def as_uint8_array(a, what="images") -> np.ndarray:
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

