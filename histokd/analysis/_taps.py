"""Reading intermediate layer outputs of any Keras model (private helpers).

Keras 3 functional graphs do not connect the outputs of layers nested inside a
sub-model (an encoder inside a classifier, a backbone inside a method) to the
outer graph, so ``keras.Model(outer.inputs, inner_layer.output)`` fails. Instead
of rebuilding graphs, :class:`LayerTaps` temporarily wraps the ``call`` method
of the chosen layer *instances* and records what they return during an ordinary
eager forward pass. This works for flat and nested functional models,
``Sequential`` models and subclassed models alike, and the recorded tensors are
part of the computation, so a ``tf.GradientTape`` can differentiate with respect
to them (GradCAM).
"""

from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from histokd.errors import ConfigError, DataError

_CONV_CLASSES = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
)


def _children(layer) -> list:
    """Direct sub-layers of ``layer`` (empty for plain layers)."""
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    try:
        return list(flatten(include_self=False, recursive=False))
    except TypeError:  # very old signature
        return list(getattr(layer, "layers", []) or [])


def iter_layers(model) -> List[Tuple[str, object]]:
    """All layers of ``model`` depth first, as ``(path, layer)``.

    ``path`` joins the names of the enclosing sub-models with ``/``
    (``"encoder/conv1_conv"``). Input layers are skipped; a layer reachable
    through several paths (shared weights) is listed once, at its first path.
    """
    out: List[Tuple[str, object]] = []
    seen = set()

    def walk(layer, prefix):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if type(child).__name__ == "InputLayer":
                continue
            path = f"{prefix}{child.name}"
            out.append((path, child))
            walk(child, path + "/")

    walk(model, "")
    return out


def is_conv(layer) -> bool:
    """True for Keras convolution layers (and subclasses of them)."""
    import keras

    classes = tuple(getattr(keras.layers, c) for c in _CONV_CLASSES if hasattr(keras.layers, c))
    return isinstance(layer, classes)


def select_layers(model, spec=None) -> List[Tuple[str, object]]:
    """Choose layers of ``model``.

    Args:
        model: keras.Model.
        spec: None | str | list[str]. ``None``: every convolution layer (the
            paper's "outputs of each convolutional layer"); a ``str``: a regular
            expression searched in each layer's name and path (e.g.
            ``r"conv\\d_block\\d+_out$"`` for ResNet stage blocks); a list: exact
            layer names or paths, in the order given.

    Returns:
        list of ``(path, layer)`` in model order (or the list's order).
    """
    layers = iter_layers(model)
    mname = getattr(model, "name", "model")
    if spec is None:
        chosen = [(p, l) for p, l in layers if is_conv(l)]
        what = "convolution layers"
    elif isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ConfigError(f"layer pattern {spec!r} is not a valid regular expression: {e}") from None
        chosen = [(p, l) for p, l in layers if rx.search(l.name) or rx.search(p)]
        what = f"layers matching {spec!r}"
    else:
        by_name: Dict[str, Tuple[str, object]] = {}
        for p, l in layers:
            by_name.setdefault(p, (p, l))
            by_name.setdefault(l.name, (p, l))
        chosen = []
        missing = []
        for name in spec:
            if name in by_name:
                chosen.append(by_name[name])
            else:
                missing.append(name)
        if missing:
            raise ConfigError(
                f"model {mname!r} has no layer named {', '.join(map(repr, missing))}; "
                f"pick one of: {_sample_names(layers)}"
            )
        what = "layers"
    if not chosen:
        raise ConfigError(
            f"model {mname!r} has no {what}; pass a name pattern or a list of names. "
            f"Its layers are: {_sample_names(layers)}"
        )
    return chosen


def _sample_names(layers, limit=40) -> str:
    names = [p for p, _ in layers]
    s = ", ".join(names[:limit])
    return s + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def labels_for(chosen: Sequence[Tuple[str, object]]) -> List[str]:
    """Short unique labels: the layer name when unique, else its path."""
    names = [l.name for _, l in chosen]
    dup = {n for n in names if names.count(n) > 1}
    return [p if l.name in dup else l.name for p, l in chosen]


class LayerTaps:
    """Context manager recording the outputs of chosen layers during a forward pass.

    Args:
        layers: list of ``(key, layer)``.
        transform: optional callable ``(key, output) -> value`` applied to each
            recorded output right away (e.g. a Gram matrix), so big activations
            need not be kept.

    Only the first call of each layer per :meth:`reset` is recorded (a layer
    shared by two branches is read on its first use).

    Example:
        >>> with LayerTaps(select_layers(clf, ["conv1"])) as taps:
        ...     clf(x)
        ...     a = taps.outputs["encoder/conv1"]
    """

    def __init__(self, layers: Sequence[Tuple[str, object]], transform: Callable | None = None):
        self.layers = list(layers)
        self.transform = transform
        self.outputs: Dict[str, object] = {}
        self._patched: List[object] = []

    def reset(self):
        self.outputs = {}

    def __enter__(self):
        for key, layer in self.layers:
            if "call" in vars(layer):
                raise ConfigError(
                    f"layer {layer.name!r} is already being recorded; select each layer once "
                    "and do not nest analyses on the same model"
                )
            object.__setattr__(layer, "call", self._wrap(key, layer.call))
            self._patched.append(layer)
        return self

    def _wrap(self, key, original):
        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if key not in self.outputs:
                value = out[0] if isinstance(out, (tuple, list)) else out
                self.outputs[key] = self.transform(key, value) if self.transform else value
            return out

        return wrapper

    def __exit__(self, *exc):
        for layer in self._patched:
            try:
                object.__delattr__(layer, "call")
            except AttributeError:
                pass
        self._patched = []
        return False


# ---------------------------------------------------------------- data helpers
_PREFERRED_KEYS = ("image", "images", "x", "inputs", "input")


def pick_input(batch, key=None):
    """The model input from one dataset element.

    Args:
        batch: an array, a tuple/list ``(x, y, ...)`` or a dict of arrays.
        key: None | str | int | callable. Which part is the model input. ``None``:
            an array as is, the first element of a tuple, or the dict entry
            named ``image``/``x``/``inputs`` (or the only entry).
    """
    if callable(key):
        return key(batch)
    if isinstance(batch, dict):
        if key is not None:
            if key not in batch:
                raise DataError(f"dataset elements have no key {key!r}; keys are {sorted(batch)}")
            return batch[key]
        if len(batch) == 1:
            return next(iter(batch.values()))
        for k in _PREFERRED_KEYS:
            if k in batch:
                return batch[k]
        raise DataError(
            f"cannot tell which of the dataset keys {sorted(batch)} is the model input; "
            "pass input_key=NAME"
        )
    if isinstance(batch, (tuple, list)):
        return batch[key if isinstance(key, int) else 0]
    return batch


def to_float_images(x) -> np.ndarray:
    """uint8 images → float32 in [0, 1] (histokd's model input convention); else float32."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32, copy=False)


def iter_batches(dataset, batches: int | None = None, batch_size: int = 32) -> Iterator:
    """Yield dataset elements: a tf.data.Dataset, any iterable of batches, or one array
    (split into ``batch_size`` chunks). Stops after ``batches`` elements when given."""
    if isinstance(dataset, np.ndarray) or (
        hasattr(dataset, "shape") and hasattr(dataset, "dtype") and not hasattr(dataset, "element_spec")
    ):
        arr = np.asarray(dataset)
        source: Iterable = (arr[i : i + batch_size] for i in range(0, len(arr), batch_size))
    else:
        source = dataset
    for i, b in enumerate(source):
        if batches is not None and i >= batches:
            return
        yield b


def count_batches(dataset, batches: int | None, batch_size: int = 32) -> int | None:
    n = None
    if isinstance(dataset, np.ndarray):
        n = -(-len(dataset) // batch_size)
    elif hasattr(dataset, "cardinality"):
        try:
            c = int(dataset.cardinality())
            n = c if c >= 0 else None
        except Exception:  # noqa: BLE001 - cardinality is best effort
            n = None
    elif hasattr(dataset, "__len__"):
        n = len(dataset)
    if batches is not None:
        n = batches if n is None else min(n, batches)
    return n
