"""Name → class registries: the only place histokd dispatches on a name.

Backbones, methods, losses, view kinds, data sources and tasks register themselves
under a lower_snake key when their module is imported. A registry knows which
built-in packages hold its entries and, the first time it is asked for a name,
imports each of them and every public module inside it — so a new built-in method is
one new file in ``histokd/methods/`` (no list to edit), ``METHODS.get("vicreg")`` works
without importing anything first, and a plugin of the user's (a method defined in their
own file) joins by importing ``histokd.registry`` and calling :meth:`Registry.register`.

Example:
    >>> from histokd.registry import METHODS
    >>> @METHODS.register("my_method")
    ... class MyMethod(Method): ...
    >>> METHODS.get("my_method") is MyMethod
    True
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable

from histokd.errors import RegistryError


def import_package(name: str):
    """Import the module ``name`` and, if it is a package, every public module below it."""
    import pkgutil

    module = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=name + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            importlib.import_module(info.name)
    return module


class Registry:
    """A named mapping from lower_snake keys to classes or factories.

    Args:
        kind: str. What the registry holds ("backbone", "loss", ...), used in errors.
        plugins: iterable of str. Packages (or modules) whose import registers the built-in
            entries; on the first look-up each is imported with every public submodule
            (names not starting with ``_``).

    Example:
        >>> BACKBONES = Registry("backbone")
        >>> @BACKBONES.register("resnet18")
        ... def make(**kw): ...
    """

    def __init__(self, kind: str, plugins: Iterable[str] = ()):
        self.kind = kind
        self._items: Dict[str, Callable] = {}
        self._examples: Dict[str, Callable] = {}
        self._plugins = tuple(plugins)
        self._loaded = not self._plugins

    def _load(self):
        if not self._loaded:
            self._loaded = True  # first, so a plugin that looks itself up does not recurse
            for module in self._plugins:
                import_package(module)

    def register(self, name: str, obj: Callable | None = None, example: Callable | None = None):
        """Register ``obj`` under ``name`` (usable as a decorator). Registering another
        object under a taken name raises :class:`RegistryError`.

        Args:
            name: str. The lower_snake key.
            obj: the class or function (omit to use ``register`` as a decorator).
            example: callable returning small example inputs of ``obj`` (for losses:
                ``(args, kwargs)``); the registry tests run every entry on them.
        """
        def deco(fn):
            if name in self._items and self._items[name] is not fn:
                raise RegistryError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            if example is not None:
                self._examples[name] = example
            return fn

        return deco(obj) if obj is not None else deco

    def unregister(self, name: str):
        """Remove ``name`` (tests that register a throw-away entry clean up with this)."""
        self._items.pop(name, None)
        self._examples.pop(name, None)

    def example(self, name: str):
        """Example inputs of ``name`` (the ``example`` given at registration), or None."""
        self._load()
        fn = self._examples.get(name)
        return None if fn is None else fn()

    def get(self, name: str) -> Callable:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def names(self):
        self._load()
        return sorted(self._items)

    def items(self):
        self._load()
        return sorted(self._items.items())

    def __contains__(self, name):
        self._load()
        return name in self._items


#: modules whose import registers every serialisable histokd layer/model with Keras
KERAS_OBJECT_MODULES = ("histokd.layers", "histokd.losses", "histokd.methods", "histokd.backbones",
                        "histokd.tasks", "histokd.data.augment", "histokd.data.views", "histokd.stain",
                        "histokd.nuclei.hovernet")


def register_keras_objects():
    """Import every module that registers histokd's custom Keras objects, so a ``.keras``
    file written by histokd loads with ``keras.saving.load_model`` (what ``import histokd``
    does; for modules that must not import the package root)."""
    for module in KERAS_OBJECT_MODULES:
        import_package(module)


BACKBONES = Registry("backbone", ["histokd.backbones"])
METHODS = Registry("method", ["histokd.methods"])
LOSSES = Registry("loss", ["histokd.losses"])
VIEWS = Registry("view kind", ["histokd.data.views"])
SOURCES = Registry("data source", ["histokd.data.sources"])
TASKS = Registry("task", ["histokd.tasks"])
#: Former name of :data:`SOURCES`.
DATASETS = SOURCES
