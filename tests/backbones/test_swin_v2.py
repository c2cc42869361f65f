"""SwinV2Backbone: stage maps, V2 attention pieces, serialisation, Hugging Face parity."""

import math

import numpy as np
import pytest

import histokd  # noqa: F401
import keras
from keras import ops

from histokd.backbones import Backbone
from histokd.backbones.swin_v2 import (
    SwinV2Backbone,
    SwinV2WindowAttention,
    default_window_size,
    relative_coords_table,
    relative_position_index,
    shifted_window_mask,
)
from histokd.errors import ConfigError
from histokd.registry import BACKBONES
from harness import assert_config_roundtrip, assert_saved_model_roundtrip, assert_trains_only_trainable

TINY = dict(input_size=32, embed_dim=8, depths=[2, 2], num_heads=[1, 2], window_size=4, drop_path_rate=0.0)


def _images(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype("float32")


def test_pooled_and_stage_map_shapes():
    enc = SwinV2Backbone(**TINY)
    assert isinstance(enc, Backbone)
    x = _images((2, 32, 32, 3))
    assert tuple(enc(x).shape) == (2, 16)
    assert enc.stage_names == ["stage_1", "stage_2"] and enc.stage_channels == [8, 16]
    out = enc.stage_model()(x)
    assert tuple(out["stage_1"].shape) == (2, 8, 8, 8)
    assert tuple(out["stage_2"].shape) == (2, 4, 4, 16)
    # pooled = average of the final-LayerNorm'ed last stage map
    normed = ops.convert_to_numpy(enc.get_layer("norm")(out["stage_2"]))
    np.testing.assert_allclose(ops.convert_to_numpy(out["pooled"]), normed.mean((1, 2)), atol=1e-5)


def test_window_shrinks_to_small_maps_and_shift_alternates():
    enc = SwinV2Backbone(input_size=32, embed_dim=8, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4)
    s1, s3 = enc.get_layer("stage_1"), enc.get_layer("stage_3")
    assert [b.shift_size for b in s1.blocks] == [0, 2] and s1.effective_window == 4
    # stage 3 sees a 2×2 map: window becomes 2 and the shift is switched off
    assert s3.effective_window == 2 and [b.shift_size for b in s3.blocks] == [0, 0]
    assert default_window_size(224) == 7 and default_window_size(256) == 8 and default_window_size(448) == 7


def test_shifted_window_mask_blocks_exactly_cross_region_pairs():
    h = w = 8
    win, shift = 4, 2
    mask = shifted_window_mask(h, w, win, shift)
    assert mask.shape == ((h // win) * (w // win), win * win, win * win)
    # brute force: a token at (i, j) of the rolled map came from region (band(i), band(j))
    band = lambda i: 0 if i < h - win else (1 if i < h - shift else 2)  # noqa: E731
    for widx in range(mask.shape[0]):
        wi, wj = divmod(widx, w // win)
        coords = [(wi * win + a, wj * win + b) for a in range(win) for b in range(win)]
        for p, (i1, j1) in enumerate(coords):
            for q, (i2, j2) in enumerate(coords):
                same = band(i1) == band(i2) and band(j1) == band(j2)
                assert mask[widx, p, q] == (0.0 if same else -100.0)
    assert np.all(mask[0] == 0.0)  # the top-left window is one region


def test_log_spaced_coordinates_and_index():
    table = relative_coords_table(8)
    assert table.shape == (15 * 15, 2)
    # Δ = w - 1 is normalised to 8, then log2(1 + 8) / log2(8)
    assert np.isclose(table.max(), math.log2(9) / 3.0) and np.isclose(table.min(), -math.log2(9) / 3.0)
    # with a pretrained window of 4, offsets beyond ±3 extrapolate past the trained range
    assert np.isclose(relative_coords_table(8, 4).max(), math.log2(1 + 7 / 3 * 8) / 3.0)
    idx = relative_position_index(3)
    assert idx.shape == (9, 9) and idx[0, 0] == idx[4, 4] == 12 and idx.max() == 24 and idx.min() == 0


def test_logit_scale_is_clamped_at_log_100():
    x = keras.random.normal((2, 16, 8), seed=1)
    attn = SwinV2WindowAttention(2, 4)
    attn.build(x.shape)
    attn.logit_scale.assign(np.full((2, 1, 1), 10.0, "float32"))
    high = ops.convert_to_numpy(attn(x))
    attn.logit_scale.assign(np.full((2, 1, 1), math.log(100.0), "float32"))
    np.testing.assert_allclose(high, ops.convert_to_numpy(attn(x)), atol=1e-6)
    attn.logit_scale.assign(np.full((2, 1, 1), 1.0, "float32"))
    assert not np.allclose(high, ops.convert_to_numpy(attn(x)), atol=1e-4)


def test_dynamic_size_pads_to_whole_windows():
    enc = SwinV2Backbone(**TINY, dynamic_size=True)
    out = enc.stage_model()(_images((1, 44, 36, 3)))
    assert tuple(out["stage_1"].shape) == (1, 11, 9, 8) and tuple(out["stage_2"].shape) == (1, 6, 5, 16)
    assert np.all(np.isfinite(ops.convert_to_numpy(out["pooled"])))


def test_config_and_keras_roundtrip(tmp_path):
    enc = SwinV2Backbone(**TINY, pretrained_window_size=[2, 3], name="swin_rt")
    clone = assert_config_roundtrip(enc)
    assert isinstance(clone, SwinV2Backbone)
    loaded = assert_saved_model_roundtrip(enc, _images((2, 32, 32, 3)), tmp_path)
    assert isinstance(loaded, SwinV2Backbone) and loaded.stage_names == ["stage_1", "stage_2"]


def test_one_step_trains_only_trainable_weights():
    enc = SwinV2Backbone(**{**TINY, "drop_path_rate": 0.1})
    assert_trains_only_trainable(enc, _images((2, 32, 32, 3)))


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="divisible"):
        SwinV2Backbone(input_size=32, embed_dim=10, depths=[1, 1], num_heads=[3, 3], window_size=4)
    with pytest.raises(ConfigError, match="one num_heads entry per stage"):
        SwinV2Backbone(input_size=32, embed_dim=8, depths=[1, 1], num_heads=[1], window_size=4)
    with pytest.raises(ConfigError, match="too small"):
        SwinV2Backbone(input_size=16, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])


def test_presets_match_transformers_parameter_counts():
    transformers = pytest.importorskip("transformers")
    for name in ("swinv2_tiny", "swinv2_small", "swinv2_base"):
        assert name in BACKBONES
    enc = BACKBONES.get("swinv2_tiny")(input_size=224)
    assert enc.window_size == 7 and enc.output_dim == 768
    hf = transformers.Swinv2Model(transformers.Swinv2Config(
        image_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
        add_pooling_layer=False)
    assert enc.count_params() == sum(p.numel() for p in hf.parameters())


# ------------------------------------------------------------------------------------------
# numerical parity with Hugging Face transformers Swinv2Model
# ------------------------------------------------------------------------------------------
def _hf_swinv2(transformers, torch, image, window, pretrained=0, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Swinv2Config(image_size=image, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4],
                                    window_size=window, pretrained_window_sizes=[pretrained] * 3,
                                    drop_path_rate=0.0)
    return transformers.Swinv2Model(cfg).eval()


def _perturb(torch, model):
    with torch.no_grad():  # make logit scales, norms and biases non-trivial
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.uniform_(1.0, 5.0)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)


def _compare(torch, hf, ours, size, seed=0):
    x = np.random.default_rng(seed).standard_normal((2, 3) + size).astype("float32")
    with torch.no_grad():
        pooled = hf(torch.from_numpy(x)).pooler_output.numpy()
        emb, dims = hf.embeddings(torch.from_numpy(x))
        enc = hf.encoder(emb, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    out = ours.stage_model()(x.transpose(0, 2, 3, 1))
    err = np.abs(ops.convert_to_numpy(out["pooled"]) - pooled).max() / np.abs(pooled).max()
    assert err <= 1e-4, (size, "pooled", err)
    for i in range(3):
        ref = enc.reshaped_hidden_states[i + 1].numpy().transpose(0, 2, 3, 1)
        e = np.abs(ops.convert_to_numpy(out[f"stage_{i + 1}"]) - ref).max() / np.abs(ref).max()
        assert e <= 1e-4, (size, f"stage_{i + 1}", e)


def test_parity_with_transformers_swinv2_at_several_sizes():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from histokd.backbones.convert import load_pretrained

    hf = _hf_swinv2(transformers, torch, 64, 4)
    _perturb(torch, hf)
    ours = SwinV2Backbone(input_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4,
                          drop_path_rate=0.0, normalization="none", dynamic_size=True)
    report = load_pretrained(ours, {k: v.numpy() for k, v in hf.state_dict().items()})
    assert report["layout"] == "hf_swinv2" and report["loaded"] == len(ours.canonical_weights())
    # configured size, a larger square size (more windows) and a size that needs padding
    for size in [(64, 64), (96, 96), (72, 88)]:
        _compare(torch, hf, ours, size)


def test_parity_after_moving_to_a_larger_window():
    """Weights trained with window 4 used at window 8: the CPB MLP evaluates the new offsets."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from histokd.backbones.convert import load_pretrained

    trained = _hf_swinv2(transformers, torch, 32, 4)
    _perturb(torch, trained)
    state = trained.state_dict()
    bigger = _hf_swinv2(transformers, torch, 64, 8, pretrained=4, seed=1)
    bigger.load_state_dict(state)
    ours = SwinV2Backbone(input_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=8,
                          pretrained_window_size=4, drop_path_rate=0.0, normalization="none")
    load_pretrained(ours, {k: v.numpy() for k, v in state.items()})
    _compare(torch, bigger, ours, (64, 64))


def test_patch_merging_concatenates_2x2_neighbourhoods_in_reference_order():
    from histokd.backbones.swin_v2 import SwinV2PatchMerging

    x = np.random.default_rng(5).standard_normal((2, 6, 10, 4)).astype("float32")
    merge = SwinV2PatchMerging()
    merge.build(x.shape)
    cat = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    red = cat @ ops.convert_to_numpy(merge.reduction.kernel)
    ref = (red - red.mean(-1, keepdims=True)) / np.sqrt(red.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(merge(x)), ref, rtol=1e-4, atol=1e-4)
