"""Read a checkpoint file or a Hugging Face model folder into ``{name: numpy array}``.

Works for ``.safetensors`` files (:mod:`histokd.io.safetensors_file`), ``torch.save``
files of either PyTorch format (:mod:`histokd.io.torch_file`, never executing code from
the file) and folders holding ``model.safetensors``, ``pytorch_model.bin`` or a sharded
``*.index.json`` of either. Nested training checkpoints (``{"state_dict": ...}``,
``{"model": ..., "optimizer": ...}``) are unwrapped.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np

from histokd.errors import WeightsError
from histokd.io.safetensors_file import read_safetensors
from histokd.io.torch_file import read_torch_file

__all__ = ["read_checkpoint", "read_torch_state_dict", "WEIGHT_FILES"]

#: File names of a Hugging Face model folder's weights, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "student", "net",
                "network", "encoder", "params")


def read_torch_state_dict(path, key: str | None = None) -> Dict[str, np.ndarray]:
    """Read a ``torch.save`` checkpoint (zip or legacy format) into numpy without importing torch.

    Args:
        path: str or Path. ``.bin`` / ``.pt`` / ``.pth`` file.
        key: str or None. Top-level entry holding the weights; None: detect
            (``state_dict``, ``model``, ``model_state_dict``, ``module``, ``teacher``…).

    Returns:
        dict mapping parameter names to numpy arrays (BF16 becomes float32).

    Raises:
        WeightsError: missing or unreadable file, or no state dict inside.

    Example:
        >>> sd = read_torch_state_dict("pytorch_model.bin")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; check the path")
    try:
        obj = read_torch_file(path)
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, KeyError, IndexError,
            AttributeError, struct.error, zipfile.BadZipFile) as e:
        raise WeightsError(f"cannot read the PyTorch checkpoint {path} ({type(e).__name__}: {e}); the file "
                           "is corrupt or not a torch.save file — re-download it") from None
    return _unwrap_state_dict(obj, key, path)


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values())


def _unwrap_state_dict(obj, key, path):
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(obj)[:20] if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"{path} has no entry {key!r}; top-level entries: {have}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} stores a pickled {obj!r} object, not a state_dict; in PyTorch run "
                           "torch.save(model.state_dict(), path) and load that file")
    if _is_tensor_dict(obj):
        return dict(obj)
    for k in _NESTED_KEYS:
        if k in obj and isinstance(obj[k], dict):
            inner = {n: v for n, v in obj[k].items() if isinstance(v, np.ndarray)}
            if inner:
                return inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if tensors:
        return tensors
    raise WeightsError(f"{path} holds no tensors at the top level; entries: {sorted(map(str, obj))[:20]}; "
                       "pass key=<entry> naming the state_dict")


def read_checkpoint(path, key: str | None = None) -> Dict[str, np.ndarray]:
    """Read a checkpoint file or a Hugging Face model folder into ``{name: array}``.

    Args:
        path: str or Path. ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file, or a folder
            holding ``model.safetensors``, ``pytorch_model.bin`` or a shard index of either.
        key: str or None. Entry of a nested PyTorch checkpoint holding the weights.

    Returns:
        dict mapping tensor names to numpy arrays.

    Raises:
        WeightsError: missing path, a folder without weights, or an unreadable file.

    Example:
        >>> sd = read_checkpoint("hf_models/swinv2-tiny-patch4-window8-256")  # doctest: +SKIP
    """
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return read_checkpoint(path / name, key)
        for name in _INDEX_FILES:
            if (path / name).is_file():
                try:
                    index = json.loads((path / name).read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise WeightsError(f"{path / name} is not a readable shard index ({e}); "
                                       "re-download it") from None
                out = {}
                for shard in sorted(set(index.get("weight_map", {}).values())):
                    out.update(read_checkpoint(path / shard, key))
                return out
        raise WeightsError(f"{path} holds no {', '.join(WEIGHT_FILES)} or shard index; "
                           "point to the checkpoint file itself")
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; check the path")
    with open(path, "rb") as f:
        head = f.read(16)
    # safetensors: 8-byte little-endian header length, then the JSON header
    if (len(head) >= 9 and head[8:9] == b"{") or path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_state_dict(path, key)
