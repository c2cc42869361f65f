"""Vision Transformer (ViT) backbone.

Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image
Recognition at Scale", §3.1 (Eq. 1–4): non-overlapping patch embedding, a class
token, learned 1-D position embeddings, pre-norm Transformer blocks and a final
LayerNorm. When the input size differs from the configured size the patch
position embeddings are resized bicubically (§3.2, "Fine-tuning and higher
resolution"), with the same arithmetic as PyTorch ``F.interpolate(mode="bicubic",
align_corners=False)`` so that converted Hugging Face / timm weights give the same
numbers as the reference models with ``interpolate_pos_encoding=True``.

The CASS paper (Singh et al., "CASS: Cross Architectural Self-Supervision") pairs
this backbone (ViT-B/16) with a ResNet-50.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
from keras import ops

from histokd.backbones._common import (  # noqa: F401  (PixelNormalization & co. were defined here)
    IMAGENET_MEAN,
    IMAGENET_STD,
    PixelNormalization,
    _pair,
    build_preset,
    input_layer,
    normalization_layer,
    register_presets,
)
from histokd.backbones.base import Backbone
from histokd.backbones.layouts import (
    CheckpointLayout,
    HFModelType,
    dense_rules,
    norm_rules,
    register_hf_model_type,
    register_layout,
)
from histokd.errors import ConfigError, WeightsError
from histokd.layers.attention import DropPath, LayerNorm, LayerScale, MLP, MultiHeadSelfAttention


# --------------------------------------------------------------------------------------
# bicubic resizing with PyTorch's arithmetic (a = -0.75, half-pixel centres, clamped edges)
# --------------------------------------------------------------------------------------
_CUBIC_A = -0.75


def _cubic_weights(t):
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Matrix ``M`` [out, in] with ``M @ v`` = 1-D bicubic resize of ``v``.

    Matches ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``
    along one axis (cubic convolution with a = -0.75, half-pixel sampling, indices
    clamped at the borders); a 2-D resize is ``M_h @ X @ M_wᵀ``.

    Args:
        in_size: int. Source length.
        out_size: int. Target length.

    Example:
        >>> bicubic_resize_matrix(14, 16).shape
        (16, 14)
    """
    m = np.zeros((out_size, in_size), dtype=np.float64)
    scale = in_size / out_size
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k, w in enumerate(_cubic_weights(t)):
            m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w
    return m


def _bicubic_matrix_tensor(in_size: int, out_size):
    """``bicubic_resize_matrix`` in ``keras.ops`` for a target length known only at run time."""
    out_f = ops.cast(out_size, "float32")
    dst = ops.arange(0, out_size, dtype="float32")
    src = (dst + 0.5) * (float(in_size) / out_f) - 0.5
    i0 = ops.floor(src)
    t = src - i0
    i0 = ops.cast(i0, "int32")
    m = 0.0
    for k, w in enumerate(_cubic_weights(t)):
        idx = ops.clip(i0 - 1 + k, 0, in_size - 1)
        m = m + ops.one_hot(idx, in_size, dtype="float32") * w[:, None]
    return m


def resize_position_grid(grid: np.ndarray, new_hw) -> np.ndarray:
    """Bicubically resize a position-embedding grid ``[h, w, dim]`` to ``new_hw`` (numpy)."""
    h, w = grid.shape[:2]
    mh = bicubic_resize_matrix(h, int(new_hw[0]))
    mw = bicubic_resize_matrix(w, int(new_hw[1]))
    out = np.einsum("ih,hwd->iwd", mh, grid.astype(np.float64))
    return np.einsum("jw,iwd->ijd", mw, out).astype(grid.dtype)


# --------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="histokd")
class ViTEmbedding(keras.layers.Layer):
    """Patch embedding + class token + learned position embeddings (ViT Eq. 1).

    Position embeddings are stored for the configured ``grid`` and bicubically
    resized (class-token position untouched) whenever the patch grid of the input
    differs, like Hugging Face ``ViTModel(..., interpolate_pos_encoding=True)``.

    Args:
        embed_dim: int. Token width.
        patch_size: int. Side of the square patches (and the convolution stride).
        grid: tuple of int. Patch grid ``(rows, cols)`` the position table is stored for.

    Example:
        >>> tok = ViTEmbedding(32, 8, (4, 4))(keras.ops.zeros((2, 32, 32, 3)))  # [2, 17, 32]
    """

    def __init__(self, embed_dim, patch_size, grid, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.grid = _pair(grid, "grid")
        self.proj = keras.layers.Conv2D(self.embed_dim, self.patch_size, strides=self.patch_size,
                                        padding="valid", name="proj")

    def build(self, input_shape):
        self.proj.build(input_shape)
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.cls_token = self.add_weight(name="cls_token", shape=(1, 1, self.embed_dim), initializer=init)
        n = self.grid[0] * self.grid[1]
        self.pos_embed = self.add_weight(name="pos_embed", shape=(1, n + 1, self.embed_dim), initializer=init)
        self.built = True

    def _patch_positions(self, gh, gw, dtype):
        pos = ops.cast(self.pos_embed[0, 1:], dtype)
        h0, w0 = self.grid
        if isinstance(gh, int) and isinstance(gw, int):
            if (gh, gw) == (h0, w0):
                return pos
            mh = ops.convert_to_tensor(bicubic_resize_matrix(h0, gh).astype("float32"), dtype=dtype)
            mw = ops.convert_to_tensor(bicubic_resize_matrix(w0, gw).astype("float32"), dtype=dtype)
        else:
            mh = ops.cast(_bicubic_matrix_tensor(h0, gh), dtype)
            mw = ops.cast(_bicubic_matrix_tensor(w0, gw), dtype)
        grid = ops.reshape(pos, (h0, w0, self.embed_dim))
        grid = ops.einsum("ih,hwd->iwd", mh, grid)
        grid = ops.einsum("jw,iwd->ijd", mw, grid)
        return ops.reshape(grid, (-1, self.embed_dim))

    def call(self, images):
        x = self.proj(images)
        gh, gw = x.shape[1], x.shape[2]
        if gh is None or gw is None:
            gh, gw = ops.shape(x)[1], ops.shape(x)[2]
        x = ops.reshape(x, (ops.shape(x)[0], -1, self.embed_dim))
        cls = ops.broadcast_to(ops.cast(self.cls_token, x.dtype), (ops.shape(x)[0], 1, self.embed_dim))
        pos = self._patch_positions(gh, gw, x.dtype)
        x = x + pos[None]
        cls = cls + ops.cast(self.pos_embed[:, :1], x.dtype)
        return ops.concatenate([cls, x], axis=1)

    def compute_output_shape(self, input_shape):
        h, w = input_shape[1], input_shape[2]
        n = None if h is None or w is None else (h // self.patch_size) * (w // self.patch_size) + 1
        return (input_shape[0], n, self.embed_dim)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(embed_dim=self.embed_dim, patch_size=self.patch_size, grid=list(self.grid))
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class ViTBlock(keras.layers.Layer):
    """Pre-norm Transformer block: ``x + MSA(LN(x))`` then ``x + MLP(LN(x))`` (ViT Eq. 2–3).

    Args:
        num_heads: int. Attention heads.
        mlp_ratio: float. MLP hidden width / token width.
        qkv_bias: bool. Bias on the query/key/value projection.
        layer_norm_eps: float. LayerNorm epsilon (timm 1e-6, Hugging Face ViT 1e-12).
        layer_scale_init: float or None. LayerScale initial value; None disables LayerScale.
        drop_path: float. Stochastic-depth rate of this block.

    Example:
        >>> y = ViTBlock(4)(keras.random.normal((2, 17, 32)))
    """

    def __init__(self, num_heads, mlp_ratio=4.0, qkv_bias=True, layer_norm_eps=1e-6,
                 layer_scale_init=None, drop_path=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_eps = float(layer_norm_eps)
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        self.drop_path = float(drop_path)
        self.norm1 = LayerNorm(epsilon=self.layer_norm_eps, name="norm1")
        self.attn = MultiHeadSelfAttention(self.num_heads, qkv_bias=self.qkv_bias, name="attn")
        self.norm2 = LayerNorm(epsilon=self.layer_norm_eps, name="norm2")
        self.mlp = None
        if self.layer_scale_init is not None:
            self.ls1 = LayerScale(self.layer_scale_init, name="ls1")
            self.ls2 = LayerScale(self.layer_scale_init, name="ls2")
        else:
            self.ls1 = self.ls2 = None
        self.drop = DropPath(self.drop_path, name="drop_path")

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.mlp = MLP(int(dim * self.mlp_ratio), name="mlp")
        for layer in (self.norm1, self.attn, self.norm2, self.mlp, self.ls1, self.ls2):
            if layer is not None:
                layer.build(input_shape)
        self.built = True

    def call(self, x, training=None):
        y = self.attn(self.norm1(x))
        if self.ls1 is not None:
            y = self.ls1(y)
        x = x + self.drop(y, training=training)
        y = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            y = self.ls2(y)
        return x + self.drop(y, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                   layer_norm_eps=self.layer_norm_eps, layer_scale_init=self.layer_scale_init,
                   drop_path=self.drop_path)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class TokenPooling(keras.layers.Layer):
    """Pools a token sequence ``[B, 1 + N, D]``: the class token or the mean patch token.

    Args:
        mode: str. ``"token"`` (class token) or ``"mean"`` (average of the patch tokens).

    Example:
        >>> y = TokenPooling("mean")(keras.random.normal((2, 17, 32)))  # [2, 32]
    """

    def __init__(self, mode="token", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("token", "mean"):
            raise ConfigError(f"pooling must be 'token' or 'mean', got {mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "token":
            return x[:, 0]
        return ops.mean(x[:, 1:], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        cfg = super().get_config()
        cfg.update(mode=self.mode)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class TokensToMap(keras.layers.Layer):
    """Drops the class token and folds patch tokens into a map ``[B, H/p, W/p, D]``.

    Args:
        patch_size: int. Patch side, to recover the grid from the image.

    Example:
        >>> m = TokensToMap(8)([keras.ops.zeros((2, 17, 32)), keras.ops.zeros((2, 32, 32, 3))])
    """

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)

    def call(self, inputs):
        tokens, images = inputs
        gh = images.shape[1] // self.patch_size if images.shape[1] is not None else ops.shape(images)[1] // self.patch_size
        gw = images.shape[2] // self.patch_size if images.shape[2] is not None else ops.shape(images)[2] // self.patch_size
        return ops.reshape(tokens[:, 1:], (ops.shape(tokens)[0], gh, gw, tokens.shape[-1]))

    def compute_output_shape(self, input_shape):
        tok, img = input_shape
        gh = None if img[1] is None else img[1] // self.patch_size
        gw = None if img[2] is None else img[2] // self.patch_size
        return (tok[0], gh, gw, tok[-1])

    def get_config(self):
        cfg = super().get_config()
        cfg.update(patch_size=self.patch_size)
        return cfg


# --------------------------------------------------------------------------------------
# the backbone
# --------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="histokd")
class ViTBackbone(Backbone):
    """Vision Transformer encoder: float32 images in [0, 1] → pooled features ``[B, D]``.

    Dosovitskiy et al. 2021, §3.1: ``z0 = [x_cls; x_p E] + E_pos``, ``L`` pre-norm
    blocks, final LayerNorm; the pooled feature is the normed class token
    (``pooling="token"``) or the mean of the normed patch tokens (``"mean"``).

    A functional :class:`~histokd.backbones.base.Backbone` with one layer per block
    (``block_1`` … ``block_L``, outputs ``[B, 1 + N, D]`` token sequences, class token
    first) listed in ``stage_names``; ``feature_model()`` / :meth:`stage_model` return
    them with the pooled features. With ``dynamic_size=True`` any input size is
    accepted and the position table (stored for ``input_size``) is resized bicubically
    (§3.2, "Fine-tuning and higher resolution").

    Args:
        input_size: int or (int, int). Image size (and the grid the position table is stored for).
        patch_size: int. Patch side (16 for ViT-*/16).
        embed_dim: int. Token width D.
        depth: int. Number of blocks L.
        num_heads: int. Attention heads.
        mlp_ratio: float. MLP hidden width / D.
        qkv_bias: bool. Bias on the qkv projection.
        layer_norm_eps: float. LayerNorm epsilon: 1e-6 (timm, original JAX ViT) or 1e-12 (Hugging Face).
        layer_scale_init: float or None. LayerScale init (1e-5 for UNI-style ViT-L/16); None: off.
        drop_path_rate: float. Stochastic depth, rising linearly to this value at the last block.
        pooling: str. ``"token"`` or ``"mean"``.
        normalization: str. :class:`ImageNormalization` mode: ``"torch"`` (ImageNet mean/std),
            ``"tf"`` ([-1, 1], i.e. mean = std = 0.5 as Google's ViT checkpoints) or ``"none"``.
        mean: list of float or None. Custom channel means (with ``std``), overriding ``normalization``.
        std: list of float or None. Custom channel stds.
        dynamic_size: bool. Accept images of any size (input shape ``[B, None, None, C]``).
        in_channels: int. Image channels.
        arch: str. Registry key that built the model.

    Example:
        >>> enc = ViTBackbone(input_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
        >>> enc(keras.ops.zeros((2, 32, 32, 3))).shape
        TensorShape([2, 32])
        >>> feats = enc.stage_model()(keras.ops.zeros((2, 32, 32, 3)))  # {"block_1", "block_2", "pooled"}
    """

    checkpoint_family = "vit"

    def __init__(self, input_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, layer_norm_eps=1e-6, layer_scale_init=None,
                 drop_path_rate=0.0, pooling="token", normalization="torch", mean=None, std=None,
                 dynamic_size=False, in_channels=3, arch="vit", **kwargs):
        kwargs.pop("stage_names", None)
        size = _pair(input_size, "input_size")
        patch_size = int(patch_size)
        embed_dim, depth, num_heads = int(embed_dim), int(depth), int(num_heads)
        if patch_size < 1 or size[0] < patch_size or size[1] < patch_size:
            raise ConfigError(f"ViT input_size {size} must be at least one patch ({patch_size} px)")
        if embed_dim % num_heads:
            raise ConfigError(f"ViT embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if depth < 1:
            raise ConfigError(f"ViT depth must be >= 1, got {depth}")
        if not 0.0 <= float(drop_path_rate) < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        grid = (size[0] // patch_size, size[1] // patch_size)

        image = input_layer(size, in_channels, dynamic_size)
        x = normalization_layer(normalization, mean, std)(image)
        x = ViTEmbedding(embed_dim, patch_size, grid, name="embed")(x)
        rates = np.linspace(0.0, float(drop_path_rate), depth).tolist()
        names = []
        for i in range(depth):
            names.append(f"block_{i + 1}")
            x = ViTBlock(num_heads, mlp_ratio, qkv_bias, layer_norm_eps, layer_scale_init,
                         rates[i], name=names[-1])(x)
        x = LayerNorm(epsilon=float(layer_norm_eps), name="norm")(x)
        pooled = TokenPooling(pooling, name="pool")(x)
        super().__init__(image, pooled, stage_names=names, arch=arch, **kwargs)

        self.image_size = size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.layer_norm_eps = float(layer_norm_eps)
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        self.drop_path_rate = float(drop_path_rate)
        self.pooling = pooling
        self.normalization = normalization
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.dynamic_size = bool(dynamic_size)
        self.in_channels = int(in_channels)

    def stage_model(self):
        """A model sharing this backbone's weights: images → ``{"block_1", …, "block_L", "pooled"}``."""
        return self.feature_model()

    @property
    def stage_channels(self):
        """Channel width of every stage output, in ``stage_names`` order."""
        return [self.embed_dim] * self.depth

    def canonical_weights(self):
        """``{key: variable}`` in histokd's checkpoint-neutral naming (the layouts below map onto it)."""
        emb = self.get_layer("embed")
        out = {
            "patch_embed.kernel": emb.proj.kernel,
            "patch_embed.bias": emb.proj.bias,
            "cls_token": emb.cls_token,
            "pos_embed": emb.pos_embed,
        }
        for i in range(self.depth):
            blk = self.get_layer(f"block_{i + 1}")
            p = f"blocks.{i}."
            out.update({
                p + "norm1.gamma": blk.norm1.gamma, p + "norm1.beta": blk.norm1.beta,
                p + "attn.qkv.kernel": blk.attn.qkv.kernel,
                p + "attn.proj.kernel": blk.attn.proj.kernel, p + "attn.proj.bias": blk.attn.proj.bias,
                p + "norm2.gamma": blk.norm2.gamma, p + "norm2.beta": blk.norm2.beta,
                p + "mlp.fc1.kernel": blk.mlp.fc1.kernel, p + "mlp.fc1.bias": blk.mlp.fc1.bias,
                p + "mlp.fc2.kernel": blk.mlp.fc2.kernel, p + "mlp.fc2.bias": blk.mlp.fc2.bias,
            })
            if self.qkv_bias:
                out[p + "attn.qkv.bias"] = blk.attn.qkv.bias
            if blk.ls1 is not None:
                out[p + "ls1.gamma"] = blk.ls1.gamma
                out[p + "ls2.gamma"] = blk.ls2.gamma
        norm = self.get_layer("norm")
        out["norm.gamma"] = norm.gamma
        out["norm.beta"] = norm.beta
        return out

    def fit_checkpoint_weight(self, name, array, origin):
        """Resize a checkpoint's position table stored for another patch grid (bicubic, §3.2).

        Args:
            name: str. Canonical weight name; only ``"pos_embed"`` is adapted.
            array: numpy array ``[1, N(+1), D]``. Converted checkpoint value.
            origin: str. Checkpoint key, for the message.

        Returns:
            (array, changed).

        Raises:
            WeightsError: the stored positions do not form a square grid.
        """
        if name != "pos_embed" or array.ndim != 3 or array.shape[2] != self.embed_dim:
            return array, False
        return fit_position_table(array, self.get_layer("embed").grid, origin)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_size": list(self.image_size),
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "layer_norm_eps": self.layer_norm_eps,
            "layer_scale_init": self.layer_scale_init,
            "drop_path_rate": self.drop_path_rate,
            "pooling": self.pooling,
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


def fit_position_table(array, grid, origin: str = "pos_embed"):
    """A checkpoint's ViT position table ``[1, 1 + N, D]`` fitted to the patch ``grid``.

    A table without a class position (``N`` a square) gets a zero one; a table of another
    square grid is resized bicubically (Dosovitskiy et al. 2021, §3.2).

    Args:
        array: numpy array. Position table from the checkpoint.
        grid: (int, int). The model's patch grid.
        origin: str. Checkpoint key, for the message.

    Returns:
        (array, changed).

    Raises:
        WeightsError: the positions do not form a square grid.
    """
    if array.ndim != 3:
        return array, False
    n_ckpt, dim = array.shape[1], array.shape[2]
    side = math.isqrt(n_ckpt - 1)
    if side * side != n_ckpt - 1:
        side = math.isqrt(n_ckpt)
        if side * side != n_ckpt:
            raise WeightsError(f"checkpoint key {origin!r} has {n_ckpt} positions, not a square grid; "
                               "cannot resize it to the model's input size")
        array = np.concatenate([np.zeros((1, 1, dim), array.dtype), array], axis=1)  # no class position
    if (side, side) == tuple(grid):
        return array, array.shape[1] != n_ckpt
    patch = resize_position_grid(array[0, 1:].reshape(side, side, dim), grid).reshape(1, -1, dim)
    return np.concatenate([array[:, :1], patch], axis=1), True


# --------------------------------------------------------------------------------------
# checkpoint layouts
# --------------------------------------------------------------------------------------
# Hugging Face ViT: save_pretrained file names and transformers ≥ 5 in-memory names.
HF_VIT_RENAMES = [
    (r"embeddings\.cls_token", "cls_token", "copy"),
    (r"embeddings\.position_embeddings", "pos_embed", "copy"),
    (r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed.kernel", "conv"),
    (r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed.bias", "copy"),
    *dense_rules(r"encoder\.layer\.(\d+)\.attention\.attention\.query", r"blocks.\1.attn.q"),
    *dense_rules(r"encoder\.layer\.(\d+)\.attention\.attention\.key", r"blocks.\1.attn.k"),
    *dense_rules(r"encoder\.layer\.(\d+)\.attention\.attention\.value", r"blocks.\1.attn.v"),
    *dense_rules(r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"blocks.\1.attn.proj"),
    *dense_rules(r"encoder\.layer\.(\d+)\.intermediate\.dense", r"blocks.\1.mlp.fc1"),
    *dense_rules(r"encoder\.layer\.(\d+)\.output\.dense", r"blocks.\1.mlp.fc2"),
    *norm_rules(r"encoder\.layer\.(\d+)\.layernorm_before", r"blocks.\1.norm1"),
    *norm_rules(r"encoder\.layer\.(\d+)\.layernorm_after", r"blocks.\1.norm2"),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma", "copy"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma", "copy"),
    *dense_rules(r"layers\.(\d+)\.attention\.q_proj", r"blocks.\1.attn.q"),
    *dense_rules(r"layers\.(\d+)\.attention\.k_proj", r"blocks.\1.attn.k"),
    *dense_rules(r"layers\.(\d+)\.attention\.v_proj", r"blocks.\1.attn.v"),
    *dense_rules(r"layers\.(\d+)\.attention\.o_proj", r"blocks.\1.attn.proj"),
    *dense_rules(r"layers\.(\d+)\.mlp\.fc1", r"blocks.\1.mlp.fc1"),
    *dense_rules(r"layers\.(\d+)\.mlp\.fc2", r"blocks.\1.mlp.fc2"),
    *norm_rules(r"layers\.(\d+)\.layernorm_before", r"blocks.\1.norm1"),
    *norm_rules(r"layers\.(\d+)\.layernorm_after", r"blocks.\1.norm2"),
    *norm_rules(r"layernorm", "norm"),
    (r"(pooler|classifier)\..*", None, "ignore"),
    (r"embeddings\.mask_token", None, "ignore"),
]

# timm VisionTransformer (global_pool="token", class token, optional LayerScale).
TIMM_VIT_RENAMES = [
    (r"cls_token", "cls_token", "copy"),
    (r"pos_embed", "pos_embed", "copy"),
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", "conv"),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", "copy"),
    *norm_rules(r"blocks\.(\d+)\.norm1", r"blocks.\1.norm1"),
    *dense_rules(r"blocks\.(\d+)\.attn\.qkv", r"blocks.\1.attn.qkv"),
    *dense_rules(r"blocks\.(\d+)\.attn\.proj", r"blocks.\1.attn.proj"),
    (r"blocks\.(\d+)\.ls1\.gamma", r"blocks.\1.ls1.gamma", "copy"),
    (r"blocks\.(\d+)\.ls2\.gamma", r"blocks.\1.ls2.gamma", "copy"),
    *norm_rules(r"blocks\.(\d+)\.norm2", r"blocks.\1.norm2"),
    *dense_rules(r"blocks\.(\d+)\.mlp\.fc1", r"blocks.\1.mlp.fc1"),
    *dense_rules(r"blocks\.(\d+)\.mlp\.fc2", r"blocks.\1.mlp.fc2"),
    *norm_rules(r"norm", "norm"),
    (r"head\..*", None, "ignore"),
    (r"head_drop\..*", None, "ignore"),
]


def _has(keys, pattern):
    return re.search(pattern, "\n".join(keys), re.M) is not None


register_layout(CheckpointLayout(
    family="vit", name="hf_vit", rules=HF_VIT_RENAMES, anchor="embeddings.patch_embeddings.projection.weight",
    detect=lambda keys: _has(keys, r"(^|\.)embeddings\.patch_embeddings\.projection\.weight$") and _has(
        keys, r"(^|\.)(encoder\.layer\.\d+\.attention\.attention\.|layers\.\d+\.attention\.q_proj)"),
    priority=10,
))
register_layout(CheckpointLayout(
    family="vit", name="timm_vit", rules=TIMM_VIT_RENAMES, anchor="patch_embed.proj.weight",
    detect=lambda keys: _has(keys, r"(^|\.)blocks\.\d+\.attn\.qkv\.weight$")
    and _has(keys, r"(^|\.)patch_embed\.proj\.weight$"),
    priority=0,
))

# transformers' ViTConfig defaults, for config.json files that omit them
_HF_VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16,
                        num_channels=3, qkv_bias=True)


def vit_kwargs_from_hf(config: dict) -> dict:
    """:class:`ViTBackbone` arguments for a Hugging Face ``ViTConfig`` (``config.json`` of ``model_type: vit``).

    Args:
        config: dict. The parsed ``config.json``.

    Returns:
        dict of constructor arguments (pooling on the normed class token, as ``last_hidden_state[:, 0]``).

    Raises:
        ConfigError: an activation other than exact GELU.
    """
    c = {**_HF_VIT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if c["hidden_act"] != "gelu":
        raise ConfigError(f"ViT config.json sets hidden_act={c['hidden_act']!r}; histokd's ViT uses exact "
                          "GELU ('gelu') only")
    hidden = int(c["hidden_size"])
    return dict(input_size=_pair(c["image_size"], "image_size"), patch_size=int(c["patch_size"]),
                embed_dim=hidden, depth=int(c["num_hidden_layers"]),
                num_heads=int(c["num_attention_heads"]), mlp_ratio=int(c["intermediate_size"]) / hidden,
                qkv_bias=bool(c["qkv_bias"]), layer_norm_eps=float(c["layer_norm_eps"]),
                in_channels=int(c["num_channels"]), pooling="token")


register_hf_model_type(HFModelType(
    model_type="vit", family="vit", layout="hf_vit", build=ViTBackbone, config_to_kwargs=vit_kwargs_from_hf,
    default_normalization=dict(normalization="tf"),  # ViTImageProcessor: mean = std = 0.5
))


# --------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------
VIT_PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
}

_FACTORIES = register_presets(
    ViTBackbone, VIT_PRESETS, default_size=224, base=dict(patch_size=16),
    summary=("ViT /16 preset {key!r}: width {embed_dim}, depth {depth}, {num_heads} heads "
             "(Dosovitskiy et al. 2021, Table 1; DeiT for tiny/small)."),
    tiny=dict(input_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
)
vit_tiny = _FACTORIES["vit_tiny"]
vit_small = _FACTORIES["vit_small"]
vit_base = _FACTORIES["vit_base"]
vit_large = _FACTORIES["vit_large"]
