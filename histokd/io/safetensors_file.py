"""Read and write ``.safetensors`` files as numpy arrays with the ``safetensors`` package.

The package's numpy API (``safe_open(..., framework="np")``, ``safetensors.numpy.save_file``)
does the parsing; this module adds what histokd needs on top: BF16 tensors (numpy has no
bfloat16) widened to float32, and a :class:`~histokd.errors.WeightsError` naming the file
and what to do when it is missing, truncated or not a safetensors file at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from histokd.errors import WeightsError

__all__ = ["read_safetensors", "write_safetensors"]

# What the package's header errors mean for the user (matched on its message text).
_HEADER_PROBLEMS = (
    ("header too large", "its header length exceeds the file size"),
    ("header too small", "it is shorter than a safetensors header"),
    ("invalid json", "its header is not valid JSON"),
    ("incomplete metadata", "the tensor byte ranges do not cover the file: it is truncated or corrupt"),
    ("invalid offset", "a tensor's byte range does not fit: the file is truncated or corrupt"),
)


def _bf16_to_f32(raw: bytes, shape) -> np.ndarray:
    u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return (u16 << 16).view(np.float32).reshape(shape)


def _weights_error(path: Path, err: Exception) -> WeightsError:
    text = str(err)
    reason = next((why for sign, why in _HEADER_PROBLEMS if sign in text.lower()),
                  "the file is truncated or corrupt")
    return WeightsError(f"{path} is not a readable safetensors file: {reason} (safetensors said: "
                        f"{text}); re-download it, or pass the PyTorch .bin of the same model instead")


def read_safetensors(path) -> Dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into numpy (BF16 becomes float32).

    Args:
        path: str or Path. The file.

    Returns:
        dict mapping tensor names to arrays.

    Raises:
        WeightsError: the file is missing, truncated, corrupt or holds an unsupported dtype.

    Example:
        >>> sd = read_safetensors("model.safetensors")  # doctest: +SKIP
    """
    import safetensors
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"safetensors file {path} does not exist; check the path")
    out: Dict[str, np.ndarray] = {}
    wide = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                info = f.get_slice(name)
                if info.get_dtype() == "BF16":
                    wide[name] = info.get_shape()
                    continue
                out[name] = f.get_tensor(name)
        if wide:  # numpy cannot hold BF16: take the raw bytes and widen them
            for name, spec in safetensors.deserialize(path.read_bytes()):
                if name in wide:
                    out[name] = _bf16_to_f32(bytes(spec["data"]), spec["shape"])
    except SafetensorError as err:
        raise _weights_error(path, err) from None
    except TypeError as err:  # a dtype numpy does not know
        raise WeightsError(f"{path}: a tensor has a dtype numpy cannot represent ({err}); convert the "
                           "checkpoint to float32/float16/bfloat16 first") from None
    return out


def write_safetensors(path, tensors: Dict[str, np.ndarray], metadata: Dict[str, str] | None = None):
    """Write numpy arrays as a ``.safetensors`` file.

    Args:
        path: str or Path. Output file.
        tensors: dict of name → array (float64/32/16, signed/unsigned int, bool).
        metadata: dict of str → str stored under ``__metadata__``.

    Raises:
        WeightsError: an array has a dtype safetensors cannot store.

    Example:
        >>> write_safetensors("w.safetensors", {"a": np.zeros((2, 3), "float32")})  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arrays = {}
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays[name] = np.ascontiguousarray(arr) if arr.ndim else arr
    meta = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    try:
        save_file(arrays, str(path), metadata=meta)
    except (SafetensorError, ValueError, TypeError, KeyError) as err:
        raise WeightsError(f"cannot write {path} as safetensors ({err}); convert the arrays to "
                           "float, int or bool first") from None
