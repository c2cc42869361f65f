"""Name → factory registries for backbones, methods, losses, view makers, datasets."""

from __future__ import annotations

from typing import Callable, Dict

from histokd.errors import RegistryError


class Registry:
    """A named mapping from lower_snake keys to factories.

    Args:
        kind: str. What the registry holds ("backbone", "loss", ...), used in errors.

    Example:
        >>> BACKBONES = Registry("backbone")
        >>> @BACKBONES.register("resnet18")
        ... def make(**kw): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str, obj: Callable | None = None):
        def deco(fn):
            if name in self._items and self._items[name] is not fn:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return deco(obj) if obj is not None else deco

    def get(self, name: str) -> Callable:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items


BACKBONES = Registry("backbone")
METHODS = Registry("method")
LOSSES = Registry("loss")
VIEWS = Registry("view maker")
DATASETS = Registry("dataset source")
