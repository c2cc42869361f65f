"""HoVer-Net training targets from an instance map: NP, HV and TP.

Graham et al., HoVer-Net (MedIA 2019) §3.2: the HV maps hold, for every nucleus
pixel, its horizontal and vertical offset from the nucleus' centre of mass,
scaled per nucleus so the negative side spans [−1, 0] and the positive side
[0, 1] (official ``models/hovernet/targets.py``). numpy only.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
from scipy import ndimage

from histokd.errors import DataError
from histokd.nuclei.postprocess import remove_small_objects


def _centre_crop(x: np.ndarray, size) -> np.ndarray:
    if size is None:
        return x
    h, w = x.shape[:2]
    ch, cw = (size, size) if np.isscalar(size) else size
    if ch > h or cw > w:
        raise DataError(f"crop {ch}×{cw} is larger than the {h}×{w} instance map")
    t, l = (h - ch) // 2, (w - cw) // 2
    return x[t:t + ch, l:l + cw]


def hv_map(inst_map: np.ndarray, min_size: int = 30, crop: Optional[int] = None,
           official_shift: bool = False) -> np.ndarray:
    """Horizontal/vertical distance maps of every nucleus.

    For nucleus pixels at column ``c`` / row ``r``: ``x = c − round(com_x)``,
    ``y = r − round(com_y)``; per nucleus, negative values are divided by
    ``|min|`` and positive by ``max``. Nuclei smaller than ``min_size`` pixels
    (measured inside the centre ``crop``, as the official code does) get no HV.

    Args:
        inst_map: [H, W] int instance map (0 background).
        min_size: int. Nuclei under this many pixels are dropped (official 30).
        crop: int or None. Output window the sizes are measured in (None = all).
        official_shift: bool. Reproduce hover_net's ``targets.py`` exactly, whose
            coordinate ranges start at 1 (``np.arange(1, w + 1)``), shifting every
            offset by +1 px. Default False: offsets from the centre as the paper
            defines them (and as the project's post-processing fixture uses).

    Returns:
        [H, W, 2] float32, channel 0 horizontal (x), channel 1 vertical (y).

    Example:
        >>> m = np.zeros((7, 7), int); m[1:6, 1:6] = 1
        >>> hv_map(m, min_size=1)[3, 1:6, 0].tolist()
        [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    inst_map = np.asarray(inst_map)
    if inst_map.ndim != 2:
        raise DataError(f"instance map must be [H, W]; got shape {inst_map.shape}")
    inst_map = inst_map.astype(np.int64)
    keep = remove_small_objects(_centre_crop(inst_map, crop), min_size)
    ids = np.unique(keep)
    ids = ids[ids > 0]
    out = np.zeros(inst_map.shape + (2,), np.float32)
    objects = ndimage.find_objects(inst_map)
    shift = 1 if official_shift else 0
    for nid in ids:
        sl = objects[nid - 1]
        mask = inst_map[sl] == nid
        com = ndimage.center_of_mass(mask)
        rr, cc = np.nonzero(mask)
        xs = (cc + shift - int(com[1] + 0.5)).astype(np.float32)
        ys = (rr + shift - int(com[0] + 0.5)).astype(np.float32)
        for a in (xs, ys):
            neg, pos = a < 0, a > 0
            if neg.any():
                a[neg] /= -a[neg].min()
            if pos.any():
                a[pos] /= a[pos].max()
        out[rr + sl[0].start, cc + sl[1].start, 0] = xs
        out[rr + sl[0].start, cc + sl[1].start, 1] = ys
    return out


def make_targets(inst_map: np.ndarray, type_map: Optional[np.ndarray] = None,
                 crop: Optional[int] = None, min_size: int = 30,
                 official_shift: bool = False) -> Dict[str, np.ndarray]:
    """NP, HV (and TP) targets of one tile, centre-cropped to the output window.

    Args:
        inst_map: [H, W] int instance map of the input window.
        type_map: [H, W] int per-pixel type id, or None (no TP target).
        crop: int or None. Output size (164 fast, 80 original); None = no crop.
        min_size: int. HV minimum nucleus size (official 30).
        official_shift: bool. See :func:`hv_map`.

    Returns:
        dict ``np`` [h, w] int32 (id > 0), ``hv`` [h, w, 2] float32 and, with a
        type map, ``tp`` [h, w] int32.

    Example:
        >>> t = make_targets(np.pad(np.ones((40, 40), int), 10), crop=40)
        >>> t["np"].shape, t["hv"].shape
        ((40, 40), (40, 40, 2))
    """
    hv = hv_map(inst_map, min_size=min_size, crop=crop, official_shift=official_shift)
    out = {"np": (_centre_crop(np.asarray(inst_map), crop) > 0).astype(np.int32),
           "hv": _centre_crop(hv, crop)}
    if type_map is not None:
        type_map = np.asarray(type_map)
        if type_map.shape != np.asarray(inst_map).shape:
            raise DataError(f"type map {type_map.shape} and instance map {np.shape(inst_map)} differ in shape")
        out["tp"] = _centre_crop(type_map, crop).astype(np.int32)
    return out
