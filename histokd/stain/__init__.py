"""Stain normalisation and stain augmentation (Macenko), batched and in-graph.

More From Less §2.3: "All patches are colour-normalised using the Macenko
method". See :mod:`histokd.stain.macenko` for the algorithm, the parity with
torchstain and the robustness policy, and :mod:`histokd.stain.normalizer` for the
normaliser, the Keras layer and the tf.data step.

Nothing here changes process-wide settings. For the fastest CPU path (what
``histokd normalize`` and ``histokd train`` do at start-up), call, before
TensorFlow runs its first op::

    from histokd import runtime
    runtime.prefer_sequential_xla_cpu()
    runtime.apply_cpu_threads("auto", streams=2)

Example:
    >>> from histokd.stain import MacenkoNormalizer, make_stain_fn
    >>> norm = MacenkoNormalizer("torchstain")
    >>> stain = make_stain_fn("macenko", "torchstain")   # for Dataset.map
"""

from histokd.stain.macenko import (  # noqa: F401
    CONSTANT_DEFAULTS,
    MacenkoFit,
    fit_macenko,
    macenko_decompose,
    macenko_transform,
)
from histokd.stain.normalizer import STAIN_NORMALIZERS, stain_normalizes  # noqa: F401
from histokd.stain.normalizer import (  # noqa: F401
    MacenkoNormalization,
    MacenkoNormalizer,
    StainFn,
    make_stain_fn,
)
from histokd.stain.presets import PRESETS, preset_names, resolve_target  # noqa: F401
from histokd.stain.augment import StainAugmentation  # noqa: F401
from histokd.stain.folder import normalize_folder  # noqa: F401

__all__ = [
    "STAIN_NORMALIZERS", "stain_normalizes",
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
