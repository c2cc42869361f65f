"""The ``augment`` section of a run: one dataclass for the YAML schema and the augmentation.

Lives apart from :mod:`histokd.data.augment` so that :mod:`histokd.config` can use it
without importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from histokd.errors import ConfigError

__all__ = ["AugmentConfig"]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths of the Table S1 augmentations (the ``augment`` section).

    Defaults follow *More From Less*, Supplementary Table S1 (probabilities: flips
    1.0, crop (75-100 % of the area) 1.0, Gaussian background noise 0.3, rotation
    0.4, solarise 0.3, colour jitter 1.0) and the usual SimCLR/VICReg colour jitter
    strengths for what the paper leaves open; see :mod:`histokd.data.augment` for
    every choice. One class serves both the YAML schema
    (:attr:`histokd.config.RunConfig.augment`) and the batched augmentation; it is
    frozen (hashable: ``tf.function`` caches on it) and keeps ranges as tuples.

    Args:
        p_flip: float. Probability that the random flip step runs (each axis
            is then flipped with probability 0.5).
        p_crop: float. Probability of the random-resized-crop.
        crop_scale: tuple[float, float]. Range of the crop area fraction.
        crop_ratio: tuple[float, float]. Range of the crop aspect ratio.
        p_rotate: float. Probability of a rotation.
        max_rotation: float. Rotation angles are uniform in +-max_rotation degrees.
        p_noise: float. Probability of additive pixel noise.
        noise_std: float. Standard deviation of the noise ([0, 1] scale).
        noise_dist: str. "irwin_hall" (fast, Gaussian-like) or "normal".
        p_solarize: float. Probability of solarisation.
        solarize_threshold: float. Values >= threshold are inverted.
        p_jitter: float. Probability of colour jitter.
        brightness: float. Brightness strength b (factor in [1-b, 1+b]).
        contrast: float. Contrast strength c (factor in [1-c, 1+c]).
        saturation: float. Saturation strength s (factor in [1-s, 1+s]).
        hue: float. Hue shift range in turns (shift in [-h, h], h <= 0.5).
        brightness_mode: str. "multiplicative" (torchvision) or "additive" (tf.image).
        fill_mode: str. Fill of points outside the image: "reflect", "nearest", "constant".
        p_grayscale: float. Probability of turning a view grey (luma in all three channels;
            BYOL / MoBY: 0.2). Off (0) in the More From Less recipe.
        p_blur: float. Probability of a Gaussian blur (BYOL / MoBY: 1.0 and 0.1 for the two
            views). Off (0) in the More From Less recipe.
        blur_sigma: tuple[float, float]. Range of the blur's standard deviation in pixels of
            the output (uniform; BYOL: 0.1–2.0 at 224 px); the kernel reaches 3 σ_max.

    Example:
        >>> cfg = AugmentConfig(p_rotate=0.5, noise_std=0.02)
        >>> AugmentConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    p_flip: float = 1.0
    p_crop: float = 1.0
    crop_scale: tuple = (0.75, 1.0)
    crop_ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    p_rotate: float = 0.4
    max_rotation: float = 180.0
    p_noise: float = 0.3
    noise_std: float = 0.05
    noise_dist: str = "irwin_hall"
    p_solarize: float = 0.3
    solarize_threshold: float = 0.5
    p_jitter: float = 1.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    brightness_mode: str = "multiplicative"
    fill_mode: str = "reflect"
    p_grayscale: float = 0.0
    p_blur: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)

    def __post_init__(self):
        # tuples (not lists) keep the config hashable: tf.function caches on it
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"augment.{name} must be two numbers (low, high), got {value!r}"
                ) from None
            object.__setattr__(self, name, (lo, hi))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float",) and not isinstance(value, (int, float)):
                raise ConfigError(f"augment.{f.name} must be a number, got {value!r}")
            if f.name.startswith("p_") and not 0.0 <= float(value) <= 1.0:
                raise ConfigError(
                    f"augment.{f.name} is a probability and must lie in [0, 1], got {value!r}"
                )
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(
                f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}"
            )
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= 1.0 <= hi:
            raise ConfigError(
                f"augment.crop_ratio must satisfy 0 < low <= 1 <= high, got {self.crop_ratio}"
            )
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi:
            raise ConfigError(f"augment.blur_sigma must satisfy 0 < low <= high (pixels), got {self.blur_sigma}")
        for name in ("brightness", "contrast", "saturation", "noise_std", "max_rotation"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"augment.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augment.hue is in turns and must lie in [0, 0.5], got {self.hue!r}")
        if self.noise_dist not in ("irwin_hall", "normal"):
            raise ConfigError(
                f"augment.noise_dist must be 'irwin_hall' or 'normal', got {self.noise_dist!r}"
            )
        if self.brightness_mode not in ("multiplicative", "additive"):
            raise ConfigError(
                "augment.brightness_mode must be 'multiplicative' or 'additive', "
                f"got {self.brightness_mode!r}"
            )
        if self.fill_mode not in ("reflect", "nearest", "constant"):
            raise ConfigError(
                f"augment.fill_mode must be 'reflect', 'nearest' or 'constant', got {self.fill_mode!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AugmentConfig":
        """Builds a config from a mapping, rejecting unknown keys.

        Args:
            values: Mapping. Field name -> value; missing fields keep their defaults.

        Returns:
            AugmentConfig.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown augmentation key(s) {unknown}; valid keys: {', '.join(valid)}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict:
        """Returns a JSON-friendly dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        out["crop_scale"] = list(self.crop_scale)
        out["crop_ratio"] = list(self.crop_ratio)
        out["blur_sigma"] = list(self.blur_sigma)
        return out

    def replace(self, **changes) -> "AugmentConfig":
        """Returns a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def geometric_only(self) -> "AugmentConfig":
        """Returns a copy with every colour operation disabled (used for masks)."""
        return self.replace(p_noise=0.0, p_solarize=0.0, p_jitter=0.0)

    @classmethod
    def identity(cls) -> "AugmentConfig":
        """Returns a config whose every probability is 0 (no augmentation)."""
        return cls(p_flip=0.0, p_crop=0.0, p_rotate=0.0, p_noise=0.0, p_solarize=0.0, p_jitter=0.0)
