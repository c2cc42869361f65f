"""Decode image files of any common kind into RGB uint8 arrays.

One numpy decoder (OpenCV, with tifffile and Pillow as fall-backs) for PNG, JPEG,
TIFF, BMP and GIF; 8- or 16-bit; grey, grey+alpha, RGB or RGBA. It is used by
``histokd data prepare`` (which writes lossless PNG TFRecords so that training
never decodes TIFF in Python) and as the fall-back decoder of the tf.data
pipeline. The in-graph decoder (:func:`decode_image_tf`, used by the tf.data
pipeline) follows exactly the same conversion rules, so both paths give identical
pixels:

* 16-bit samples become 8-bit by ``round(x / 257)`` (65535 → 255, exact inverse of
  the usual 8 → 16 bit expansion ``v * 257``).
* Grey is repeated into three channels.
* Alpha is composited on **white** (histology background is white, so a transparent
  border should look like glass, not black): ``out = (c*a + 255*(255-a) + 127) // 255``
  in integers.
* Floating-point images are taken as [0, 1] when their maximum is <= 1, else as
  [0, 255]; they are clipped and rounded.
* Multi-page TIFFs and animated GIFs give their first frame.

Example:
    >>> from histokd.data.decode import decode_image_file
    >>> rgb = decode_image_file("tile.tif")   # doctest: +SKIP
    >>> rgb.dtype, rgb.shape[-1]               # doctest: +SKIP
    (dtype('uint8'), 3)
"""

from __future__ import annotations

import contextlib
import io
import os
import threading

import cv2
import numpy as np

from histokd.errors import BadImageError

#: File extensions treated as images by folder sources (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

_HINT = ("fix or delete the file, or skip undecodable images with "
         "`--set data.on_bad_image=skip` (skips are counted and reported)")


def sniff_format(head: bytes) -> str | None:
    """Image format from the first bytes of a file ("png", "jpeg", "tiff", "bmp", "gif") or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"GIF87a") or head.startswith(b"GIF89a"):
        return "gif"
    return None


def check_image_header(path: str) -> str:
    """Cheap validity check of an image file without decoding it.

    Reads the first and last bytes: the magic number must name a known format,
    and PNG/JPEG files must end with their end marker (catches truncated
    downloads). TIFF/BMP/GIF are only checked for the magic number and a plausible
    size.

    Args:
        path: str. Image file.

    Returns:
        The detected format ("png", "jpeg", "tiff", "bmp" or "gif").

    Raises:
        BadImageError: the file is missing, empty, truncated or not an image.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(32)
            if size > 64:
                f.seek(-32, os.SEEK_END)
            tail = f.read(32)
    except OSError as exc:
        raise BadImageError(f"cannot read image {path!r}: {exc}; {_HINT}") from None
    fmt = sniff_format(head)
    if fmt is None:
        raise BadImageError(f"{path!r} is not a PNG/JPEG/TIFF/BMP/GIF image (unknown file signature "
                            f"{head[:8]!r}, {size} bytes); {_HINT}")
    if size < 40:
        raise BadImageError(f"image {path!r} is only {size} bytes long (truncated?); {_HINT}")
    if fmt == "png" and b"IEND" not in tail:
        raise BadImageError(f"PNG {path!r} is truncated (no IEND chunk at its end); {_HINT}")
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        raise BadImageError(f"JPEG {path!r} is truncated (no end-of-image marker); {_HINT}")
    return fmt


def to_rgb_uint8(img: np.ndarray, bgr: bool = False) -> np.ndarray:
    """Convert a decoded image array to RGB uint8 ``[H, W, 3]`` (rules in the module doc).

    Args:
        img: np.ndarray. ``[H, W]``, ``[H, W, 1|2|3|4]``; uint8, uint16, other ints,
            bool or float.
        bgr: bool. Channels are in OpenCV's BGR(A) order.

    Returns:
        uint8 array ``[H, W, 3]``.

    Example:
        >>> to_rgb_uint8(np.full((2, 2), 65535, np.uint16))[0, 0].tolist()
        [255, 255, 255]
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise BadImageError(f"cannot interpret an image array of shape {img.shape} as grey/RGB/RGBA")
    img = _to_uint8(img)
    c = img.shape[-1]
    if bgr and c >= 3:
        img = img[..., [2, 1, 0] + ([3] if c == 4 else [])]
    if c in (2, 4):
        colour, alpha = img[..., :-1].astype(np.int32), img[..., -1:].astype(np.int32)
        img = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return np.ascontiguousarray(img)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(img.dtype, np.floating):
        f = np.nan_to_num(img.astype(np.float64))
        if f.max(initial=0.0) <= 1.0:
            f = f * 255.0
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        if info.max <= 255:
            return np.clip(img, 0, 255).astype(np.uint8)
        # other wide integer types: scale the type's range onto 0..255
        f = np.clip(img.astype(np.float64), 0, None) * (255.0 / info.max)
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    raise BadImageError(f"unsupported image dtype {img.dtype}")


def _read_tiff(data: bytes):
    """First page of a TIFF with tifffile → (array [H, W(, C)], alpha is associated)."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        arr = page.asarray()
        extras = tuple(getattr(page, "extrasamples", ()) or ())
        planar = getattr(page, "planarconfig", 1) == 2
    if planar and arr.ndim == 3:
        arr = np.moveaxis(arr, 0, -1)
    return arr, bool(extras) and int(extras[0]) == 1


def _composite_premultiplied(arr):
    """Premultiplied (associated) alpha on white: ``out = c + (1 - a) * white``."""
    a8 = _to_uint8(arr[..., -1:]).astype(np.int32)
    c8 = _to_uint8(arr[..., :-1]).astype(np.int32)
    out = np.clip(c8 + (255 - a8), 0, 255).astype(np.uint8)
    return out


_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = None


@contextlib.contextmanager
def quiet_opencv():
    """Silence OpenCV's own logging while we decode (we report bad images ourselves).

    Thread-safe and re-entrant: the first entrant saves OpenCV's log level, the
    last one out restores it (NCT-CRC-HE TIFFs otherwise print a libtiff warning
    per file).
    """
    global _quiet_depth, _quiet_saved
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:  # pragma: no cover - OpenCV builds without cv2.utils.logging
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = logging.getLogLevel()
            logging.setLogLevel(logging.LOG_LEVEL_SILENT)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                logging.setLogLevel(_quiet_saved)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes into RGB uint8 ``[H, W, 3]``.

    Args:
        data: bytes. Content of a PNG/JPEG/TIFF/BMP/GIF file.
        name: str. Used in error messages.

    Returns:
        uint8 ``[H, W, 3]``.

    Raises:
        BadImageError: the bytes cannot be decoded by any decoder.
    """
    if not data:
        raise BadImageError(f"image {name!r} is empty (0 bytes); {_HINT}")
    fmt = sniff_format(data[:16])
    buf = np.frombuffer(data, dtype=np.uint8)
    img, bgr = None, True
    if fmt != "gif":  # OpenCV cannot read GIF
        with quiet_opencv():
            try:
                img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            except cv2.error:
                img = None
    if fmt == "tiff" and (img is None or img.ndim == 2 or img.shape[-1] in (2, 4)):
        # OpenCV reads RGBA TIFFs through libtiff's RGBA interface, which premultiplies
        # the colour, and drops the alpha of grey+alpha TIFFs; tifffile gives the stored
        # samples. (Plain RGB TIFFs, the common case, keep OpenCV's faster path.)
        with contextlib.suppress(Exception):
            arr, associated = _read_tiff(data)
            img, bgr = arr, False
            if associated and arr.shape[-1] in (2, 4):
                img = _composite_premultiplied(arr)
    if img is None:
        with contextlib.suppress(Exception):
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                im.seek(0)
                if im.mode == "P":
                    im = im.convert("RGBA")
                elif im.mode not in ("L", "LA", "RGB", "RGBA", "I;16", "I;16B", "I", "F"):
                    im = im.convert("RGB")
                img = np.asarray(im)
                bgr = False
                if im.mode in ("I", "F") or img.dtype == np.int32:
                    img = img.astype(np.float64)
                    img = img / 65535.0 if img.max(initial=0) > 255 else img / 255.0
    if img is None:
        kind = fmt.upper() if fmt else "unknown-format"
        raise BadImageError(f"cannot decode {kind} image {name!r} ({len(data)} bytes; corrupt or "
                            f"truncated?); {_HINT}")
    try:
        return to_rgb_uint8(img, bgr=bgr)
    except BadImageError as exc:
        raise BadImageError(f"image {name!r}: {exc}; {_HINT}") from None


def decode_image_file(path: str) -> np.ndarray:
    """Read and decode one image file into RGB uint8 ``[H, W, 3]``.

    Handles PNG/JPEG/TIFF/BMP/GIF, 8/16-bit, grey/grey+alpha/RGB/RGBA (alpha is
    composited on white; 16-bit is scaled by 1/257). See the module docstring.

    Args:
        path: str. Image file.

    Returns:
        uint8 ``[H, W, 3]``.

    Raises:
        BadImageError: the file is missing or cannot be decoded; the message names
            the file and how to skip bad images.

    Example:
        >>> decode_image_file("tile.tif").shape  # doctest: +SKIP
        (224, 224, 3)
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImageError(f"cannot read image {path!r}: {exc}; {_HINT}") from None
    return decode_image_bytes(data, name=str(path))


# --------------------------------------------------------------------------- in-graph decoding
# The tf.data twins of the numpy decoder above (same conversion rules); TensorFlow is
# imported inside them so that this module stays importable without it.
def _composite_on_white(tf, colour, alpha):
    c = tf.cast(colour, tf.int32)
    a = tf.cast(alpha, tf.int32)
    return tf.cast((c * a + 255 * (255 - a) + 127) // 255, tf.uint8)


def to_rgb_tf(img):
    """``[H, W, C]`` uint8 with C in 1..4 → ``[H, W, 3]`` (grey repeated, alpha on white)."""
    import tensorflow as tf

    c = tf.shape(img)[-1]
    branches = [
        lambda: tf.repeat(img[..., :1], 3, axis=-1),
        lambda: tf.repeat(_composite_on_white(tf, img[..., :1], img[..., 1:2]), 3, axis=-1),
        lambda: img[..., :3],
        lambda: _composite_on_white(tf, img[..., :3], img[..., 3:4]),
    ]
    out = tf.switch_case(tf.clip_by_value(c - 1, 0, 3), branches)
    out.set_shape([None, None, 3])
    return out


def decode_image_tf(data):
    """Decode PNG (8/16-bit), JPEG, BMP or GIF bytes in graph → uint8 ``[H, W, 3]``.

    16-bit PNG samples become ``round(x / 257)``; 8-bit PNGs are read as 16-bit too
    (libpng expands ``v`` to ``v * 257``) so one exact formula covers both. JPEGs
    use the accurate integer IDCT, which matches OpenCV bit for bit.
    Animated GIFs give their first frame (GIF transparency is ignored, unlike the
    numpy decoder).
    """
    import tensorflow as tf

    head = tf.strings.substr(data, 0, 8)
    kind = tf.where(tf.equal(head, b"\x89PNG\r\n\x1a\n"), 0,
                    tf.where(tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"), 1, 2))

    def png():
        x = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
        return tf.cast((tf.cast(x, tf.int32) + 128) // 257, tf.uint8)

    def jpeg():
        # ISLOW IDCT + fancy upsampling: bit-identical to OpenCV's (libjpeg-turbo) decoder
        return tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)

    img = tf.switch_case(kind, [png, jpeg, other])
    return to_rgb_tf(img)


def resize_tf(img, image_size):
    """Resize ``[H, W, 3]`` uint8 to ``image_size`` (antialiased bilinear), skipped if equal."""
    import tensorflow as tf

    if image_size is None:
        return img
    size = int(image_size)
    h, w = tf.shape(img)[0], tf.shape(img)[1]

    def do():
        r = tf.image.resize(tf.cast(img, tf.float32), [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(r), 0.0, 255.0), tf.uint8)

    out = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: img, do)
    out.set_shape([size, size, 3])
    return out
