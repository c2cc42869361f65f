"""Reusable Keras layers (heads, attention, masking)."""

from histokd.layers.attention import MLP, DropPath, LayerScale, MultiHeadSelfAttention
from histokd.layers.heads import Expander, LinearHead

__all__ = ["DropPath", "Expander", "LayerScale", "LinearHead", "MLP", "MultiHeadSelfAttention"]
