"""Swin Transformer V2 backbone.

Liu et al. 2022, "Swin Transformer V2: Scaling Up Capacity and Resolution":
hierarchical (shifted) window attention from Swin V1 (Liu et al. 2021, §3.2) with the
three V2 changes of §3:

* residual post-normalisation — each residual branch is LayerNorm'ed *before* it is
  added (§3.2, Fig. 1);
* scaled cosine attention ``cos(q, k) / τ`` with a learnable per-head ``1/τ`` whose
  logarithm is clamped at ``log(100)`` (§3.2, Eq. 2);
* log-spaced continuous relative position bias: a 2-layer MLP (hidden 512, ReLU) maps
  log-spaced coordinate offsets to one bias per head, squashed by ``16·sigmoid``
  (§3.3, Eq. 3–4), so a model trained with one window size transfers to another
  (``pretrained_window_size``);

and V2 patch merging (linear reduction, then LayerNorm). Presets follow the paper's
SwinV2-T/S/B (Table 1; C = 96/96/128, depths {2,2,6,2}/{2,2,18,2}).

Meng Li, "Transformer-Based Self-Supervised Learning and Distillation for Medical
Image Classification", §III uses SwinV2-T/S/B as teacher and student for
progressive layer-wise distillation; :class:`SwinV2Backbone` exposes every stage's
output map for it.
"""

from __future__ import annotations

import math
import re
import warnings

import keras
import numpy as np
from keras import ops

from histokd.backbones._common import _pair, input_layer, normalization_layer, register_presets
from histokd.backbones.base import Backbone
from histokd.backbones.layouts import (
    CheckpointLayout,
    HFModelType,
    dense_rules,
    norm_rules,
    register_hf_model_type,
    register_layout,
)
from histokd.errors import ConfigError
from histokd.layers.attention import DropPath, LayerNorm, MLP, bias_add, dense_initializer, linear

_MASK_VALUE = -100.0  # the reference implementation's value for cross-region pairs
_CPB_HIDDEN = 512


def _ceil_div(a, b):
    return None if a is None else -(-a // b)


# --------------------------------------------------------------------------------------
# static (numpy) helpers: relative-position tables and shifted-window masks
# --------------------------------------------------------------------------------------
def relative_coords_table(window_size: int, pretrained_window_size: int = 0) -> np.ndarray:
    """Log-spaced relative coordinates ``[(2w-1)², 2]`` fed to the CPB MLP (Swin V2 Eq. 4).

    Offsets ``Δ ∈ [-(w-1), w-1]`` are normalised by ``w_pre - 1`` (the pretraining
    window, or ``w`` itself when 0), scaled to [-8, 8] and mapped through
    ``sign(Δ)·log2(1 + |Δ|) / log2(8)``.
    """
    w = int(window_size)
    r = np.arange(-(w - 1), w, dtype=np.float32)
    table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)  # [2w-1, 2w-1, 2]
    if pretrained_window_size and pretrained_window_size > 0:
        table = table / np.float32(pretrained_window_size - 1)
    elif w > 1:
        table = table / np.float32(w - 1)
    table = table * np.float32(8.0)
    table = np.sign(table) * np.log2(np.abs(table) + np.float32(1.0)) / np.float32(np.log2(8.0))
    return table.reshape(-1, 2).astype(np.float32)


def relative_position_index(window_size: int) -> np.ndarray:
    """Index ``[w², w²]`` of each token pair's offset into the ``(2w-1)²`` table."""
    w = int(window_size)
    coords = np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # 2, N, N
    return ((rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)).astype(np.int32)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """Additive mask ``[num_windows, w², w²]`` keeping attention inside the regions of a cyclic shift.

    Swin (Liu et al. 2021) §3.2, "Efficient batch computation for shifted configuration":
    after rolling by ``-shift`` the windows on the bottom/right edges contain tokens from
    up to four non-adjacent regions; pairs from different regions get ``-100``.
    """
    labels = np.zeros((height, width), dtype=np.float32)
    spans = ((0, -window), (-window, -shift), (-shift, None))
    n = 0
    for hs in spans:
        for ws in spans:
            labels[slice(*hs), slice(*ws)] = n
            n += 1
    win = labels.reshape(height // window, window, width // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, _MASK_VALUE, 0.0).astype(np.float32)


def _window_partition(x, w, h, wd, c):
    x = ops.reshape(x, (-1, h // w, w, wd // w, w, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, w * w, c))


def _window_reverse(x, w, h, wd, c):
    x = ops.reshape(x, (-1, h // w, wd // w, w, w, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, h, wd, c))


# --------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="histokd")
class SwinV2PatchEmbed(keras.layers.Layer):
    """Non-overlapping patch embedding (convolution, stride = patch) + LayerNorm.

    Inputs whose sides are not multiples of ``patch_size`` are zero-padded at the
    bottom/right, as the Hugging Face implementation does.

    Args:
        patch_size: int. Patch side (4 in Swin).
        embed_dim: int. Output channels C.
        layer_norm_eps: float. LayerNorm epsilon.

    Example:
        >>> y = SwinV2PatchEmbed(4, 16)(keras.ops.zeros((1, 32, 32, 3)))  # [1, 8, 8, 16]
    """

    def __init__(self, patch_size=4, embed_dim=96, layer_norm_eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.layer_norm_eps = float(layer_norm_eps)
        self.proj = keras.layers.Conv2D(self.embed_dim, self.patch_size, strides=self.patch_size,
                                        padding="valid", name="proj")
        self.norm = LayerNorm(epsilon=self.layer_norm_eps, name="norm")

    def build(self, input_shape):
        self.proj.build(input_shape)
        self.norm.build(tuple(input_shape[:-1]) + (self.embed_dim,))
        self.built = True

    def call(self, x):
        h, w = x.shape[1], x.shape[2]
        p = self.patch_size
        if h is not None and w is not None:
            ph, pw = (-h) % p, (-w) % p
        else:
            ph, pw = (-ops.shape(x)[1]) % p, (-ops.shape(x)[2]) % p
        if not (isinstance(ph, int) and ph == 0 and isinstance(pw, int) and pw == 0):
            x = ops.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        return self.norm(self.proj(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], _ceil_div(input_shape[1], self.patch_size),
                _ceil_div(input_shape[2], self.patch_size), self.embed_dim)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(patch_size=self.patch_size, embed_dim=self.embed_dim,
                   layer_norm_eps=self.layer_norm_eps)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class SwinV2PatchMerging(keras.layers.Layer):
    """V2 patch merging: concatenate each 2×2 neighbourhood (4C), reduce to 2C, then LayerNorm.

    Swin V2 moves the LayerNorm after the linear reduction (res-post-norm, §3.2).
    Odd sides are zero-padded at the bottom/right.

    Args:
        layer_norm_eps: float. LayerNorm epsilon.

    Example:
        >>> y = SwinV2PatchMerging()(keras.ops.zeros((1, 8, 8, 16)))  # [1, 4, 4, 32]
    """

    def __init__(self, layer_norm_eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.layer_norm_eps = float(layer_norm_eps)
        self.reduction = None
        self.norm = None

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.reduction = keras.layers.Dense(2 * c, use_bias=False, kernel_initializer=dense_initializer(),
                                            name="reduction")
        self.norm = LayerNorm(epsilon=self.layer_norm_eps, name="norm")
        self.reduction.build(tuple(input_shape[:-1]) + (4 * c,))
        self.norm.build(tuple(input_shape[:-1]) + (2 * c,))
        self.built = True

    def call(self, x):
        h, w = x.shape[1], x.shape[2]
        if h is None or w is None:
            ph, pw = ops.shape(x)[1] % 2, ops.shape(x)[2] % 2
            x = ops.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        elif h % 2 or w % 2:
            x = ops.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        c = x.shape[-1]
        h2 = x.shape[1] // 2 if x.shape[1] is not None else ops.shape(x)[1] // 2
        w2 = x.shape[2] // 2 if x.shape[2] is not None else ops.shape(x)[2] // 2
        # [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]] concatenated on channels,
        # as one reshape/transpose (channel block index = 2·col parity + row parity): four
        # strided slices would each need a zero-filled full-size gradient buffer
        x = ops.reshape(x, (-1, h2, 2, w2, 2, c))
        x = ops.reshape(ops.transpose(x, (0, 1, 3, 4, 2, 5)), (-1, h2, w2, 4 * c))
        return self.norm(linear(x, self.reduction))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], _ceil_div(input_shape[1], 2), _ceil_div(input_shape[2], 2),
                2 * input_shape[-1])

    def get_config(self):
        cfg = super().get_config()
        cfg.update(layer_norm_eps=self.layer_norm_eps)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class SwinV2WindowAttention(keras.layers.Layer):
    """Window attention with scaled cosine similarity and continuous position bias.

    Swin V2 §3.2 Eq. 2: ``Sim(q_i, k_j) = cos(q_i, k_j)·s + B_ij`` with a learnable
    per-head scale ``s = exp(min(θ, log 100))`` (θ initialised to ``log 10``), and §3.3:
    ``B = 16·sigmoid(MLP(log-spaced Δ))``. The key projection has no bias, as in the
    reference implementation (``q_bias``/``v_bias`` only).

    Inputs are windows ``[B·nW, w², C]``; ``attention_mask`` is an additive ``[nW, w², w²]`` array
    or None.

    Args:
        num_heads: int. Attention heads.
        window_size: int. Window side w.
        pretrained_window_size: int. Window the CPB was trained with (0: same as ``window_size``).
        qkv_bias: bool. Learn query and value biases.

    Example:
        >>> y = SwinV2WindowAttention(2, 4)(keras.random.normal((3, 16, 8)))
    """

    def __init__(self, num_heads, window_size, pretrained_window_size=0, qkv_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.window_size = int(window_size)
        self.pretrained_window_size = int(pretrained_window_size or 0)
        self.qkv_bias = bool(qkv_bias)
        self._table = relative_coords_table(self.window_size, self.pretrained_window_size)
        self._index = relative_position_index(self.window_size).reshape(-1)
        self.cpb_fc1 = keras.layers.Dense(_CPB_HIDDEN, activation="relu", name="cpb_fc1")
        self.cpb_fc2 = keras.layers.Dense(self.num_heads, use_bias=False, name="cpb_fc2")
        self.proj = None

    def build(self, input_shape):
        dim = int(input_shape[-1])
        if dim % self.num_heads:
            raise ConfigError(f"Swin V2 stage width {dim} is not divisible by num_heads={self.num_heads}")
        self.dim = dim
        self.head_dim = dim // self.num_heads
        self.qkv_kernel = self.add_weight(name="qkv_kernel", shape=(dim, 3 * dim),
                                          initializer=dense_initializer())
        if self.qkv_bias:
            self.q_bias = self.add_weight(name="q_bias", shape=(dim,), initializer="zeros")
            self.v_bias = self.add_weight(name="v_bias", shape=(dim,), initializer="zeros")
        self.logit_scale = self.add_weight(
            name="logit_scale", shape=(self.num_heads, 1, 1),
            initializer=keras.initializers.Constant(math.log(10.0)))
        self.cpb_fc1.build((None, 2))
        self.cpb_fc2.build((None, _CPB_HIDDEN))
        self.proj = keras.layers.Dense(dim, kernel_initializer=dense_initializer(), name="proj")
        self.proj.build(input_shape)
        self.built = True

    def position_bias(self):
        """``16·sigmoid(CPB-MLP(table))`` gathered to ``[heads, w², w²]``."""
        n = self.window_size * self.window_size
        table = self.cpb_fc2(self.cpb_fc1(ops.convert_to_tensor(self._table)))  # [(2w-1)², heads]
        bias = ops.take(table, ops.convert_to_tensor(self._index), axis=0)
        bias = ops.transpose(ops.reshape(bias, (n, n, self.num_heads)), (2, 0, 1))
        return 16.0 * ops.sigmoid(bias)

    def call(self, x, attention_mask=None):
        n, dim, heads, hd = self.window_size ** 2, self.dim, self.num_heads, self.head_dim
        qkv = ops.matmul(ops.reshape(x, (-1, dim)), ops.cast(self.qkv_kernel, x.dtype))
        if self.qkv_bias:
            qkv = bias_add(qkv, ops.concatenate([self.q_bias, ops.zeros_like(self.q_bias), self.v_bias]))
        qkv = ops.transpose(ops.reshape(qkv, (-1, n, 3, heads, hd)), (2, 0, 3, 1, 4))
        q, k, v = ops.unstack(qkv, 3, axis=0)  # (slices would cost a full-size gradient buffer each)
        # F.normalize semantics, x / max(‖x‖, 1e-12) = x · rsqrt(max(‖x‖², 1e-24)); the
        # clamped logit scale is folded into the (small) per-row factor of q
        scale = ops.cast(ops.exp(ops.minimum(self.logit_scale, math.log(100.0))), x.dtype)
        q = q * (ops.rsqrt(ops.maximum(ops.sum(ops.square(q), axis=-1, keepdims=True), 1e-24)) * scale)
        k = k * ops.rsqrt(ops.maximum(ops.sum(ops.square(k), axis=-1, keepdims=True), 1e-24))
        attn = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        bias = ops.cast(self.position_bias(), x.dtype)  # input-independent: once per call
        if attention_mask is not None:
            # position bias + shift mask combined once ([nW, heads, n, n]), one add on the scores
            nw = attention_mask.shape[0]
            bias = bias[None] + ops.cast(attention_mask, x.dtype)[:, None]
            attn = ops.reshape(ops.reshape(attn, (-1, nw, heads, n, n)) + bias, (-1, heads, n, n))
        else:
            attn = attn + bias[None]
        attn = ops.softmax(attn, axis=-1)
        out = ops.transpose(ops.matmul(attn, v), (0, 2, 1, 3))
        return linear(ops.reshape(out, (-1, n, dim)), self.proj)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_heads=self.num_heads, window_size=self.window_size,
                   pretrained_window_size=self.pretrained_window_size, qkv_bias=self.qkv_bias)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class SwinV2Block(keras.layers.Layer):
    """Swin V2 block on maps ``[B, H, W, C]``: (shifted) window attention and MLP, res-post-norm.

    ``x = x + DropPath(LN(W-MSA(x)))``; ``x = x + DropPath(LN(MLP(x)))`` (Swin V2 §3.2, Fig. 1).
    Maps whose sides are not multiples of the window are zero-padded (bottom/right) for
    the attention and cropped back, like the Hugging Face implementation.

    Args:
        num_heads: int. Attention heads.
        window_size: int. Window side.
        shift_size: int. Cyclic shift (0 for regular windows, ``window_size // 2`` for shifted).
        pretrained_window_size: int. CPB pretraining window (0: none).
        mlp_ratio: float. MLP hidden width / C.
        qkv_bias: bool. Query/value biases.
        layer_norm_eps: float. LayerNorm epsilon.
        drop_path: float. Stochastic-depth rate.
        input_resolution: (int, int) or None. Map size used when the static shape is unknown.

    Example:
        >>> y = SwinV2Block(2, 4, 2)(keras.random.normal((1, 8, 8, 16)))
    """

    def __init__(self, num_heads, window_size, shift_size=0, pretrained_window_size=0, mlp_ratio=4.0,
                 qkv_bias=True, layer_norm_eps=1e-5, drop_path=0.0, input_resolution=None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.window_size = int(window_size)
        self.shift_size = int(shift_size)
        if not 0 <= self.shift_size < max(self.window_size, 1) and self.shift_size:
            raise ConfigError(f"shift_size must be in [0, window_size), got {shift_size} for window {window_size}")
        self.pretrained_window_size = int(pretrained_window_size or 0)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_eps = float(layer_norm_eps)
        self.drop_path = float(drop_path)
        self.input_resolution = None if input_resolution is None else _pair(input_resolution, "input_resolution")
        self.attn = SwinV2WindowAttention(self.num_heads, self.window_size, self.pretrained_window_size,
                                          self.qkv_bias, name="attn")
        self.norm1 = LayerNorm(epsilon=self.layer_norm_eps, name="norm1")
        self.norm2 = LayerNorm(epsilon=self.layer_norm_eps, name="norm2")
        self.mlp = None
        self.drop = DropPath(self.drop_path, name="drop_path")
        self._masks = {}

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.mlp = MLP(int(c * self.mlp_ratio), name="mlp")
        self.attn.build((None, self.window_size ** 2, c))
        self.norm1.build(input_shape)
        self.norm2.build(input_shape)
        self.mlp.build(input_shape)
        self.built = True

    def _static_hw(self, x):
        h, w = x.shape[1], x.shape[2]
        if h is None or w is None:
            if self.input_resolution is None:
                raise ConfigError("Swin V2 needs images with a known height and width; "
                                  "give the dataset a fixed image size")
            h, w = self.input_resolution
        return int(h), int(w)

    def _mask(self, hp, wp):
        if self.shift_size == 0:
            return None
        key = (hp, wp)
        if key not in self._masks:
            self._masks[key] = shifted_window_mask(hp, wp, self.window_size, self.shift_size)
        return self._masks[key]

    def call(self, x, training=None):
        h, w = self._static_hw(x)
        c = x.shape[-1]
        ws, s = self.window_size, self.shift_size
        ph, pw = (-h) % ws, (-w) % ws
        y = x
        if ph or pw:
            y = ops.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
        hp, wp = h + ph, w + pw
        if s:
            y = ops.roll(y, shift=(-s, -s), axis=(1, 2))
        windows = _window_partition(y, ws, hp, wp, c)
        mask = self._mask(hp, wp)
        windows = self.attn(windows, attention_mask=None if mask is None else ops.convert_to_tensor(mask))
        y = _window_reverse(windows, ws, hp, wp, c)
        if s:
            y = ops.roll(y, shift=(s, s), axis=(1, 2))
        if ph or pw:
            y = y[:, :h, :w, :]
        x = x + self.drop(self.norm1(y), training=training)
        return x + self.drop(self.norm2(self.mlp(x)), training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_heads=self.num_heads, window_size=self.window_size, shift_size=self.shift_size,
                   pretrained_window_size=self.pretrained_window_size, mlp_ratio=self.mlp_ratio,
                   qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps, drop_path=self.drop_path,
                   input_resolution=None if self.input_resolution is None else list(self.input_resolution))
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class SwinV2Stage(keras.layers.Layer):
    """One Swin V2 stage: ``depth`` blocks alternating regular and shifted windows.

    When the stage's map is not larger than the window, the window shrinks to the map
    and shifting is turned off (reference implementation rule).

    Args:
        depth: int. Number of blocks.
        num_heads: int. Attention heads.
        window_size: int. Requested window side.
        input_resolution: (int, int). Map size at the configured input size.
        pretrained_window_size: int. CPB pretraining window (0: none).
        mlp_ratio: float. MLP ratio.
        qkv_bias: bool. Query/value biases.
        layer_norm_eps: float. LayerNorm epsilon.
        drop_path: list of float. Stochastic-depth rate per block.

    Example:
        >>> y = SwinV2Stage(2, 2, 4, (8, 8))(keras.random.normal((1, 8, 8, 16)))
    """

    def __init__(self, depth, num_heads, window_size, input_resolution, pretrained_window_size=0,
                 mlp_ratio=4.0, qkv_bias=True, layer_norm_eps=1e-5, drop_path=0.0, **kwargs):
        super().__init__(**kwargs)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.window_size = int(window_size)
        self.input_resolution = _pair(input_resolution, "input_resolution")
        self.pretrained_window_size = int(pretrained_window_size or 0)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_eps = float(layer_norm_eps)
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * self.depth
        if len(rates) != self.depth:
            raise ConfigError(f"need one drop-path rate per block ({self.depth}), got {len(rates)}")
        self.drop_path = [float(r) for r in rates]
        if min(self.input_resolution) <= self.window_size:
            self.effective_window = max(1, min(self.input_resolution))
            shift = 0
        else:
            self.effective_window = self.window_size
            shift = self.window_size // 2
        self.blocks = [
            SwinV2Block(self.num_heads, self.effective_window, 0 if i % 2 == 0 else shift,
                        self.pretrained_window_size, self.mlp_ratio, self.qkv_bias, self.layer_norm_eps,
                        self.drop_path[i], self.input_resolution, name=f"block_{i + 1}")
            for i in range(self.depth)
        ]

    def build(self, input_shape):
        for blk in self.blocks:
            blk.build(input_shape)
        self.built = True

    def call(self, x, training=None):
        for blk in self.blocks:
            x = blk(x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(depth=self.depth, num_heads=self.num_heads, window_size=self.window_size,
                   input_resolution=list(self.input_resolution),
                   pretrained_window_size=self.pretrained_window_size, mlp_ratio=self.mlp_ratio,
                   qkv_bias=self.qkv_bias, layer_norm_eps=self.layer_norm_eps, drop_path=list(self.drop_path))
        return cfg


# --------------------------------------------------------------------------------------
# the backbone
# --------------------------------------------------------------------------------------
def default_window_size(input_size) -> int:
    """Window 7 for the 224-px family (final map 7×7, 14×14, …), else 8 (256-px family)."""
    r = min(_pair(input_size, "input_size")) // 32
    return 7 if r > 0 and r % 7 == 0 and r % 8 != 0 else 8


@keras.saving.register_keras_serializable(package="histokd")
class SwinV2Backbone(Backbone):
    """Swin Transformer V2 encoder: float32 images in [0, 1] → pooled features ``[B, 8C]``.

    Liu et al. 2022 (Swin V2), §3 and Table 1: patch embedding (4×4) + LayerNorm, four
    stages of res-post-norm blocks with scaled cosine window attention and log-spaced
    continuous position bias, V2 patch merging between stages, final LayerNorm and
    global average pooling. Each stage's window and shift are fixed from ``input_size``
    (the window shrinks to the map when the map is smaller; shifting is then off).

    A functional :class:`~histokd.backbones.base.Backbone` with layers ``stage_1`` …
    ``stage_4`` (outputs before patch merging: maps ``[B, H/4, W/4, C]`` …
    ``[B, H/32, W/32, 8C]``), ``merge_1`` …, ``norm`` and ``pool``; ``stage_names``
    lists the stage layers, the per-stage maps of layer-wise distillation (Meng Li,
    §III-B, Fig. 1), and :meth:`stage_model` returns them with the pooled features.
    With ``dynamic_size=True`` any input size is accepted (maps are zero-padded to
    whole windows, as in the Hugging Face implementation).

    Args:
        input_size: int or (int, int). Image size; fixes each stage's window/shift.
        patch_size: int. Patch side (4).
        embed_dim: int. C, the width of stage 1 (doubles every stage).
        depths: list of int. Blocks per stage.
        num_heads: list of int. Heads per stage.
        window_size: int or None. Window side; None picks 7 for 224-px-like sizes, else 8.
        pretrained_window_size: int or list of int. Window the CPB was pretrained with, per
            stage (0: none); set it when fine-tuning weights trained with another window.
        mlp_ratio: float. MLP hidden width / C.
        qkv_bias: bool. Query/value biases.
        drop_path_rate: float. Stochastic depth, rising linearly over all blocks.
        layer_norm_eps: float. LayerNorm epsilon (1e-5).
        normalization: str. :class:`ImageNormalization` mode (``"torch"`` = ImageNet mean/std).
        mean: list of float or None. Custom channel means (with ``std``), overriding ``normalization``.
        std: list of float or None. Custom channel stds.
        dynamic_size: bool. Accept images of any size (input shape ``[B, None, None, C]``).
        in_channels: int. Image channels.
        arch: str. Registry key that built the model.

    Example:
        >>> enc = SwinV2Backbone(input_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
        >>> enc(keras.ops.zeros((2, 64, 64, 3))).shape
        TensorShape([2, 32])
    """

    checkpoint_family = "swinv2"

    def __init__(self, input_size=256, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=None, pretrained_window_size=0, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.2, layer_norm_eps=1e-5, normalization="torch",
                 mean=None, std=None, dynamic_size=False, in_channels=3, arch="swinv2", **kwargs):
        kwargs.pop("stage_names", None)
        size = _pair(input_size, "input_size")
        depths = [int(d) for d in depths]
        num_heads = [int(h) for h in num_heads]
        if len(depths) != len(num_heads) or not depths:
            raise ConfigError(f"Swin V2 needs one num_heads entry per stage: depths={depths}, num_heads={num_heads}")
        window_size = default_window_size(size) if window_size is None else int(window_size)
        if window_size < 1:
            raise ConfigError(f"window_size must be >= 1, got {window_size}")
        if isinstance(pretrained_window_size, (list, tuple)):
            pws = [int(p) for p in pretrained_window_size]
            if len(pws) != len(depths):
                raise ConfigError(f"pretrained_window_size needs one entry per stage ({len(depths)}), got {pws}")
        else:
            pws = [int(pretrained_window_size or 0)] * len(depths)
        patch_size, embed_dim = int(patch_size), int(embed_dim)
        for i, h in enumerate(num_heads):
            if (embed_dim * 2 ** i) % h:
                raise ConfigError(f"stage {i + 1} width {embed_dim * 2 ** i} is not divisible by "
                                  f"num_heads={h}; change embed_dim or num_heads")
        grid = (size[0] // patch_size, size[1] // patch_size)
        if min(grid) < 1:
            raise ConfigError(f"input_size {size} is smaller than one patch ({patch_size} px)")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        rates = np.linspace(0.0, float(drop_path_rate), sum(depths)).tolist()

        image = input_layer(size, in_channels, dynamic_size)
        x = normalization_layer(normalization, mean, std)(image)
        x = SwinV2PatchEmbed(patch_size, embed_dim, layer_norm_eps, name="patch_embed")(x)
        names = []
        start = 0
        for i, depth in enumerate(depths):
            res = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            if min(res) < 1:
                raise ConfigError(f"input_size {size} is too small for {len(depths)} stages; "
                                  f"use at least {patch_size * 2 ** (len(depths) - 1)} px")
            names.append(f"stage_{i + 1}")
            x = SwinV2Stage(depth, num_heads[i], window_size, res, pws[i], mlp_ratio, qkv_bias,
                            layer_norm_eps, rates[start:start + depth], name=names[-1])(x)
            start += depth
            if i < len(depths) - 1:
                x = SwinV2PatchMerging(layer_norm_eps, name=f"merge_{i + 1}")(x)
        x = LayerNorm(epsilon=float(layer_norm_eps), name="norm")(x)
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        super().__init__(image, pooled, stage_names=names, arch=arch, **kwargs)

        self.image_size = size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_size = window_size
        self.pretrained_window_size = pws
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_eps = float(layer_norm_eps)
        self.normalization = normalization
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.dynamic_size = bool(dynamic_size)
        self.in_channels = int(in_channels)

    def stage_model(self):
        """A model sharing this backbone's weights: images → ``{"stage_1", …, "stage_4", "pooled"}``."""
        return self.feature_model()

    @property
    def stage_channels(self):
        """Channel width of every stage output, in ``stage_names`` order."""
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))]

    def canonical_weights(self):
        """``{key: variable}`` in histokd's checkpoint-neutral naming (the layouts below map onto it)."""
        pe = self.get_layer("patch_embed")
        out = {
            "patch_embed.kernel": pe.proj.kernel, "patch_embed.bias": pe.proj.bias,
            "patch_embed.norm.gamma": pe.norm.gamma, "patch_embed.norm.beta": pe.norm.beta,
        }
        for s in range(len(self.depths)):
            stage = self.get_layer(f"stage_{s + 1}")
            for b, blk in enumerate(stage.blocks):
                p = f"stages.{s}.blocks.{b}."
                a = blk.attn
                out.update({
                    p + "attn.qkv.kernel": a.qkv_kernel,
                    p + "attn.logit_scale": a.logit_scale,
                    p + "attn.cpb_fc1.kernel": a.cpb_fc1.kernel, p + "attn.cpb_fc1.bias": a.cpb_fc1.bias,
                    p + "attn.cpb_fc2.kernel": a.cpb_fc2.kernel,
                    p + "attn.proj.kernel": a.proj.kernel, p + "attn.proj.bias": a.proj.bias,
                    p + "norm1.gamma": blk.norm1.gamma, p + "norm1.beta": blk.norm1.beta,
                    p + "mlp.fc1.kernel": blk.mlp.fc1.kernel, p + "mlp.fc1.bias": blk.mlp.fc1.bias,
                    p + "mlp.fc2.kernel": blk.mlp.fc2.kernel, p + "mlp.fc2.bias": blk.mlp.fc2.bias,
                    p + "norm2.gamma": blk.norm2.gamma, p + "norm2.beta": blk.norm2.beta,
                })
                if a.qkv_bias:
                    out[p + "attn.q_bias"] = a.q_bias
                    out[p + "attn.v_bias"] = a.v_bias
            if s < len(self.depths) - 1:
                m = self.get_layer(f"merge_{s + 1}")
                out[f"stages.{s}.merge.reduction.kernel"] = m.reduction.kernel
                out[f"stages.{s}.merge.norm.gamma"] = m.norm.gamma
                out[f"stages.{s}.merge.norm.beta"] = m.norm.beta
        norm = self.get_layer("norm")
        out["norm.gamma"] = norm.gamma
        out["norm.beta"] = norm.beta
        return out

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_size": list(self.image_size),
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depths": list(self.depths),
            "num_heads": list(self.num_heads),
            "window_size": self.window_size,
            "pretrained_window_size": list(self.pretrained_window_size),
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "drop_path_rate": self.drop_path_rate,
            "layer_norm_eps": self.layer_norm_eps,
            "normalization": self.normalization,
            "mean": self.mean,
            "std": self.std,
            "dynamic_size": self.dynamic_size,
            "in_channels": self.in_channels,
            "arch": self.arch,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# --------------------------------------------------------------------------------------
# checkpoint layouts
# --------------------------------------------------------------------------------------
_HF_SW = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_DST_SW = r"stages.\1.blocks.\2."
HF_SWINV2_RENAMES = [
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed.kernel", "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed.bias", "copy"),
    *norm_rules(r"embeddings\.norm", "patch_embed.norm"),
    (_HF_SW + r"attention\.self\.logit_scale", _DST_SW + "attn.logit_scale", "copy"),
    *dense_rules(_HF_SW + r"attention\.self\.continuous_position_bias_mlp\.0", _DST_SW + "attn.cpb_fc1"),
    (_HF_SW + r"attention\.self\.continuous_position_bias_mlp\.2\.weight", _DST_SW + "attn.cpb_fc2.kernel",
     "linear"),
    (_HF_SW + r"attention\.self\.query\.weight", _DST_SW + "attn.q.kernel", "linear"),
    (_HF_SW + r"attention\.self\.key\.weight", _DST_SW + "attn.k.kernel", "linear"),
    (_HF_SW + r"attention\.self\.value\.weight", _DST_SW + "attn.v.kernel", "linear"),
    (_HF_SW + r"attention\.self\.query\.bias", _DST_SW + "attn.q_bias", "copy"),
    (_HF_SW + r"attention\.self\.value\.bias", _DST_SW + "attn.v_bias", "copy"),
    (_HF_SW + r"attention\.self\.(relative_coords_table|relative_position_index)", None, "ignore"),
    *dense_rules(_HF_SW + r"attention\.output\.dense", _DST_SW + "attn.proj"),
    *norm_rules(_HF_SW + r"layernorm_before", _DST_SW + "norm1"),
    *norm_rules(_HF_SW + r"layernorm_after", _DST_SW + "norm2"),
    *dense_rules(_HF_SW + r"intermediate\.dense", _DST_SW + "mlp.fc1"),
    *dense_rules(_HF_SW + r"output\.dense", _DST_SW + "mlp.fc2"),
    (r"encoder\.layers\.(\d+)\.downsample\.reduction\.weight", r"stages.\1.merge.reduction.kernel", "linear"),
    *norm_rules(r"encoder\.layers\.(\d+)\.downsample\.norm", r"stages.\1.merge.norm"),
    *norm_rules(r"layernorm", "norm"),
    (r"(pooler|classifier|decoder)\..*", None, "ignore"),
    (r"embeddings\.mask_token", None, "ignore"),
]

_MS_SW = r"layers\.(\d+)\.blocks\.(\d+)\."
MS_SWINV2_RENAMES = [
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", "copy"),
    *norm_rules(r"patch_embed\.norm", "patch_embed.norm"),
    (_MS_SW + r"attn\.logit_scale", _DST_SW + "attn.logit_scale", "copy"),
    *dense_rules(_MS_SW + r"attn\.cpb_mlp\.0", _DST_SW + "attn.cpb_fc1"),
    (_MS_SW + r"attn\.cpb_mlp\.2\.weight", _DST_SW + "attn.cpb_fc2.kernel", "linear"),
    (_MS_SW + r"attn\.qkv\.weight", _DST_SW + "attn.qkv.kernel", "linear"),
    (_MS_SW + r"attn\.q_bias", _DST_SW + "attn.q_bias", "copy"),
    (_MS_SW + r"attn\.v_bias", _DST_SW + "attn.v_bias", "copy"),
    (_MS_SW + r"attn\.(relative_coords_table|relative_position_index)", None, "ignore"),
    (_MS_SW + r"attn_mask", None, "ignore"),
    *dense_rules(_MS_SW + r"attn\.proj", _DST_SW + "attn.proj"),
    *norm_rules(_MS_SW + r"norm1", _DST_SW + "norm1"),
    *norm_rules(_MS_SW + r"norm2", _DST_SW + "norm2"),
    *dense_rules(_MS_SW + r"mlp\.fc1", _DST_SW + "mlp.fc1"),
    *dense_rules(_MS_SW + r"mlp\.fc2", _DST_SW + "mlp.fc2"),
    (r"layers\.(\d+)\.downsample\.reduction\.weight", r"stages.\1.merge.reduction.kernel", "linear"),
    *norm_rules(r"layers\.(\d+)\.downsample\.norm", r"stages.\1.merge.norm"),
    *norm_rules(r"norm", "norm"),
    (r"head(\..*)?\.(weight|bias)", None, "ignore"),
]


def _has(keys, pattern):
    return re.search(pattern, "\n".join(keys), re.M) is not None


def _official_style(keys):
    return _has(keys, r"(^|\.)layers\.\d+\.blocks\.\d+\.attn\.(cpb_mlp|logit_scale)")


def _timm_merges_to_previous_stage(state_dict):
    """timm puts stage s's patch merging at the start of stage s + 1; move it back to stage s."""
    moved = {}
    for k, v in state_dict.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        moved[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    return moved


register_layout(CheckpointLayout(
    family="swinv2", name="hf_swinv2", rules=HF_SWINV2_RENAMES,
    anchor="embeddings.patch_embeddings.projection.weight",
    detect=lambda keys: _has(keys, r"(^|\.)encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\."),
    priority=30,
))
register_layout(CheckpointLayout(
    family="swinv2", name="ms_swinv2", rules=MS_SWINV2_RENAMES, anchor="patch_embed.proj.weight",
    detect=lambda keys: _official_style(keys)
    and _has(keys, r"(^|\.)layers\.0\.downsample\.reduction\.weight$"),
    priority=21,
))
register_layout(CheckpointLayout(
    family="swinv2", name="timm_swinv2", rules=MS_SWINV2_RENAMES, anchor="patch_embed.proj.weight",
    detect=_official_style, priority=20, prepare=_timm_merges_to_previous_stage,
))

# transformers' Swinv2Config defaults, for config.json files that omit them
_HF_SWINV2_DEFAULTS = dict(image_size=224, patch_size=4, num_channels=3, embed_dim=96, depths=[2, 2, 6, 2],
                           num_heads=[3, 6, 12, 24], window_size=7, pretrained_window_sizes=[0, 0, 0, 0],
                           mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1, hidden_act="gelu",
                           use_absolute_embeddings=False, layer_norm_eps=1e-5)


def swinv2_kwargs_from_hf(config: dict) -> dict:
    """:class:`SwinV2Backbone` arguments for a Hugging Face ``Swinv2Config`` (``model_type: swinv2``).

    Args:
        config: dict. The parsed ``config.json``.

    Returns:
        dict of constructor arguments (pooled = ``Swinv2Model(...).pooler_output``).

    Raises:
        ConfigError: absolute position embeddings or an activation other than exact GELU.
    """
    c = {**_HF_SWINV2_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if c["hidden_act"] != "gelu":
        raise ConfigError(f"Swin V2 config.json sets hidden_act={c['hidden_act']!r}; histokd's Swin V2 uses "
                          "exact GELU ('gelu') only")
    if c["use_absolute_embeddings"]:
        raise ConfigError("Swin V2 config.json sets use_absolute_embeddings=true; histokd's Swin V2 has no "
                          "absolute position embeddings (the published Swin V2 models do not use them)")
    depths = [int(d) for d in c["depths"]]
    pws = [int(p) for p in (c["pretrained_window_sizes"] or [])]
    if not any(pws):  # transformers writes its 4-stage default [0, 0, 0, 0] whatever the depth
        pws = 0
    return dict(input_size=_pair(c["image_size"], "image_size"), patch_size=int(c["patch_size"]),
                embed_dim=int(c["embed_dim"]), depths=depths, num_heads=[int(h) for h in c["num_heads"]],
                window_size=int(c["window_size"]), pretrained_window_size=pws,
                mlp_ratio=float(c["mlp_ratio"]), qkv_bias=bool(c["qkv_bias"]),
                drop_path_rate=float(c["drop_path_rate"]), layer_norm_eps=float(c["layer_norm_eps"]),
                in_channels=int(c["num_channels"]))


def _warn_window_mismatch(model, config, cfg_path):
    """Warn when a folder's config.json asks for windows the model does not use."""
    want_w = config.get("window_size")
    want_pw = [int(p) for p in config.get("pretrained_window_sizes") or []]
    if want_w is not None and int(want_w) != model.window_size:
        warnings.warn(f"{cfg_path} was trained with window_size={want_w} but the model uses "
                      f"{model.window_size}; pass pretrained_window_size={want_w} (or window_size={want_w}) "
                      "so the continuous position bias is evaluated on the scale it was trained on",
                      stacklevel=4)
    elif want_pw and any(want_pw) and want_pw != list(model.pretrained_window_size):
        warnings.warn(f"{cfg_path} sets pretrained_window_sizes={want_pw} but the model uses "
                      f"{list(model.pretrained_window_size)}; build it with pretrained_window_size={want_pw}",
                      stacklevel=4)


register_hf_model_type(HFModelType(
    model_type="swinv2", family="swinv2", layout="hf_swinv2", build=SwinV2Backbone,
    config_to_kwargs=swinv2_kwargs_from_hf, check_config=_warn_window_mismatch,
    default_normalization=dict(normalization="tf"),  # ViTImageProcessor's default mean = std = 0.5
))


# --------------------------------------------------------------------------------------
# presets (Swin V2 Table 1; drop-path rates of the official ImageNet-1K recipes)
# --------------------------------------------------------------------------------------
SWINV2_PRESETS = {
    "swinv2_tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.2),
    "swinv2_small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.3),
    "swinv2_base": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], drop_path_rate=0.5),
}


_FACTORIES = register_presets(
    SwinV2Backbone, SWINV2_PRESETS, default_size=256,
    summary=("Swin V2 preset {key!r}: C={embed_dim}, depths {depths}, heads {num_heads} "
             "(Liu et al. 2022, Table 1).\n\nWindow 8 at 256 px (default); at 224 px the window "
             "defaults to 7."),
    # 64 px: the last stage keeps a 2x2 map (a 1x1 map makes its attention a constant)
    tiny=dict(input_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
              drop_path_rate=0.0),
)
swinv2_tiny = _FACTORIES["swinv2_tiny"]
swinv2_small = _FACTORIES["swinv2_small"]
swinv2_base = _FACTORIES["swinv2_base"]
