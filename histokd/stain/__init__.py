"""Stain normalisation and stain augmentation (Macenko), batched and in-graph.

More From Less §2.3: "All patches are colour-normalised using the Macenko
method". See :mod:`histokd.stain.macenko` for the algorithm, the parity with
torchstain and the robustness policy.

Example:
    >>> from histokd.stain import MacenkoNormalizer, make_stain_fn
    >>> norm = MacenkoNormalizer("torchstain")
    >>> stain = make_stain_fn("macenko", "torchstain")   # for Dataset.map
"""

from histokd.stain.macenko import (  # noqa: F401
    CONSTANT_DEFAULTS,
    MacenkoFit,
    MacenkoNormalization,
    MacenkoNormalizer,
    StainFn,
    fit_macenko,
    macenko_decompose,
    macenko_transform,
    make_stain_fn,
)
from histokd.stain.presets import PRESETS, preset_names, resolve_target  # noqa: F401
from histokd.stain.augment import StainAugmentation  # noqa: F401
from histokd.stain.folder import normalize_folder  # noqa: F401

__all__ = [
    "CONSTANT_DEFAULTS",
    "MacenkoFit",
    "MacenkoNormalization",
    "MacenkoNormalizer",
    "PRESETS",
    "StainAugmentation",
    "StainFn",
    "fit_macenko",
    "macenko_decompose",
    "macenko_transform",
    "make_stain_fn",
    "normalize_folder",
    "preset_names",
    "resolve_target",
]
