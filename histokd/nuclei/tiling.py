"""Tiled HoVer-Net inference for images larger (or smaller) than one window, with mpp handling.

Follows hover_net's tile mode (``infer/tile.py`` ``_prepare_patching``): windows
of the model's input size (256 fast / 270 original) with a step of the output
size (164 / 80), the image reflect-padded by the border (46 / 95 px) on the top
and left and up to a whole number of steps on the bottom and right. The outputs
are laid side by side without overlap and the post-processing runs once on the
stitched maps, so a nucleus that straddles a window seam is segmented from one
continuous map and never cut (Graham et al., HoVer-Net, MedIA 2019; More From
Less §2.1 runs it over every tile to build nuclear masks).
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from histokd.errors import BadImageError, DataError
from histokd.nuclei.postprocess import MODEL_MPP, NucleiResult, instance_info, postprocess


def _as_rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise BadImageError(f"expected an RGB image [H, W, 3]; got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0:
            image = image * 255.0
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image


def window_grid(height: int, width: int, window: int, step: int) -> Tuple[int, int, List[Tuple[int, int]]]:
    """Number of steps per axis and the top-left corners of every window in the padded image.

    Args:
        height: int. Image height.
        width: int. Image width.
        window: int. Model input size.
        step: int. Model output size.

    Returns:
        (rows, cols, [(y, x), ...]) in row-major order.

    Example:
        >>> window_grid(300, 164, 256, 164)[:2]
        (2, 1)
    """
    rows, cols = max(1, math.ceil(height / step)), max(1, math.ceil(width / step))
    return rows, cols, [(r * step, c * step) for r in range(rows) for c in range(cols)]


def pad_for_tiling(image: np.ndarray, window: int, step: int) -> np.ndarray:
    """Reflect-pad ``image`` by the border on top/left and to whole steps on bottom/right."""
    border = (window - step) // 2
    h, w = image.shape[:2]
    rows, cols, _ = window_grid(h, w, window, step)
    pad_b = rows * step + (window - step) - border - h
    pad_r = cols * step + (window - step) - border - w
    return np.pad(image, ((border, pad_b), (border, pad_r), (0, 0)), mode="reflect")


def iter_windows(padded: np.ndarray, corners, window: int) -> Iterator[np.ndarray]:
    for y, x in corners:
        yield padded[y:y + window, x:x + window]


def predict_tiled_many(model, images: Sequence[np.ndarray], batch_size: int = 4, progress: bool = True,
                       desc: str = "HoVer-Net windows") -> List[Dict[str, np.ndarray]]:
    """HoVer-Net maps of several images of any size; windows of all images share batches.

    Args:
        model: HoVerNet (or any model with ``input_size``, ``output_size`` and the
            same dict outputs).
        images: sequence of [H, W, 3] uint8 RGB images (sizes may differ).
        batch_size: int. Windows per forward pass.
        progress: bool. Show a tqdm bar over batches.
        desc: str. Bar label.

    Returns:
        one dict per image: ``np`` [H, W] nucleus probability, ``hv`` [H, W, 2]
        and, with a type branch, ``tp`` [H, W, T] type probabilities.

    Example:
        >>> maps = predict_tiled_many(HoVerNet("fast", 6), [np.zeros((224, 224, 3), "uint8")])  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from histokd.nuclei.hovernet import predict_maps

    window, step = int(model.input_size), int(model.output_size)
    images = [_as_rgb_uint8(im) for im in images]
    padded, jobs, grids = [], [], []
    for i, image in enumerate(images):
        rows, cols, corners = window_grid(image.shape[0], image.shape[1], window, step)
        padded.append(pad_for_tiling(image, window, step))
        grids.append((rows, cols))
        jobs.extend((i, y, x) for y, x in corners)
    stitched: List[Dict[str, np.ndarray]] = [{} for _ in images]
    n_batches = math.ceil(len(jobs) / batch_size)
    bar = tqdm(total=n_batches, desc=desc, disable=(not progress) or None, leave=False)
    try:
        for b in range(n_batches):
            chunk = jobs[b * batch_size:(b + 1) * batch_size]
            batch = np.stack([padded[i][y:y + window, x:x + window] for i, y, x in chunk])
            maps = predict_maps(model, batch, batch_size=len(batch))
            for key, val in maps.items():
                for (i, y, x), tile in zip(chunk, val):
                    if key not in stitched[i]:
                        rows, cols = grids[i]
                        stitched[i][key] = np.zeros((rows * step, cols * step) + val.shape[3:], np.float32)
                    stitched[i][key][y:y + step, x:x + step] = tile
            bar.update(1)
    finally:
        bar.close()
    return [{k: v[:im.shape[0], :im.shape[1]] for k, v in st.items()} for st, im in zip(stitched, images)]


def predict_tiled(model, image, batch_size: int = 4, progress: bool = True,
                  desc: str = "HoVer-Net windows") -> Dict[str, np.ndarray]:
    """HoVer-Net maps of one image of any size, stitched from windows.

    Args:
        model: HoVerNet.
        image: [H, W, 3] uint8 RGB (or float in [0, 1]).
        batch_size: int. Windows per forward pass.
        progress: bool. Show a tqdm bar over batches.
        desc: str. Bar label.

    Returns:
        dict ``np`` [H, W], ``hv`` [H, W, 2] and optionally ``tp`` [H, W, T],
        aligned with ``image``.

    Example:
        >>> maps = predict_tiled(HoVerNet("fast", 6), np.zeros((400, 300, 3), "uint8"))  # doctest: +SKIP
        >>> maps["np"].shape  # doctest: +SKIP
        (400, 300)
    """
    return predict_tiled_many(model, [image], batch_size, progress, desc)[0]


def _resize(arr: np.ndarray, size_hw: Tuple[int, int], nearest: bool = False) -> np.ndarray:
    h, w = size_hw
    if arr.shape[:2] == (h, w):
        return arr
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if h < arr.shape[0] else cv2.INTER_LINEAR
    if arr.dtype in (np.int32, np.int64) and nearest:
        # OpenCV resizes at most int32/float; ids beyond 2**24 lose nothing with int32
        return cv2.resize(arr.astype(np.int32), (w, h), interpolation=interp).astype(arr.dtype)
    return cv2.resize(arr, (w, h), interpolation=interp)


def segment_many(model, images: Sequence[np.ndarray], mpp: Optional[float] = None,
                 model_mpp: float = MODEL_MPP, resample: bool = True, batch_size: int = 4,
                 progress: bool = True) -> List[NucleiResult]:
    """:func:`segment_nuclei` for several images, batching their windows together."""
    if mpp is not None and (not np.isfinite(mpp) or mpp <= 0):
        raise DataError(f"mpp={mpp} is not a positive resolution in µm/px; pass e.g. 0.25 or 0.5")
    images = [_as_rgb_uint8(im) for im in images]
    work = images
    if mpp is not None and resample and abs(mpp - model_mpp) > 1e-6:
        f = mpp / model_mpp
        work = [_resize(im, (max(1, round(im.shape[0] * f)), max(1, round(im.shape[1] * f))))
                for im in images]
    all_maps = predict_tiled_many(model, work, batch_size=batch_size, progress=progress)
    post_mpp = mpp if (mpp is not None and not resample) else None
    out = []
    for image, maps in zip(images, all_maps):
        res = postprocess(maps["np"], maps["hv"], maps.get("tp"), mpp=post_mpp)
        h, w = image.shape[:2]
        if res.inst_map.shape != (h, w):
            # ids survive nearest resizing; keep each nucleus' type and vote share from full resolution
            inst = _resize(res.inst_map, (h, w), nearest=True)
            nuclei = instance_info(inst)
            for nid, nuc in nuclei.items():
                if nid in res.nuclei:
                    nuc.type, nuc.type_prob = res.nuclei[nid].type, res.nuclei[nid].type_prob
            res = NucleiResult(inst, nuclei)
        out.append(res)
    return out


def segment_nuclei(model, image, mpp: Optional[float] = None, model_mpp: float = MODEL_MPP,
                   resample: bool = True, batch_size: int = 4, progress: bool = True) -> NucleiResult:
    """Segment and type the nuclei of one image with HoVer-Net (tiled).

    Resolution: with ``mpp`` (the image's µm/px) and ``resample=True`` the image
    is resized to the model's ``model_mpp`` (0.25 for the released weights),
    segmented there, and the instance map is resized back (nearest) so it aligns
    with the input; with ``resample=False`` the image is processed as is and the
    post-processing constants are scaled instead (TIAToolbox's rule). ``mpp=None``
    means the image is already at the model's resolution.

    Args:
        model: HoVerNet.
        image: [H, W, 3] uint8 RGB.
        mpp: float or None. Image resolution in µm/px.
        model_mpp: float. Resolution the weights expect.
        resample: bool. Resize to ``model_mpp`` (True) or scale the constants.
        batch_size: int. Windows per forward pass.
        progress: bool. Progress bar over windows.

    Returns:
        NucleiResult at the input image's resolution (types 0 when the model
        has no type branch).

    Example:
        >>> res = segment_nuclei(load_official_checkpoint(p), tile, mpp=0.5)  # doctest: +SKIP
        >>> res.counts(6)  # doctest: +SKIP
    """
    return segment_many(model, [image], mpp=mpp, model_mpp=model_mpp, resample=resample,
                        batch_size=batch_size, progress=progress)[0]
