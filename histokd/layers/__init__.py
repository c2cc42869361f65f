"""Reusable Keras layers (heads, attention, masking)."""

from histokd.layers.attention import MLP, DropPath, LayerScale, MultiHeadSelfAttention
from histokd.layers.heads import LinearHead, ProjectionHead

__all__ = ["DropPath", "LayerScale", "LinearHead", "MLP", "MultiHeadSelfAttention", "ProjectionHead"]
