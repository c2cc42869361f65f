"""Small image-file writers shared by the data tests (not a conftest: plain helpers)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np


def rgb(seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write(path, img, fmt=None):
    """Write RGB / grey / RGBA (uint8 or uint16) arrays; TIFF via tifffile, GIF via Pillow."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or path.suffix.lower().lstrip(".")
    if fmt in ("tif", "tiff"):
        import tifffile

        tifffile.imwrite(path, img)
        return path
    if fmt == "gif":
        from PIL import Image

        Image.fromarray(img).save(path)
        return path
    arr = img
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    ok, buf = cv2.imencode("." + fmt, np.ascontiguousarray(arr))
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def class_tree(root, classes=("A", "B", "C"), per_class=5, ext="png", size=16, seed=0):
    """root/<class>/img_<i>.<ext> with a class-dependent mean colour."""
    paths = []
    for k, c in enumerate(classes):
        for i in range(per_class):
            img = rgb(seed * 1000 + k * 100 + i, size) // 4 + np.uint8(60 * k)
            paths.append(write(Path(root) / c / f"{c}_{i}.{ext}", img))
    return paths
