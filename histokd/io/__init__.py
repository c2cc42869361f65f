"""Checkpoint readers that need neither PyTorch nor Keras: safetensors, ``torch.save`` files, HF folders.

Example:
    >>> from histokd.io import read_checkpoint
    >>> state_dict = read_checkpoint("hf_models/vit-base-patch16-224")  # doctest: +SKIP
"""

from histokd.io.checkpoints import WEIGHT_FILES, read_checkpoint, read_torch_state_dict
from histokd.io.safetensors_file import read_safetensors, write_safetensors
from histokd.io.torch_file import read_torch_file

__all__ = ["WEIGHT_FILES", "read_checkpoint", "read_safetensors", "read_torch_file",
           "read_torch_state_dict", "write_safetensors"]
