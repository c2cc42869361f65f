"""Errors raised for user mistakes.

Every error a user can cause (a bad config key, a missing file, an image that
cannot be decoded, weights that do not fit) is a subclass of
:class:`HistokdError`, whose message says what was wrong and what to do.
"""


class HistokdError(Exception):
    """Base class of every histokd error a user can act on."""


class ConfigError(HistokdError, ValueError):
    """A configuration is invalid: unknown key, wrong type, bad value."""


class DataError(HistokdError, ValueError):
    """A dataset, manifest or image cannot be used as given."""


class BadImageError(DataError):
    """An image file cannot be decoded (corrupt, truncated, unknown format)."""


class WeightsError(HistokdError, ValueError):
    """Weights or a checkpoint do not fit the architecture they are loaded into."""


class CollapseError(HistokdError, RuntimeError):
    """A self-supervised run collapsed (embeddings lost their variance)."""


class StainError(HistokdError, ValueError):
    """Stain normalisation cannot be fitted or applied as requested."""


class RegistryError(HistokdError, KeyError):
    """A name is not in a registry."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""
