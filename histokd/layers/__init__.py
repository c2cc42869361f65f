"""Reusable Keras layers (heads, attention, masking)."""

from histokd.layers.heads import Expander, LinearHead

__all__ = ["Expander", "LinearHead"]
