"""Nucleus segmentation metrics: aggregated Jaccard index (AJI) and Dice.

AJI after Kumar et al., "A Dataset and a Technique for Generalized Nuclear
Segmentation for Computational Pathology", IEEE TMI 2017 (the metric HoVer-Net
reports, Graham et al. 2019 §4.3).
"""

from __future__ import annotations

import numpy as np


def _contingency(true: np.ndarray, pred: np.ndarray):
    t = np.asarray(true).astype(np.int64).ravel()
    p = np.asarray(pred).astype(np.int64).ravel()
    _, t = np.unique(t, return_inverse=True) if t.size else (None, t)
    _, p = np.unique(p, return_inverse=True) if p.size else (None, p)
    nt, np_ = t.max() + 1, p.max() + 1
    table = np.bincount(t * np_ + p, minlength=nt * np_).reshape(nt, np_)
    return table


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Pixel Dice of the binary nucleus masks (``true > 0`` vs ``pred > 0``).

    Example:
        >>> dice(np.array([[1, 0]]), np.array([[1, 1]]))
        0.6666666666666666
    """
    a, b = np.asarray(true) > 0, np.asarray(pred) > 0
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI of two instance maps (0 = background).

    Each true nucleus is paired with the predicted one of highest IoU; the sums
    of their intersections over the sums of their unions, with every predicted
    nucleus never paired added to the unions.

    Example:
        >>> t = np.zeros((4, 4), int); t[:2, :2] = 1
        >>> aggregated_jaccard_index(t, t)
        1.0
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"instance maps differ in shape: {true.shape} vs {pred.shape}")
    t_ids = np.unique(true)
    p_ids = np.unique(pred)
    table = _contingency(true, pred)  # rows: sorted true ids, cols: sorted pred ids
    t_fg = t_ids != 0
    p_fg = p_ids != 0
    inter = table[np.ix_(t_fg, p_fg)].astype(np.float64)
    t_area = table[t_fg].sum(1).astype(np.float64)
    p_area = table[:, p_fg].sum(0).astype(np.float64)
    if inter.shape[0] == 0:
        return 1.0 if inter.shape[1] == 0 else 0.0
    if inter.shape[1] == 0:
        return 0.0
    union = t_area[:, None] + p_area[None, :] - inter
    iou = inter / union
    best = iou.argmax(1)
    rows = np.arange(len(best))
    hit = inter[rows, best] > 0
    c = inter[rows, best][hit].sum()
    u = union[rows, best][hit].sum() + t_area[~hit].sum()
    used = np.zeros(inter.shape[1], bool)
    used[best[hit]] = True
    u += p_area[~used].sum()
    return float(c / u) if u > 0 else 1.0
