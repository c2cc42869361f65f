"""A nucleus segmenter that needs no weights: haematoxylin deconvolution, Otsu, distance watershed.

A fallback so the tissue/nuclei distillation pipeline of More From Less (§2.1)
runs end to end without HoVer-Net's licensed weights (CC BY-NC-SA 4.0). It
**gives no nuclear types**: every nucleus is type 1, ``"Unknown"``, so a mask
made with it is a binary nucleus mask and its "most-present cell type" label is
only Background (no nucleus) vs Unknown. Treat the type targets as unknown and
use it for binary/instance supervision or nucleus counting only.

Steps (after scikit-image's watershed example and the Otsu variant in the
project's HoVer-Net spec §1.7):

1. colour deconvolution (Ruifrok & Johnston, ``skimage.color.rgb2hed``) → haematoxylin;
2. Gaussian smoothing (σ = 1 px), Otsu threshold, never below ``min_threshold``
   (so a tile with no nuclei — adipose, background — does not get half its
   pixels called nuclei);
3. fill holes, remove objects below ``min_size``;
4. Euclidean distance transform, local maxima at least ``min_distance`` apart,
   watershed of the negated distance from those markers inside the mask.

Sizes are given at 0.25 µm/px and scaled with the image's ``mpp``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from histokd.errors import DataError
from histokd.nuclei.postprocess import MODEL_MPP, NucleiResult, instance_info, remove_small_objects

#: Type names of the classical segmenter (no real types).
CLASSICAL_TYPE_NAMES = ("Background", "Unknown")
#: Colours: black background, white nuclei.
CLASSICAL_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], dtype=np.uint8)


def haematoxylin(image: np.ndarray) -> np.ndarray:
    """Haematoxylin optical-density channel of an RGB image (``rgb2hed``[..., 0])."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise DataError(f"expected an RGB image [H, W, 3]; got shape {image.shape}")
    return rgb2hed(image[..., :3]).astype(np.float32)[..., 0]


def segment_classical(image: np.ndarray, mpp: Optional[float] = None, min_size: int = 30,
                      min_distance: int = 6, min_threshold: float = 0.05,
                      smooth_sigma: float = 1.0) -> NucleiResult:
    """Segment nuclei without learned weights (no types: every nucleus is type 1).

    Args:
        image: [H, W, 3] uint8 RGB H&E tile.
        mpp: float or None. Image resolution in µm/px (None = 0.25); sizes scale with it.
        min_size: int. Smallest nucleus in pixels at 0.25 µm/px (scaled by s²).
        min_distance: int. Minimum distance between two nucleus centres at
            0.25 µm/px (scaled by s).
        min_threshold: float. Floor for the Otsu threshold on haematoxylin OD
            (``rgb2hed`` units; nuclei on H&E are typically ≥ 0.07, background and
            fat ≤ 0.04).
        smooth_sigma: float. Gaussian smoothing of the haematoxylin channel, px.

    Returns:
        NucleiResult (``inst_map`` and per-nucleus info; ``type`` 1, ``type_prob`` 1).

    Example:
        >>> from histokd.nuclei.synthetic import synthetic_he_tile
        >>> img, inst = synthetic_he_tile(seed=0)
        >>> res = segment_classical(img)
        >>> len(res.nuclei) > 0
        True
    """
    if mpp is not None and (not np.isfinite(mpp) or mpp <= 0):
        raise DataError(f"mpp={mpp} is not a positive resolution in µm/px; pass e.g. 0.25 or 0.5")
    s = 1.0 if mpp is None else MODEL_MPP / float(mpp)
    h = haematoxylin(image)
    if smooth_sigma > 0:
        h = ndimage.gaussian_filter(h, smooth_sigma)
    if float(h.max()) - float(h.min()) < 1e-6:
        thr = np.inf
    else:
        thr = max(float(threshold_otsu(h)), float(min_threshold))
    mask = ndimage.binary_fill_holes(h > thr)
    labels = remove_small_objects(ndimage.label(mask)[0], max(1, int(round(min_size * s * s))))
    mask = labels > 0
    if not mask.any():
        return NucleiResult(np.zeros(mask.shape, np.int32), {})
    dist = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=max(1, int(round(min_distance * s))), labels=labels,
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    inst = watershed(-dist, markers, mask=mask).astype(np.int32)
    # components without a peak (flat plateaus) keep their own id
    missing = mask & (inst == 0)
    if missing.any():
        extra = ndimage.label(missing)[0]
        inst[missing] = extra[missing] + inst.max()
    nuclei = instance_info(inst)
    for nuc in nuclei.values():
        nuc.type, nuc.type_prob = 1, 1.0
    return NucleiResult(inst, nuclei)
