"""Projection heads: the VICReg/SimCLR expander and the linear-evaluation head.

Speed on CPU: the heads of joint-embedding and MoBY training see few rows (a view
batch of 32–256) against wide weights (2048–8192 squared). For such products,
TensorFlow's (oneDNN's) ``MatMul`` with a transposed second operand — the input
gradient ``dY Wᵀ`` of every dense layer — runs several times slower than the same
arithmetic written as ``(W dYᵀ)ᵀ``, and the gain vanishes from a few hundred rows on
(figures: docs/benchmarks.md). The dense layers of the heads therefore run through
:func:`thin_dense`, which keeps the Keras ``Dense`` weights and forward product and
only computes that gradient the faster way when the batch is thin.
"""

from __future__ import annotations

import keras
from keras import ops

from histokd.errors import ConfigError


def _thin(rows, k, n) -> bool:
    """Whether ``dY Wᵀ`` is faster as ``(W dYᵀ)ᵀ`` for ``rows`` × ``k`` × ``n`` (see module doc)."""
    return rows <= 128 or (rows <= 256 and k * n >= 2048 * 2048)


def _input_grad(dy, w):
    """``dy @ wᵀ`` ([M, N] x [K, N] -> [M, K]), as ``(w @ dyᵀ)ᵀ`` when ``M`` is thin."""
    import tensorflow as tf

    k, n = int(w.shape[0]), int(w.shape[1])
    rows = dy.shape[0]

    def std():
        return tf.matmul(dy, w, transpose_b=True)

    def thin():
        return tf.transpose(tf.matmul(w, dy, transpose_b=True))

    if rows is not None:
        return thin() if _thin(int(rows), k, n) else std()
    limit = 256 if k * n >= 2048 * 2048 else 128
    return tf.cond(tf.shape(dy)[0] <= limit, thin, std)


def thin_dense(x, dense):
    """``dense(x)`` for a 2-D batch ``x`` [rows, in], with a faster input gradient for few rows.

    The same function, weights and dtype handling as calling the built
    ``keras.layers.Dense`` (inputs and kernel cast to its compute dtype, bias,
    activation); under TensorFlow the product carries a custom gradient whose input
    gradient is computed as ``(W dYᵀ)ᵀ`` when the batch is thin (module docstring);
    the kernel gradient ``Xᵀ dY`` is the usual one. Other backends and other ranks
    call the layer.

    Args:
        x: tensor [rows, in].
        dense: built keras.layers.Dense.

    Returns:
        tensor [rows, units] in the layer's compute dtype.
    """
    if keras.backend.backend() != "tensorflow" or len(x.shape) != 2 or not dense.built:
        return dense(x)
    import tensorflow as tf

    dtype = dense.compute_dtype
    x = ops.cast(x, dtype)
    w = ops.cast(dense.kernel, dtype)

    @tf.custom_gradient
    def product(a, b):
        def grad(dy):
            return _input_grad(dy, b), tf.matmul(a, dy, transpose_a=True)

        return tf.matmul(a, b), grad

    y = product(x, w)
    if dense.bias is not None:
        y = tf.nn.bias_add(y, ops.cast(dense.bias, dtype))
    if dense.activation is not None:
        y = dense.activation(y)
    return y


@keras.saving.register_keras_serializable(package="histokd")
class Expander(keras.layers.Layer):
    """Expander (projector) of a joint-embedding branch.

    Dense layers with BatchNorm + ReLU between them and a plain linear last layer,
    as in VICReg (Bardes et al. 2022) and More From Less §2.2 ("expanders were
    composed of three dense layers with ReLU activations and output size 8192").

    Args:
        dims: list of int. Output width of each dense layer (paper: [8192, 8192, 8192]).

    Example:
        >>> z = Expander([64, 64, 64])(keras.random.normal((4, 32)))
    """

    def __init__(self, dims=(8192, 8192, 8192), **kwargs):
        super().__init__(**kwargs)
        if not dims:
            raise ConfigError("Expander needs at least one layer width (model.expander_dims)")
        self.dims = [int(d) for d in dims]
        self.dense = [keras.layers.Dense(d, use_bias=(i == len(self.dims) - 1), name=f"dense_{i}")
                      for i, d in enumerate(self.dims)]
        self.norms = [keras.layers.BatchNormalization(name=f"bn_{i}") for i in range(len(self.dims) - 1)]

    def build(self, input_shape):
        shape = input_shape
        for i, dense in enumerate(self.dense):
            dense.build(shape)
            shape = dense.compute_output_shape(shape)
            if i < len(self.norms):
                self.norms[i].build(shape)
        self.built = True

    def call(self, x, training=None):
        for i, dense in enumerate(self.dense):
            x = thin_dense(x, dense)
            if i < len(self.norms):
                x = keras.ops.relu(self.norms[i](x, training=training))
        return x

    def call_views(self, views, training=None):
        """The expander applied to each of several views, with each view's own BatchNorm
        statistics (as separate calls), but every dense layer run once on all views.

        Equal to ``[self(v) for v in views]`` (the dense layers are linear, so one matrix
        product over the concatenated rows is the same product; BatchNorm still sees one
        view at a time, in the same order, so moving statistics update identically) —
        only faster: a VICReg batch of 32 per view makes thin matrix products, and
        doubling their rows speeds the expander up by ~30 % on CPU.

        Args:
            views: list of [B_i, D] tensors.
            training: bool.

        Returns:
            list of [B_i, dims[-1]] tensors.
        """
        if len(views) == 1:
            return [self(views[0], training=training)]
        sizes = [keras.ops.shape(v)[0] for v in views]
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        x = keras.ops.concatenate(views, axis=0)
        for i, dense in enumerate(self.dense):
            x = thin_dense(x, dense)
            if i < len(self.norms):
                parts = [self.norms[i](x[bounds[j]:bounds[j + 1]], training=training)
                         for j in range(len(views))]
                x = keras.ops.relu(keras.ops.concatenate(parts, axis=0))
        return [x[bounds[j]:bounds[j + 1]] for j in range(len(views))]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.dims[-1],)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(dims=list(self.dims))
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class LinearHead(keras.layers.Layer):
    """Linear-evaluation head: one dense layer with softmax (More From Less §2.2).

    Args:
        num_classes: int. Number of classes.

    Example:
        >>> p = LinearHead(9)(keras.random.normal((4, 2048)))
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.dense = keras.layers.Dense(self.num_classes, activation="softmax", dtype="float32", name="dense")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.built = True

    def call(self, x):
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_classes=self.num_classes)
        return cfg
