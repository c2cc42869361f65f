"""Transformer building blocks shared by the ViT, BEiT and Swin backbones.

Multi-head self-attention with a fused query/key/value projection, the two-layer
GELU MLP, stochastic depth (drop path) and LayerScale, as used by ViT
(Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", §3.1, Eq. 1–4) and by
Swin Transformer V2 (Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity
and Resolution", §3). Every layer works on token tensors ``[..., tokens, dim]``
and is serialisable.

Speed on CPU (``scripts/bench_backbones.py``): linear layers run as 2-D
``MatMul → BiasAdd (→ GELU)`` so TensorFlow fuses them into one oneDNN kernel;
q/k/v are unstacked rather than sliced (a strided-slice gradient materialises a
zero-filled copy of the whole qkv tensor); :class:`LayerNorm` makes fewer passes than
the generic Keras layer. Weights and their names are those of plain Keras layers.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from histokd.errors import ConfigError

def dense_initializer():
    """Truncated normal (std 0.02) kernel initialiser used by ViT/Swin linear layers."""
    return keras.initializers.TruncatedNormal(stddev=0.02)


def gelu_exact(x):
    """GELU with the exact erf form (the ``nn.GELU()`` default of the reference models).

    Written as ``x · ((erf(x/√2) + 1) · ½)``: the same function as
    ``ops.gelu(x, approximate=False)``, in the op order TensorFlow's oneDNN graph
    rewriter recognises, so that ``MatMul → BiasAdd → GELU`` runs as one fused kernel
    in inference graphs (see :func:`linear`).
    """
    return ((ops.erf(x * _SQRT_HALF) + 1.0) * 0.5) * x


_SQRT_HALF = 0.7071067811865476


def bias_add(x, bias):
    """``x + bias`` over the last axis; a ``BiasAdd`` op under TensorFlow.

    TensorFlow's graph optimiser fuses ``MatMul`` + ``BiasAdd`` (+ GELU) into one
    oneDNN kernel but only recognises a real ``BiasAdd`` node for the GELU fusion;
    other backends get a plain broadcast add.
    """
    bias = ops.cast(bias, x.dtype)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.nn.bias_add(x, bias)
    return ops.add(x, bias)


def linear(x, dense, activation=None):
    """Apply a built ``keras.layers.Dense`` (no activation) to ``x`` flattened to 2-D rows.

    One ``[rows, in] @ [in, out]`` matrix product + bias (+ optional activation) on a
    2-D tensor, which the TensorFlow CPU backend runs as a single fused oneDNN matmul;
    ``keras.layers.Dense`` on a 3-/4-D tensor reshapes around the product instead and
    leaves the bias add (and GELU) as separate passes over memory. The weights stay
    the Dense layer's own, so names, checkpoints and converters are unchanged.

    Args:
        x: tensor ``[..., in]``.
        dense: keras.layers.Dense. Built layer whose ``kernel``/``bias`` are used.
        activation: callable or None. Applied after the bias.

    Returns:
        Tensor ``[..., out]`` (same leading shape as ``x``).
    """
    lead = ops.shape(x)[:-1]
    flat = ops.reshape(x, (-1, x.shape[-1]))
    y = ops.matmul(flat, ops.cast(dense.kernel, x.dtype))
    if dense.bias is not None:
        y = bias_add(y, dense.bias)
    if activation is not None:
        y = activation(y)
    if len(x.shape) == 2:
        return y
    return ops.reshape(y, tuple(lead) + (dense.units,))


@keras.saving.register_keras_serializable(package="histokd")
class LayerNorm(keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` over the last axis with fewer passes over memory.

    Ba et al. 2016, "Layer Normalization"; the pre-norm of ViT (Dosovitskiy et al. 2021,
    Eq. 2–3) and the res-post-norm of Swin V2 (Liu et al. 2022, §3.2). Same weights
    (``gamma``, ``beta``), configuration and maths as the Keras layer (biased variance,
    ``epsilon`` inside the square root), computed as ``(x - μ) · (γ / √(σ² + ε)) + β``:
    four elementwise passes and two reductions instead of the five passes of the
    generic Keras implementation, and a shorter gradient graph. Other axes or
    ``rms_scaling`` fall back to the Keras code.

    Args:
        epsilon: float. Added to the variance (1e-5 Swin / PyTorch, 1e-6 timm ViT, 1e-12 Hugging Face ViT).
        **kwargs: other ``keras.layers.LayerNormalization`` arguments.

    Example:
        >>> y = LayerNorm(epsilon=1e-6)(keras.random.normal((2, 5, 8)))
    """

    def call(self, inputs):
        axis = self.axis if isinstance(self.axis, int) else (self.axis[0] if len(self.axis) == 1 else None)
        if self.rms_scaling or axis not in (-1, len(inputs.shape) - 1):
            return super().call(inputs)
        x = inputs
        if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
            x = ops.cast(x, "float32")  # statistics in float32, as the Keras layer
        xc = x - ops.mean(x, axis=-1, keepdims=True)
        scale = ops.rsqrt(ops.mean(ops.square(xc), axis=-1, keepdims=True) + self.epsilon)
        if self.gamma is not None:
            scale = scale * ops.cast(self.gamma, x.dtype)
        y = xc * scale
        if self.beta is not None:
            y = y + ops.cast(self.beta, x.dtype)
        return ops.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="histokd")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample during training.

    Huang et al. 2016, "Deep Networks with Stochastic Depth"; used with a linear
    rate schedule in ViT/DeiT and Swin V2 (Liu et al. 2022, §4.1).

    Args:
        rate: float. Probability of dropping the branch of one sample.
        seed: int or None. Seed of the layer's random generator.

    Example:
        >>> y = DropPath(0.1)(keras.random.normal((4, 10, 8)), training=True)
    """

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ConfigError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = ops.floor(keep + keras.random.uniform(shape, dtype=x.dtype, seed=self.seed_generator))
        return x / keep * mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(rate=self.rate, seed=self.seed)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class LayerScale(keras.layers.Layer):
    """Per-channel learnable scale of a residual branch (CaiT; timm ``init_values``).

    Touvron et al. 2021, "Going deeper with Image Transformers", §2 (LayerScale).
    Pathology foundation models such as UNI (ViT-L/16) use it with ``init_value=1e-5``.

    Args:
        init_value: float. Initial value of every scale.

    Example:
        >>> y = LayerScale(1e-5)(keras.random.normal((2, 5, 8)))
    """

    def __init__(self, init_value=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.init_value))
        self.built = True

    def call(self, x):
        return x * ops.cast(self.gamma, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(init_value=self.init_value)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class MLP(keras.layers.Layer):
    """Transformer feed-forward block: Dense → GELU (exact) → Dense.

    ViT (Dosovitskiy et al. 2021) Eq. 3; Swin V2 uses the same MLP (ratio 4).

    Args:
        hidden_dim: int. Width of the hidden layer.
        out_dim: int or None. Output width; None keeps the input width.

    Example:
        >>> y = MLP(32)(keras.random.normal((2, 5, 8)))
    """

    def __init__(self, hidden_dim, out_dim=None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.out_dim = None if out_dim is None else int(out_dim)
        self.fc1 = keras.layers.Dense(self.hidden_dim, kernel_initializer=dense_initializer(),
                                      name="fc1")
        self.fc2 = None

    def build(self, input_shape):
        out = self.out_dim or int(input_shape[-1])
        self.fc2 = keras.layers.Dense(out, kernel_initializer=dense_initializer(), name="fc2")
        self.fc1.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (self.hidden_dim,))
        self.built = True

    def call(self, x):
        return linear(linear(x, self.fc1, gelu_exact), self.fc2)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.out_dim or input_shape[-1],)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(hidden_dim=self.hidden_dim, out_dim=self.out_dim)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class MultiHeadSelfAttention(keras.layers.Layer):
    """Multi-head scaled dot-product self-attention with one fused qkv projection.

    ViT (Dosovitskiy et al. 2021) Eq. 2 / Appendix A: ``softmax(q kᵀ / √d_h) v`` per head,
    then an output projection. An optional additive ``attention_bias`` (broadcastable
    to ``[batch, heads, tokens, tokens]``) lets BEiT add its relative position bias.

    Args:
        num_heads: int. Number of heads; the input width must be divisible by it.
        qkv_bias: bool. Learn a bias for the query/key/value projection.

    Example:
        >>> y = MultiHeadSelfAttention(4)(keras.random.normal((2, 5, 16)))
    """

    def __init__(self, num_heads, qkv_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.qkv = None
        self.proj = None

    def build(self, input_shape):
        dim = int(input_shape[-1])
        if dim % self.num_heads:
            raise ConfigError(f"attention width {dim} is not divisible by num_heads={self.num_heads}; "
                              "choose a width that is a multiple of the number of heads")
        self.dim = dim
        self.head_dim = dim // self.num_heads
        self.qkv = keras.layers.Dense(3 * dim, use_bias=self.qkv_bias,
                                      kernel_initializer=dense_initializer(), name="qkv")
        self.proj = keras.layers.Dense(dim, kernel_initializer=dense_initializer(), name="proj")
        self.qkv.build(input_shape)
        self.proj.build(input_shape)
        self._col_scale = np.concatenate([np.full(dim, 1.0 / math.sqrt(self.head_dim)),
                                          np.ones(2 * dim)]).astype("float32")
        self.built = True

    def call(self, x, attention_bias=None):
        n = ops.shape(x)[1]
        # 1/√d_h is folded into the query columns of the projection ([D, 3D] multiply instead
        # of one over q and another over its gradient; exact when d_h is a power of 4)
        col_scale = ops.convert_to_tensor(self._col_scale, dtype=x.dtype)
        qkv = ops.matmul(ops.reshape(x, (-1, self.dim)), ops.cast(self.qkv.kernel, x.dtype) * col_scale)
        if self.qkv.bias is not None:
            qkv = bias_add(qkv, ops.cast(self.qkv.bias, x.dtype) * col_scale)
        qkv = ops.reshape(qkv, (-1, n, 3, self.num_heads, self.head_dim))
        qkv = ops.transpose(qkv, (2, 0, 3, 1, 4))  # 3, B, heads, N, head_dim
        # unstack, not qkv[0] / qkv[1] / qkv[2]: the gradient of a strided slice writes a
        # zero-filled copy of the whole qkv tensor per slice, that of unstack one stack
        q, k, v = ops.unstack(qkv, 3, axis=0)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        if attention_bias is not None:
            scores = scores + ops.cast(attention_bias, scores.dtype)
        attn = ops.softmax(scores, axis=-1)
        out = ops.transpose(ops.matmul(attn, v), (0, 2, 1, 3))
        return linear(ops.reshape(out, (-1, n, self.dim)), self.proj)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_heads=self.num_heads, qkv_bias=self.qkv_bias)
        return cfg
