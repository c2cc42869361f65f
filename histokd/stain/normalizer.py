"""The user-facing Macenko steps: a normaliser, a Keras layer and a tf.data step.

More From Less (Farndale et al.) §2.3 colour-normalises every patch with the method
of Macenko et al. (ISBI 2009); the algorithm is :mod:`histokd.stain.macenko`. Here
it is wrapped three ways, all running the same cached graph, so a tile gets the
same output whichever way it is normalised:

* :class:`MacenkoNormalizer`: ``fit`` a target, ``transform`` uint8 batches
  (NumPy or tensors, eager or in a graph);
* :class:`MacenkoNormalization`: a serialisable Keras layer for exported models;
* :func:`make_stain_fn`: the ``data.stain`` step for ``Dataset.map`` after
  ``batch``, counting the tiles passed through unchanged.

None of them changes process-wide settings; for the fastest path call
:func:`histokd.runtime.prefer_sequential_xla_cpu` and
:func:`histokd.runtime.apply_cpu_threads` first (see :mod:`histokd.stain.macenko`).

Example:
    >>> from histokd.stain import MacenkoNormalizer
    >>> norm = MacenkoNormalizer("torchstain")
    >>> ds = ds.batch(64).map(norm.transform)            # in-graph
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

import keras

from histokd.errors import StainError
from histokd.stain._kernels import select_tiles
from histokd.stain.macenko import (
    CONSTANT_DEFAULTS,
    MacenkoFit,
    as_uint8_array,
    decompose_fn,
    check_constants,
    fit_macenko,
    transform_fn,
)
from histokd.stain.presets import resolve_target



class MacenkoNormalizer:
    """Batched Macenko normaliser: ``fit`` a target, ``transform`` uint8 batches.

    More From Less §2.3 ("All patches are colour-normalised using the Macenko
    method"). ``transform`` is pure TensorFlow: call it on a symbolic tensor
    inside ``tf.data.Dataset.map`` (after ``batch``) or a ``tf.function``; on
    NumPy input it returns NumPy.

    Args:
        target: str, path, MacenkoFit, dict or image array. A preset name
            ("torchstain", the de-facto reference; see
            :data:`histokd.stain.presets.PRESETS`), a path to an image (fitted on
            load) or to a JSON fit, a fit, or image(s) to fit.
        io: float. Transmitted light intensity (torchstain: 240).
        alpha: float. Angle percentile (torchstain: 1).
        beta: float. OD threshold of the tissue mask (torchstain: 0.15).
        luminosity_threshold: float or None. Extra tissue condition luma/255 < value.
        min_tissue_pixels, max_residual_fraction, max_eigen_ratio, min_stain_angle,
            min_stain_component: robustness policy (module docstring).

    Example:
        >>> norm = MacenkoNormalizer("torchstain")
        >>> ds = ds.batch(64).map(norm.transform)            # in-graph
        >>> out, passed = norm.transform(tiles_uint8, return_passthrough=True)
    """

    def __init__(self, target: Any = "torchstain", **constants):
        self.constants = check_constants(**constants)
        self.target_fit = None
        self.set_target(target)

    # -- target --------------------------------------------------------------
    def set_target(self, target: Any) -> MacenkoFit:
        """Set the target (preset name, path, fit, dict or images); returns the fit."""
        self.target_fit = resolve_target(target, **self.constants)
        self._he = tf.constant(self.target_fit.he)
        self._max_c = tf.constant(self.target_fit.max_c)
        return self.target_fit

    def fit(self, target_images) -> MacenkoFit:
        """Fit the target on image(s) (pixels pooled); returns the fit and uses it."""
        fit = fit_macenko(target_images, **self.constants)
        return self.set_target(fit)

    # -- transform -----------------------------------------------------------
    def transform_tensor(self, images):
        """In-graph transform of a uint8 [B,H,W,3] tensor -> (uint8 tensor, passthrough [B]).

        Runs as a nested, cached ``tf.function`` call: inside ``Dataset.map`` that
        gets the regular function runtime (graph optimisation, parallel op
        scheduling), measurably faster than inlining the ops into the map function.
        """
        x = tf.convert_to_tensor(images)
        if x.dtype != tf.uint8 or x.shape.rank != 4:
            raise StainError(
                f"Macenko transform expects a uint8 [B,H,W,3] batch, got {x.dtype} {x.shape}; "
                "apply it after decode and batch, before scaling to [0,1]"
            )
        h, w = x.shape[1], x.shape[2]
        fn = transform_fn(self.constants, h, w)
        return fn(x, self._he, self._max_c)

    def transform(self, images, return_passthrough: bool = False):
        """Normalise images to the target.

        Args:
            images: uint8 RGB; a tf.Tensor [B,H,W,3] (symbolic or eager) or a NumPy
                array [H,W,3] / [B,H,W,3].
            return_passthrough: bool. Also return a bool [B] array, True where a
                tile failed the robustness policy and was returned unchanged.

        Returns:
            Images of the input's kind and shape (NumPy in -> NumPy out), and the
            passthrough flags when asked.
        """
        if isinstance(images, tf.Tensor) and not tf.executing_eagerly():
            out, passed = self.transform_tensor(images)
            return (out, passed) if return_passthrough else out
        if isinstance(images, tf.Tensor) or tf.is_tensor(images):
            x = tf.convert_to_tensor(images)
            out, passed = self.transform_tensor(x)
            return (out, passed) if return_passthrough else out
        a = as_uint8_array(images)
        single = a.ndim == 3
        if single:
            a = a[None]
        if a.ndim != 4:
            raise StainError(f"images must be [H,W,3] or [B,H,W,3], got shape {a.shape}")
        if a.shape[0] == 0:
            out, passed = a.copy(), np.zeros([0], bool)
        else:
            o, p = self.transform_tensor(tf.constant(a))
            out, passed = o.numpy(), p.numpy()
        if single:
            out = out[0]
        return (out, passed) if return_passthrough else out

    __call__ = transform

    def decompose(self, images) -> Dict[str, np.ndarray]:
        """Per-image stain matrices, max concentrations, tissue counts and ok flags (NumPy)."""
        a = as_uint8_array(images)
        if a.ndim == 3:
            a = a[None]
        dec = decompose_fn(self.constants)(tf.constant(a))
        return {k: v.numpy() for k, v in dec.items() if k != "od"}

    # -- config --------------------------------------------------------------
    def get_config(self) -> Dict[str, Any]:
        """JSON-able config: the target fit and the constants."""
        return {"target": self.target_fit.to_dict(), **self.constants}

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "MacenkoNormalizer":
        config = dict(config)
        target = config.pop("target", "torchstain")
        if isinstance(target, dict):
            target = MacenkoFit.from_dict(target)
        return cls(target, **config)

    def __repr__(self):
        return f"MacenkoNormalizer(target={self.target_fit.source!r}, io={self.constants['io']})"


# --------------------------------------------------------------- Keras layer


@keras.saving.register_keras_serializable(package="histokd")
class MacenkoNormalization(keras.layers.Layer):
    """Keras layer: Macenko-normalise its input to a fixed target (export-ready).

    Put it in front of an exported classifier so the model normalises its own
    input exactly as the training pipeline did (More From Less §2.3). The fit
    (stain matrix + maxC) is part of the layer config, so a ``.keras`` file
    reloads with the same target. Tiles that fail the robustness policy pass
    through unchanged.

    Float inputs in ``value_range`` are quantised to 0..255 first, like the
    uint8 tiles of the data pipeline, and the output is the normalised uint8
    value scaled back to ``value_range``, so the layer reproduces the pipeline
    bit for bit. uint8 inputs give uint8 outputs.

    Args:
        fit: MacenkoFit, dict, preset name or path. The target (default torchstain's).
        value_range: (low, high). Range of float inputs (default (0, 1)).
        **constants: Macenko constants (``io``, ``alpha``, ``beta``, ...).

    Example:
        >>> inp = keras.Input((224, 224, 3))
        >>> x = MacenkoNormalization(fit="torchstain")(inp)
        >>> model = keras.Model(inp, classifier(x))
    """

    def __init__(self, fit: Any = "torchstain", value_range=(0.0, 1.0), **kwargs):
        constants = {k: kwargs.pop(k) for k in list(kwargs) if k in CONSTANT_DEFAULTS}
        super().__init__(**kwargs)
        self.constants = check_constants(**constants)
        self.stain_fit = resolve_target(fit, **self.constants)
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise StainError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.value_range = (lo, hi)
        # XLA on CPU lowers top_k to sorts (several times slower), and dynamic
        # tile sizes make top_k uncompilable: keep the model out of
        # jit_compile="auto" (the per-pixel passes inside are XLA-compiled anyway).
        self.supports_jit = False

    def call(self, inputs):
        x = tf.convert_to_tensor(inputs)
        he = tf.constant(self.stain_fit.he)
        mc = tf.constant(self.stain_fit.max_c)
        # the same cached graph as MacenkoNormalizer / make_stain_fn: identical
        # results whether the layer runs eagerly or inside a model's tf.function
        fn = transform_fn(self.constants, x.shape[1], x.shape[2])
        if x.dtype == tf.uint8:
            out, _ = fn(x, he, mc)
            return out
        lo, hi = self.value_range
        xf = tf.cast(x, tf.float32)
        q = tf.cast(tf.clip_by_value(tf.round((xf - lo) * (255.0 / (hi - lo))), 0.0, 255.0), tf.uint8)
        out, passed = fn(q, he, mc)
        outf = tf.cast(out, tf.float32) * ((hi - lo) / 255.0) + lo
        outf = select_tiles(tf.logical_not(passed), outf, xf)
        return tf.cast(outf, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs):
        # same dtype as the input (uint8 in -> uint8 out), not compute_dtype
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"fit": self.stain_fit.to_dict(), "value_range": list(self.value_range)})
        config.update(self.constants)
        return config


# ------------------------------------------------------- data-pipeline hook


def _cpu_counter(name: str):
    """An int64 counter variable that is never mirrored by a distribution strategy.

    ``ResourceVariable`` constructed directly bypasses the strategy's variable
    creator, so the counter stays a plain host variable that tf.data map
    functions can update even when the pipeline is built inside
    ``strategy.scope()``.
    """
    from tensorflow.python.ops import resource_variable_ops

    with tf.init_scope(), tf.device("/CPU:0"):
        return resource_variable_ops.ResourceVariable(
            tf.constant(0, tf.int64), trainable=False, name=name
        )


class StainFn:
    """A graph-safe stain step for ``tf.data`` with per-run passthrough counters.

    Made by :func:`make_stain_fn`. ``fn(images)`` maps a uint8 [B,H,W,3] batch to
    a uint8 batch and adds to two int64 counters (``tiles``, ``passed_through``)
    inside the graph, so the counts survive ``Dataset.map``. Read them with
    :meth:`counts` after (or during) a run; :meth:`reset_counts` zeroes them.
    ``fn.with_count(images)`` is the stateless alternative: it returns
    ``(images, n_passed_through)`` for pipelines that carry the count along.

    Example:
        >>> stain = make_stain_fn("macenko", "torchstain", "passthrough")
        >>> ds = ds.batch(64).map(stain, num_parallel_calls=tf.data.AUTOTUNE)
        >>> ...; stain.counts()   # {'tiles': 6400, 'passed_through': 12}
    """

    def __init__(self, method: str, normalizer: Optional[MacenkoNormalizer], on_failure: str):
        self.method = method
        self.normalizer = normalizer
        self.on_failure = on_failure
        self.tiles = _cpu_counter("histokd_stain_tiles")
        self.passed_through = _cpu_counter("histokd_stain_passed_through")

    def with_count(self, images):
        """(uint8 images, int32 number of passed-through tiles); no side effects."""
        x = tf.convert_to_tensor(images)
        if x.dtype != tf.uint8:
            raise StainError(
                f"the stain step expects uint8 [B,H,W,3] batches (apply it after decode and "
                f"batch, before scaling to [0,1]); got {x.dtype}"
            )
        if self.normalizer is None:
            return x, tf.constant(0, tf.int32)
        out, passed = self.normalizer.transform_tensor(x)
        n_fail = tf.reduce_sum(tf.cast(passed, tf.int32))
        if self.on_failure == "error":
            assert_op = tf.debugging.assert_equal(
                n_fail, 0,
                message=(
                    "histokd.stain: tile(s) in this batch could not be Macenko-normalised "
                    "(background-only, near-white, pure noise, single stain or too little "
                    "tissue). Set data.stain.on_failure: passthrough to keep such tiles "
                    "unchanged (they are counted), or remove them from the dataset."
                ),
            )
            with tf.control_dependencies([assert_op]):
                out = tf.identity(out)
        return out, n_fail

    def __call__(self, images):
        out, n_fail = self.with_count(images)
        upd = [
            self.tiles.assign_add(tf.cast(tf.shape(out)[0], tf.int64)),
            self.passed_through.assign_add(tf.cast(n_fail, tf.int64)),
        ]
        with tf.control_dependencies(upd):
            return tf.identity(out)

    def counts(self) -> Dict[str, int]:
        """{'tiles': seen, 'passed_through': returned unchanged} since the last reset."""
        return {"tiles": int(self.tiles.numpy()), "passed_through": int(self.passed_through.numpy())}

    def reset_counts(self):
        self.tiles.assign(0)
        self.passed_through.assign(0)

    def metadata(self) -> Dict[str, Any]:
        """JSON-able description for run metadata and exported models."""
        if self.normalizer is None:
            return {"method": "none"}
        return {
            "method": self.method,
            "on_failure": self.on_failure,
            "fit": self.normalizer.target_fit.to_dict(),
            "constants": dict(self.normalizer.constants),
        }

    def layer(self, value_range=(0.0, 1.0)) -> Optional["MacenkoNormalization"]:
        """The matching :class:`MacenkoNormalization` layer for export (None for 'none')."""
        if self.normalizer is None:
            return None
        return MacenkoNormalization(
            fit=self.normalizer.target_fit, value_range=value_range, **self.normalizer.constants
        )


#: ``data.stain.method`` → normaliser class (None: no stain step). A new method is one
#: entry here plus its normaliser.
STAIN_NORMALIZERS = {"none": None, "macenko": MacenkoNormalizer}


def stain_normalizes(name: str) -> bool:
    """Whether the ``data.stain.method`` ``name`` changes the images (False for ``none``).

    Raises:
        StainError: ``name`` is not a stain method.
    """
    key = (name or "none").lower()
    if key not in STAIN_NORMALIZERS:
        raise StainError(f"unknown stain method {name!r}; use one of {sorted(STAIN_NORMALIZERS)}")
    return STAIN_NORMALIZERS[key] is not None


def make_stain_fn(
    method: str = "macenko",
    target: Any = "torchstain",
    on_failure: str = "passthrough",
    **constants,
) -> StainFn:
    """Build the ``data.stain`` step: a callable for ``Dataset.map`` after ``batch``.

    Args:
        method: a key of :data:`STAIN_NORMALIZERS` ("none" or "macenko").
        target: preset name ("torchstain"), image path, JSON fit path, fit or dict.
        on_failure: "passthrough" (return failing tiles unchanged and count them) or
            "error" (raise InvalidArgumentError in the pipeline, naming the fix).
        **constants: Macenko constants (``io``, ``alpha``, ``beta``, ...).

    Returns:
        StainFn: ``fn(uint8 [B,H,W,3]) -> uint8 [B,H,W,3]`` with ``fn.counts()``.

    Example:
        >>> stain = make_stain_fn("macenko", "torchstain")
        >>> ds = tf.data.Dataset.from_tensor_slices(tiles).batch(32).map(stain)
    """
    m = (method or "none").lower()
    if on_failure not in ("passthrough", "error"):
        raise StainError(f"unknown on_failure {on_failure!r}; use 'passthrough' or 'error'")
    normalizer = STAIN_NORMALIZERS[m](target, **constants) if stain_normalizes(m) else None
    return StainFn(m, normalizer, on_failure)
