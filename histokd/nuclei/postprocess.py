"""HoVer-Net post-processing: NP + HV maps → nucleus instances; TP → one type per nucleus.

Follows the official procedure (vqdang/hover_net ``models/hovernet/post_proc.py``;
TIAToolbox ``HoVerNet._proc_np_hv`` / ``get_instance_info``), Graham et al.,
HoVer-Net (MedIA 2019) §3.3, with TIAToolbox's scale-aware constants for images
that are not at the model's 0.25 µm/px. numpy / OpenCV / scikit-image only — no
Keras import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import cv2
import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

from histokd.errors import DataError

MODEL_MPP = 0.25  # µm/px the released HoVer-Net models were trained at


@dataclass
class Nucleus:
    """One segmented nucleus (coordinates in pixels of the processed map, x = column).

    Attributes:
        id: int. Its value in the instance map.
        centroid: np.ndarray [2]. (x, y) from the image moments.
        bbox: tuple. (x_min, y_min, x_max, y_max), max exclusive.
        contour: np.ndarray [N, 2] int32. (x, y) outline (OpenCV, simple chain).
        area: int. Pixels.
        type: int. Majority type id (0 when no type map was given).
        type_prob: float. Fraction of the nucleus' pixels voting for ``type``.
    """

    id: int
    centroid: np.ndarray
    bbox: tuple
    contour: np.ndarray
    area: int
    type: int = 0
    type_prob: float = 0.0


@dataclass
class NucleiResult:
    """Instances of one image.

    Attributes:
        inst_map: np.ndarray [H, W] int32. 0 background, >0 instance ids.
        nuclei: dict id → :class:`Nucleus` (instances whose contour has < 3 points
            are left out, as in the official code, but stay in ``inst_map``).
    """

    inst_map: np.ndarray
    nuclei: Dict[int, Nucleus] = field(default_factory=dict)

    def type_map(self) -> np.ndarray:
        """[H, W] uint8 map of each nucleus' type id (0 outside nuclei)."""
        lut = np.zeros(int(self.inst_map.max()) + 1, np.uint8)
        for nid, nuc in self.nuclei.items():
            lut[nid] = nuc.type
        return lut[self.inst_map]

    def counts(self, num_types: int) -> np.ndarray:
        """Number of nuclei of each type id 0..num_types−1."""
        c = np.zeros(max(int(num_types), 1), np.int64)
        for nuc in self.nuclei.values():
            if nuc.type < len(c):
                c[nuc.type] += 1
        return c


def scale_constants(mpp: Optional[float] = None, model_mpp: float = MODEL_MPP) -> Dict[str, float]:
    """Post-processing constants for maps at ``mpp`` µm/px (TIAToolbox's generalisation).

    With ``s = model_mpp / mpp`` (1 at 0.25 µm/px): Sobel ``ksize = int(20·s + 1)``
    and marker minimum size ``ceil(10·s²)``; the foreground minimum size stays 10
    px as in TIAToolbox. The kernel is made odd and clipped to [3, 31] (OpenCV's
    Sobel limit; TIAToolbox would fail outside it).

    Args:
        mpp: float or None. Resolution of the maps (None = the model's).
        model_mpp: float. Resolution the constants were set for.

    Returns:
        dict with ``scale``, ``ksize``, ``marker_min_size``, ``fg_min_size``.

    Example:
        >>> scale_constants(0.5)["ksize"]
        11
    """
    if mpp is not None and (not np.isfinite(float(mpp)) or float(mpp) <= 0):
        raise DataError(f"mpp={mpp} is not a positive resolution in µm/px; pass e.g. 0.25 or 0.5")
    s = 1.0 if mpp is None else float(model_mpp) / float(mpp)
    ksize = int(20 * s + 1)
    ksize = min(max(ksize + (ksize % 2 == 0), 3), 31)
    return {"scale": s, "ksize": ksize, "marker_min_size": math.ceil(10 * s * s), "fg_min_size": 10}


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero every labelled component smaller than ``min_size`` pixels (skimage semantics)."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def _minmax(x):
    return cv2.normalize(x, None, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)


def instances_from_maps(np_prob: np.ndarray, hv: np.ndarray, mpp: Optional[float] = None) -> np.ndarray:
    """Marker-controlled watershed of the HV energy map (the official ``proc_np_hv``).

    1. foreground = NP ≥ 0.5, components < 10 px removed;
    2. min-max normalise each HV channel;
    3. Sobel (ksize 21 at 0.25 µm/px) d/dx of the horizontal map, d/dy of the
       vertical map; each min-max normalised and inverted;
    4. energy = max of the two, minus background, clipped at 0;
       ``dist = −GaussianBlur3×3((1 − energy)·fg)``;
    5. markers = fg − (energy ≥ 0.4), holes filled, opened with a 5×5 ellipse,
       labelled, markers < 10 px removed;
    6. watershed of ``dist`` from the markers inside the foreground.

    Args:
        np_prob: [H, W] or [H, W, 1] nucleus probability.
        hv: [H, W, 2] horizontal (x) and vertical (y) maps.
        mpp: float or None. Resolution of the maps (scales the constants).

    Returns:
        [H, W] int32 instance map (ids need not be consecutive).

    Example:
        >>> inst = instances_from_maps(np.zeros((32, 32)), np.zeros((32, 32, 2)))
        >>> int(inst.max())
        0
    """
    np_prob = np.asarray(np_prob, np.float32)
    if np_prob.ndim == 3:
        np_prob = np_prob[..., 0]
    hv = np.asarray(hv, np.float32)
    if np_prob.ndim != 2 or hv.shape != np_prob.shape + (2,):
        raise DataError(f"expected np [H, W] and hv [H, W, 2]; got {np_prob.shape} and {hv.shape}")
    c = scale_constants(mpp)

    blb = np.array(np_prob >= 0.5, dtype=np.int32)
    blb = ndimage.label(blb)[0]
    blb = remove_small_objects(blb, c["fg_min_size"])
    blb[blb > 0] = 1

    h_dir, v_dir = _minmax(hv[..., 0]), _minmax(hv[..., 1])
    sobel_h = cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=c["ksize"])
    sobel_v = cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=c["ksize"])
    sobel_h = 1 - _minmax(sobel_h)
    sobel_v = 1 - _minmax(sobel_v)

    overall = np.maximum(sobel_h, sobel_v)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0
    dist = (1.0 - overall) * blb
    dist = -cv2.GaussianBlur(dist, (3, 3), 0)  # nuclei are mountains: invert to basins

    overall = np.array(overall >= 0.4, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    marker = cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel)
    marker = ndimage.label(marker)[0]
    marker = remove_small_objects(marker, c["marker_min_size"])
    return watershed(dist, markers=marker, mask=blb).astype(np.int32)


def instance_info(inst_map: np.ndarray, type_map: Optional[np.ndarray] = None) -> Dict[int, Nucleus]:
    """Per-instance bbox, centroid, contour and majority type (official ``get_instance_info``).

    Type: the most frequent type id among the nucleus' pixels; if that is 0
    (background) and another id occurs, the runner-up. ``type_prob`` = its pixel
    count / area. Ties go to the lower id (stable sort of ``np.unique``).

    Args:
        inst_map: [H, W] int instance map.
        type_map: [H, W] int per-pixel type id (argmax of TP), or None.

    Returns:
        dict id → :class:`Nucleus`.

    Example:
        >>> m = np.zeros((9, 9), int); m[2:6, 2:6] = 1
        >>> instance_info(m)[1].bbox
        (2, 2, 6, 6)
    """
    inst_map = np.asarray(inst_map)
    out: Dict[int, Nucleus] = {}
    objects = ndimage.find_objects(inst_map.astype(np.int64))
    for idx, sl in enumerate(objects):
        if sl is None:
            continue
        nid = idx + 1
        rs, cs = sl
        crop = inst_map[sl] == nid
        mask = crop.astype(np.uint8)
        moments = cv2.moments(mask)
        contours = cv2.findContours(mask, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        contour = np.squeeze(contours[0].astype(np.int32))
        if contour.ndim != 2 or contour.shape[0] < 3:  # < 3 points: no contour, likely an artefact
            continue
        tl = np.array([cs.start, rs.start])
        nuc = Nucleus(
            id=nid,
            centroid=np.array([moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]]) + tl,
            bbox=(cs.start, rs.start, cs.stop, rs.stop),
            contour=contour + tl[None],
            area=int(crop.sum()),
        )
        if type_map is not None:
            votes = np.asarray(type_map)[sl][crop]
            ids, counts = np.unique(votes, return_counts=True)
            order = sorted(zip(ids.tolist(), counts.tolist()), key=lambda t: t[1], reverse=True)
            winner = order[0][0]
            if winner == 0 and len(order) > 1:
                winner = order[1][0]
            nuc.type = int(winner)
            nuc.type_prob = float(dict(order)[winner] / (crop.sum() + 1.0e-6))
        out[nid] = nuc
    return out


def postprocess(np_prob: np.ndarray, hv: np.ndarray, tp: Optional[np.ndarray] = None,
                mpp: Optional[float] = None) -> NucleiResult:
    """NP/HV/TP maps of one image → :class:`NucleiResult` (HoVer-Net §3.3).

    Args:
        np_prob: [H, W] nucleus probability (softmax channel 1).
        hv: [H, W, 2] HV maps (channel 0 horizontal).
        tp: [H, W, T] type probabilities, or [H, W] type ids, or None.
        mpp: float or None. Resolution of the maps; None = 0.25 µm/px.

    Returns:
        NucleiResult with the instance map and per-nucleus info.

    Example:
        >>> res = postprocess(np.zeros((32, 32)), np.zeros((32, 32, 2)))
        >>> len(res.nuclei)
        0
    """
    inst = instances_from_maps(np_prob, hv, mpp)
    type_map = None
    if tp is not None:
        tp = np.asarray(tp)
        type_map = np.argmax(tp, axis=-1) if tp.ndim == 3 else np.rint(tp).astype(np.int64)
    return NucleiResult(inst, instance_info(inst, type_map))
