"""ViTBackbone: shapes, stage outputs, position-embedding resizing, serialisation, HF parity."""

import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401
from keras import ops

from histokd.backbones import Backbone
from histokd.backbones.vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TokensToMap,
    ViTBackbone,
    bicubic_resize_matrix,
    resize_position_grid,
)
from histokd.errors import ConfigError
from histokd.registry import BACKBONES
from harness import assert_config_roundtrip, assert_saved_model_roundtrip, assert_trains_only_trainable

TINY = dict(input_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0)


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype("float32")


def test_pooled_and_stage_shapes():
    x = _images((2, 32, 32, 3))
    enc = ViTBackbone(**TINY)
    assert isinstance(enc, Backbone)
    assert tuple(enc(x).shape) == (2, 24)
    assert enc.output_dim == 24 and enc.stage_names == ["block_1", "block_2"]
    assert enc.input_size == (32, 32) and enc.stage_channels == [24, 24]
    out = enc.stage_model()(x)
    assert set(out) == {"pooled", "block_1", "block_2"}
    assert tuple(out["block_2"].shape) == (2, 17, 24)
    maps = TokensToMap(8)([out["block_1"], x])
    assert tuple(maps.shape) == (2, 4, 4, 24)
    np.testing.assert_allclose(ops.convert_to_numpy(maps)[:, 0, 1], ops.convert_to_numpy(out["block_1"])[:, 2])


def test_stage_model_shares_weights_and_matches():
    x = _images((2, 32, 32, 3))
    enc = ViTBackbone(**TINY)
    stages = enc.stage_model()
    out = stages(x)
    np.testing.assert_allclose(ops.convert_to_numpy(out["pooled"]), ops.convert_to_numpy(enc(x)), atol=1e-6)
    # the class token of the last block, after the final norm, is the pooled output
    normed = enc.get_layer("norm")(out["block_2"])
    np.testing.assert_allclose(ops.convert_to_numpy(normed[:, 0]), ops.convert_to_numpy(out["pooled"]), atol=1e-5)
    assert len(stages.weights) == len(enc.weights)


def test_mean_pooling_is_mean_of_normed_patch_tokens():
    x = _images((2, 32, 32, 3))
    enc = ViTBackbone(**TINY, pooling="mean")
    out = enc.stage_model()(x)
    normed = ops.convert_to_numpy(enc.get_layer("norm")(out["block_2"]))
    np.testing.assert_allclose(ops.convert_to_numpy(out["pooled"]), normed[:, 1:].mean(1), atol=1e-5)


def test_normalisation_inside_equals_prenormalised_input():
    x = _images((2, 32, 32, 3))
    with_norm = ViTBackbone(**TINY)
    without = ViTBackbone(**TINY, normalization="none")
    without.set_weights(with_norm.get_weights())
    pre = (x - np.array(IMAGENET_MEAN, "float32")) / np.array(IMAGENET_STD, "float32")
    np.testing.assert_allclose(ops.convert_to_numpy(with_norm(x)), ops.convert_to_numpy(without(pre)), atol=1e-5)


def test_other_sizes_static_and_dynamic_shapes_agree():
    enc = ViTBackbone(**TINY, dynamic_size=True)
    assert enc.input_size == (None, None)
    x = _images((2, 48, 40, 3))
    eager = ops.convert_to_numpy(enc(x))
    fn = tf.function(lambda a: enc(a), input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32)])
    np.testing.assert_allclose(fn(x).numpy(), eager, atol=1e-5)
    # the configured size takes the table unchanged (identity resize)
    assert np.allclose(bicubic_resize_matrix(4, 4), np.eye(4))


@pytest.mark.parametrize("n_in,n_out", [(4, 6), (14, 16), (7, 3), (5, 5)])
def test_bicubic_matrix_matches_torch_interpolate(n_in, n_out):
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(1).standard_normal((n_in, n_in + 1, 5)).astype("float32")
    ours = resize_position_grid(grid, (n_out, n_out + 2))
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid.transpose(2, 0, 1))[None],
                                          size=(n_out, n_out + 2), mode="bicubic", align_corners=False)
    np.testing.assert_allclose(ours, ref[0].numpy().transpose(1, 2, 0), atol=1e-5)


def test_config_and_keras_roundtrip(tmp_path):
    enc = ViTBackbone(**TINY, layer_scale_init=0.1, pooling="mean", name="vit_rt")
    clone = assert_config_roundtrip(enc)
    assert isinstance(clone, ViTBackbone)
    loaded = assert_saved_model_roundtrip(enc, _images((2, 32, 32, 3)), tmp_path)
    assert isinstance(loaded, ViTBackbone) and loaded.stage_names == enc.stage_names
    custom = ViTBackbone(**TINY, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], dynamic_size=True,
                         name="vit_rt_custom")
    assert_saved_model_roundtrip(custom, _images((1, 40, 24, 3)), tmp_path)


def test_one_step_trains_only_trainable_weights():
    enc = ViTBackbone(**TINY, layer_scale_init=0.5, drop_path_rate=0.1)
    assert_trains_only_trainable(enc, _images((2, 32, 32, 3)))


def test_presets_registered_with_paper_sizes():
    for name in ("vit_tiny", "vit_small", "vit_base", "vit_large"):
        assert name in BACKBONES
    enc = BACKBONES.get("vit_tiny")(input_size=224)
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.patch_size) == (192, 12, 3, 16)
    # timm vit_tiny_patch16_224 has 5,717,416 parameters of which 193,000 are the 1000-class head
    assert enc.count_params() == 5_717_416 - 193_000
    assert enc.arch == "vit_tiny" and enc.name == "vit_tiny"
    small = BACKBONES.get("vit_small")(input_size=None, depth=1, model_name="enc")
    assert small.input_size == (None, None) and small.name == "enc" and small.output_dim == 384
    with pytest.raises(ConfigError, match="unknown option.*width"):
        BACKBONES.get("vit_small")(input_size=224, width=0.5)


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        ViTBackbone(input_size=32, patch_size=8, embed_dim=25, depth=1, num_heads=2)
    with pytest.raises(ConfigError, match="pooling"):
        ViTBackbone(**TINY, pooling="max")
    with pytest.raises(ConfigError, match="both mean and std"):
        ViTBackbone(**TINY, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="at least one patch"):
        ViTBackbone(input_size=4, patch_size=8, embed_dim=8, depth=1, num_heads=2)


# ------------------------------------------------------------------------------------------
# numerical parity with Hugging Face transformers ViTModel
# ------------------------------------------------------------------------------------------
def test_parity_with_transformers_vit_at_several_sizes():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from histokd.backbones.convert import load_pretrained

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=96, image_size=32, patch_size=8)
    hf = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # make the norms and biases non-trivial
        for name, p in hf.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    state = {k: v.numpy() for k, v in hf.state_dict().items()}
    ours = ViTBackbone(input_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2,
                       layer_norm_eps=1e-12, normalization="none", dynamic_size=True)
    report = load_pretrained(ours, state)
    assert report["layout"] == "hf_vit" and report["loaded"] == len(ours.canonical_weights())
    # 32: stored grid; 48 and 40×56: the position table must be resized bicubically
    for size in [(32, 32), (48, 48), (40, 56)]:
        x = np.random.default_rng(sum(size)).standard_normal((2, 3) + size).astype("float32")
        with torch.no_grad():
            ref = hf(torch.from_numpy(x), interpolate_pos_encoding=True, output_hidden_states=True)
        out = ours.stage_model()(x.transpose(0, 2, 3, 1))
        pooled_ref = ref.last_hidden_state[:, 0].numpy()
        err = np.abs(ops.convert_to_numpy(out["pooled"]) - pooled_ref).max() / np.abs(pooled_ref).max()
        assert err <= 1e-4, (size, err)
        for i in range(2):
            r = ref.hidden_states[i + 1].numpy()
            e = np.abs(ops.convert_to_numpy(out[f"block_{i + 1}"]) - r).max() / np.abs(r).max()
            assert e <= 1e-4, (size, i, e)


# ------------------------------------------------------------------------------------------
# the fast building blocks compute the textbook functions (values and gradients)
# ------------------------------------------------------------------------------------------
def test_layer_norm_matches_keras_layer_normalization_and_its_gradient():
    import keras

    from histokd.layers.attention import LayerNorm

    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(2.0, 3.0, (2, 5, 16)).astype("float32"))
    ours, ref = LayerNorm(epsilon=1e-6), keras.layers.LayerNormalization(epsilon=1e-6)
    ours.build(x.shape)
    ref.build(x.shape)
    for layer in (ours, ref):
        layer.gamma.assign(rng.uniform(0.5, 1.5, 16).astype("float32"))
        layer.beta.assign(rng.normal(0.0, 0.1, 16).astype("float32"))
    ref.gamma.assign(ours.gamma)
    ref.beta.assign(ours.beta)
    w = tf.constant(rng.standard_normal((2, 5, 16)).astype("float32"))
    grads = []
    for layer in (ours, ref):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * w)
        grads.append((y, *tape.gradient(loss, [x, layer.gamma, layer.beta])))
    for a, b in zip(*grads):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-4, atol=1e-5)
    clone = LayerNorm.from_config(ours.get_config())
    assert isinstance(clone, LayerNorm) and clone.epsilon == 1e-6


def test_mlp_and_attention_match_reference_formulas():
    import math

    from histokd.layers.attention import MLP, MultiHeadSelfAttention

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 7, 12)).astype("float32")
    mlp = MLP(20)
    mlp.build(x.shape)
    for v in (mlp.fc1.bias, mlp.fc2.bias):
        v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
    h = x @ ops.convert_to_numpy(mlp.fc1.kernel) + ops.convert_to_numpy(mlp.fc1.bias)
    h = ops.convert_to_numpy(ops.gelu(h, approximate=False))
    ref = h @ ops.convert_to_numpy(mlp.fc2.kernel) + ops.convert_to_numpy(mlp.fc2.bias)
    np.testing.assert_allclose(ops.convert_to_numpy(mlp(x)), ref, rtol=1e-5, atol=1e-5)

    attn = MultiHeadSelfAttention(3)  # head_dim 4: the query scale 1/2 is folded into the weights
    attn.build(x.shape)
    attn.qkv.bias.assign(rng.normal(0.0, 0.3, 36).astype("float32"))
    qkv = x @ ops.convert_to_numpy(attn.qkv.kernel) + ops.convert_to_numpy(attn.qkv.bias)
    q, k, v = (qkv[..., i * 12:(i + 1) * 12].reshape(2, 7, 3, 4).transpose(0, 2, 1, 3) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(4)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ v).transpose(0, 2, 1, 3).reshape(2, 7, 12)
    ref = out @ ops.convert_to_numpy(attn.proj.kernel) + ops.convert_to_numpy(attn.proj.bias)
    np.testing.assert_allclose(ops.convert_to_numpy(attn(x)), ref, rtol=1e-5, atol=1e-5)
