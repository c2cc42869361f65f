"""Reading and writing RGB image files for the stain tools (PNG, JPEG, TIFF, BMP).

Decoding goes through OpenCV from bytes (so non-ASCII paths work) and always
yields uint8 RGB [H, W, 3]: 16-bit images are rescaled, gray is replicated,
and an alpha channel is composited over white (transparent = background).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from histokd.errors import BadImageError, DataError

#: File suffixes the folder tools pick up (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

PathLike = Union[str, os.PathLike]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        scale = 255.0 if np.nanmax(img) <= 1.0 else 1.0
        return np.clip(np.round(np.nan_to_num(img) * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(img.dtype, np.integer):
        return np.clip(img, 0, 255).astype(np.uint8)
    raise BadImageError(f"unsupported pixel type {img.dtype}")


def decode_rgb(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode image bytes to uint8 RGB [H,W,3].

    Raises:
        BadImageError: the bytes are not a decodable image.
    """
    import cv2

    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if buf.size else None
    if img is None:
        raise BadImageError(
            f"cannot decode image {name}: not a valid PNG/JPEG/TIFF/BMP file (truncated or "
            "corrupt?); re-export it or remove it from the folder"
        )
    img = _to_uint8(img)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        bgr = img[:, :, :3].astype(np.float32)
        a = img[:, :, 3:4].astype(np.float32) / 255.0
        img = np.round(bgr * a + 255.0 * (1.0 - a)).astype(np.uint8)
    elif img.shape[2] != 3:
        raise BadImageError(f"image {name} has {img.shape[2]} channels; expected 1, 3 or 4")
    return np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB


def read_rgb(path: PathLike) -> np.ndarray:
    """Read an image file as uint8 RGB [H,W,3].

    Raises:
        DataError: the file does not exist.
        BadImageError: the file cannot be decoded.

    Example:
        >>> tile = read_rgb("tiles/a.png")
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"image file not found: {p}; check the path")
    return decode_rgb(p.read_bytes(), str(p))


def write_rgb(path: PathLike, rgb: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write uint8 RGB [H,W,3] to ``path``; the format follows the suffix.

    Raises:
        DataError: the suffix is not a writable image format or encoding failed.
    """
    import cv2

    p = Path(path)
    ext = p.suffix.lower()
    params = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    ok, buf = cv2.imencode(ext or ".png", np.ascontiguousarray(rgb[:, :, ::-1]), params)
    if not ok:
        raise DataError(f"cannot encode an image as {ext!r} for {p}; use .png, .jpg or .tif")
    p.write_bytes(buf.tobytes())
