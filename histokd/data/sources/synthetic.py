"""The procedural H&E demo set as a source (``data.source: synthetic``)."""

from __future__ import annotations

import numpy as np

from histokd.data.sources.arrays import ArraySource
from histokd.data.sources.base import SPLITS, _check_fractions, _check_split, _get, stratified_split
from histokd.errors import ConfigError
from histokd.registry import SOURCES

@SOURCES.register("synthetic")
class SyntheticSource(ArraySource):
    """The procedural H&E demo set (see :mod:`histokd.data.synthetic`), split stratified.

    Args:
        n_per_class: int. Images per class (all splits together).
        image_size: int. Tile side in pixels.
        seed: int. Generator and split seed.
        num_classes: int. 1..6 tissue classes.
        val_fraction, test_fraction: float. Split fractions per class.

    Example:
        >>> src = SyntheticSource(n_per_class=10, image_size=32, num_classes=6)
        >>> src.arrays("val")[0].shape
        (12, 32, 32, 3)
    """

    def __init__(self, n_per_class=96, image_size=64, seed=0, num_classes=4, val_fraction=0.2,
                 test_fraction=0.2):
        super().__init__()
        from histokd.data.synthetic import CLASS_NAMES

        self.n_per_class, self.image_size = int(n_per_class), int(image_size)
        self.seed, self.n_classes = int(seed), int(num_classes)
        if not 1 <= self.n_classes <= len(CLASS_NAMES):
            raise ConfigError(f"data.synthetic_classes must be 1..{len(CLASS_NAMES)} "
                              f"({', '.join(CLASS_NAMES)}), got {num_classes}")
        self.val_fraction, self.test_fraction = _check_fractions(val_fraction, test_fraction)
        self.class_names = list(CLASS_NAMES[: self.n_classes])
        self._loaded = False

    def _load(self):
        if self._loaded:
            return
        from histokd.data.synthetic import make_synthetic_he

        x, y, _ = make_synthetic_he(self.n_per_class, self.image_size, self.seed, self.n_classes)
        assign = stratified_split(y, self.val_fraction, self.test_fraction, self.seed)
        for s in SPLITS:
            m = assign == s
            self._arrays[s] = (x[m], y[m]) if m.any() else None
        self._loaded = True

    def num_examples(self, split):
        if not self._loaded:  # the counts are known without rendering anything
            _check_split(split)
            y = np.repeat(np.arange(self.n_classes), self.n_per_class)
            return int(np.sum(stratified_split(y, self.val_fraction, self.test_fraction, self.seed) == split))
        return super().num_examples(split)

    def describe(self):
        return {"type": "synthetic", "n_per_class": self.n_per_class, "image_size": self.image_size,
                "seed": self.seed, "num_classes": self.n_classes, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction}

    @classmethod
    def from_config(cls, data_cfg) -> "SyntheticSource":
        """Build from a ``data`` section: ``synthetic_per_class``, ``image_size``, ``seed``,
        ``synthetic_classes``, ``val_fraction``, ``test_fraction``."""
        return cls(n_per_class=_get(data_cfg, "synthetic_per_class", 96), image_size=_get(data_cfg, "image_size", 64),
                   seed=_get(data_cfg, "seed", 0), num_classes=_get(data_cfg, "synthetic_classes", 4),
                   val_fraction=_get(data_cfg, "val_fraction", 0.2),
                   test_fraction=_get(data_cfg, "test_fraction", 0.2))

    @classmethod
    def validate(cls, cfg):
        """As :meth:`Source.validate`, except that the demo set needs no ``data.path``."""
        d = cfg.data
        if d.label != "tissue" or d.input != "image":
            super().validate(cfg)
