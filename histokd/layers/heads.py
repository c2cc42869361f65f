"""Heads: the one projection head (expander / projector / predictor) and the linear-evaluation head.

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
class ProjectionHead(keras.layers.Layer):
    """Projection head (expander, projector, predictor): (Dense → BatchNorm → ReLU) × (L−1) → Dense.

    The one head of every joint-embedding and momentum method; the papers' heads
    differ only in their settings:

    * VICReg / More From Less expander (Bardes et al. 2022; More From Less §2.2: "three
      dense layers with ReLU activations and output size 8192"): :meth:`expander` — no
      bias before BatchNorm, Keras' BatchNorm defaults.
    * MoBY projector / predictor (Xie et al. 2021, §3: 2-layer MLPs, hidden 4096, output
      256, SyncBN): :meth:`moby` — biases everywhere, BatchNorm momentum 0.9 (PyTorch's
      0.1), ε 1e-5, cross-replica statistics.

    Args:
        dims: list of int. Output width of each dense layer (the last is the output width).
        hidden_bias: bool. Bias in the hidden dense layers (redundant before BatchNorm).
        norm_momentum: float. BatchNorm moving-average momentum (Keras convention).
        norm_epsilon: float. BatchNorm ε.
        synchronized: bool. Cross-replica BatchNorm statistics, so a run on R replicas
            normalises with the global batch like one device.

    Example:
        >>> z = ProjectionHead([64, 64, 64])(keras.random.normal((4, 32)))
        >>> p = ProjectionHead.moby(hidden_dim=64, out_dim=16, num_layers=2)
    """

    def __init__(self, dims=(8192, 8192, 8192), hidden_bias=False, norm_momentum=0.99, norm_epsilon=1e-3,
                 synchronized=False, **kwargs):
        super().__init__(**kwargs)
        if not dims:
            raise ConfigError("a projection head needs at least one layer width (model.expander_dims)")
        self.dims = [int(d) for d in dims]
        self.hidden_bias = bool(hidden_bias)
        self.norm_momentum = float(norm_momentum)
        self.norm_epsilon = float(norm_epsilon)
        self.synchronized = bool(synchronized)
        last = len(self.dims) - 1
        self.dense = [keras.layers.Dense(d, use_bias=self.hidden_bias or i == last, name=f"dense_{i}")
                      for i, d in enumerate(self.dims)]
        self.norms = [keras.layers.BatchNormalization(momentum=self.norm_momentum, epsilon=self.norm_epsilon,
                                                      synchronized=self.synchronized, name=f"bn_{i}")
                      for i in range(last)]

    @classmethod
    def expander(cls, dims=(8192, 8192, 8192), **kwargs):
        """VICReg's / More From Less' expander (see the class docstring)."""
        return cls(dims, **kwargs)

    @classmethod
    def moby(cls, hidden_dim=4096, out_dim=256, num_layers=2, synchronized=True, **kwargs):
        """MoBY's projector / predictor with ``num_layers`` dense layers (MoBY: 2)."""
        if int(num_layers) < 1:
            raise ConfigError(f"a MoBY projector/predictor needs num_layers >= 1, got {num_layers}")
        dims = [int(hidden_dim)] * (int(num_layers) - 1) + [int(out_dim)]
        return cls(dims, hidden_bias=True, norm_momentum=0.9, norm_epsilon=1e-5, synchronized=synchronized,
                   **kwargs)

    @property
    def out_dim(self):
        return self.dims[-1]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for i, dense in enumerate(self.dense):
            dense.build(shape)
            shape = shape[:-1] + (self.dims[i],)
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
        """The head applied to each of several views, with each view's own BatchNorm
        statistics (as separate calls), but every dense layer run once on all views.

        Equal to ``[self(v) for v in views]`` (the dense layers are linear, so one matrix
        product over the concatenated rows is the same product; BatchNorm still sees one
        view at a time, in the same order, so moving statistics update identically) —
        only faster, because thin matrix products waste the CPU's vector units.

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
        cfg.update(dims=list(self.dims), hidden_bias=self.hidden_bias, norm_momentum=self.norm_momentum,
                   norm_epsilon=self.norm_epsilon, synchronized=self.synchronized)
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
