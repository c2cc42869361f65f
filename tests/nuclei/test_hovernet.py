"""The Keras HoVer-Net: shapes, official layout, grouped conv, serialisation (spec §1.1)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import keras

from histokd.errors import ConfigError
from histokd.nuclei import checkpoint as ck
from histokd.nuclei.hovernet import (GroupedConv2D, HoVerNet, fuse_batchnorm, output_size,
                                     predict_maps)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import assert_config_roundtrip, assert_saved_model_roundtrip  # noqa: E402


@pytest.fixture(params=["native", "dense"])
def grouped_path(request, monkeypatch):
    """Runs a test with the native grouped kernel (skipped where missing) and with the dense fallback."""
    import histokd.nuclei.hovernet as hn

    if request.param == "native":
        if not hn.native_grouped_conv_available():
            pytest.skip("this TensorFlow build has no native grouped CPU convolution")
    else:
        monkeypatch.setattr(hn, "native_grouped_conv_available", lambda: False)
    return request.param


def test_grouped_conv_matches_per_group_convolutions(grouped_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 16)).astype("float32")
    conv = GroupedConv2D(8, 3, groups=4, use_bias=False)
    y = keras.ops.convert_to_numpy(conv(x))
    assert conv.kernel.shape == (3, 3, 4, 8)  # Keras grouped layout, in_ch / groups
    k = keras.ops.convert_to_numpy(conv.kernel)
    ref = []
    for g in range(4):  # group g: input channels 4g..4g+3 → output channels 2g, 2g+1
        c = keras.layers.Conv2D(2, 3, use_bias=False)
        c.build((None, 9, 9, 4))
        c.kernel.assign(k[..., 2 * g:2 * g + 2])
        ref.append(keras.ops.convert_to_numpy(c(x[..., 4 * g:4 * g + 4])))
    np.testing.assert_allclose(y, np.concatenate(ref, -1), atol=1e-5)
    clone = assert_config_roundtrip(conv)
    assert clone.groups == 4


def test_grouped_conv_saves_and_gets_gradients(tmp_path, grouped_path):
    inp = keras.Input((6, 6, 8))
    model = keras.Model(inp, GroupedConv2D(4, 3, groups=2, name="g")(inp))
    x = np.random.default_rng(1).standard_normal((1, 6, 6, 8)).astype("float32")
    assert_saved_model_roundtrip(model, x, tmp_path)
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = keras.ops.sum(model(x) ** 2)
    g = tape.gradient(loss, model.trainable_weights)[0]  # kernel (bias is [1])
    assert g.shape == (3, 3, 4, 4) and np.all(np.isfinite(g)) and np.any(g.numpy() != 0)


def test_grouped_conv_native_and_dense_agree_with_gradients():
    """The native grouped kernel and the block-diagonal dense fallback: same outputs and gradients."""
    import tensorflow as tf

    import histokd.nuclei.hovernet as hn

    if not hn.native_grouped_conv_available():
        pytest.skip("this TensorFlow build has no native grouped CPU convolution")
    rng = np.random.default_rng(2)
    x = tf.constant(rng.standard_normal((2, 12, 12, 128)).astype("float32"))
    conv = GroupedConv2D(32, 5, groups=4, use_bias=False)  # a HoVer-Net dense-unit convolution
    conv.build(x.shape)
    results = []
    for native in (True, False):
        hn._NATIVE_GROUPED_CONV = native
        try:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = conv(x)
                loss = tf.reduce_sum(y * y)
            gx, gk = tape.gradient(loss, [x, conv.kernel])
        finally:
            hn._NATIVE_GROUPED_CONV = None
        results.append((y.numpy(), gx.numpy(), gk.numpy()))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


@pytest.mark.parametrize("mode,size,out", [("fast", 256, 164), ("fast", 104, 12), ("original", 270, 80),
                                           ("original", 206, 16)])
def test_output_sizes(mode, size, out):
    assert output_size(mode, size) == out


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "slow"}, "mode 'slow' is unknown"),
    ({"num_types": 1}, "num_types=1 is invalid"),
    ({"mode": "fast", "input_size": 250}, "input_size=250 does not fit"),
    ({"mode": "original", "input_size": 256}, "input_size=256 does not fit"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HoVerNet(**kwargs)


@pytest.fixture(scope="module")
def fast6():
    return HoVerNet("fast", 6)


@pytest.fixture(scope="module")
def original0():
    return HoVerNet("original", 0)


@pytest.mark.parametrize("which,n_params,n_stats", [("fast6", 37_639_626, 81_536),
                                                     ("original0", 45_028_676, 69_504)])
def test_parameter_count_and_official_key_table(which, n_params, n_stats, request):
    model = request.getfixturevalue(which)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trainable == n_params
    assert model.count_params() == n_params + n_stats  # + BN running mean/var
    assert all(isinstance(l, keras.layers.BatchNormalization) and l.epsilon == 1e-5
               for l in model.layers if "bn" in l.name.split("_"))
    # the explicit table covers every weight exactly once, with OIHW → HWIO shapes
    table = ck.official_key_table(model.mode, model.num_types)
    covered = set()
    for m in table:
        var = getattr(model.get_layer(m.layer), m.slot)
        want = tuple(m.shape[i] for i in (2, 3, 1, 0)) if len(m.shape) == 4 else m.shape
        assert tuple(var.shape) == want, m
        covered.add(id(var))
    assert covered == {id(w) for w in model.weights}


def test_outputs_shapes_and_border(fast6, original0):
    assert fast6.border == 46 and fast6.output_size == 164
    assert original0.border == 95 and original0.output_size == 80
    assert set(fast6.output) == {"np", "hv", "tp"} and set(original0.output) == {"np", "hv"}
    assert tuple(fast6.output["tp"].shape) == (None, 164, 164, 6)
    assert tuple(fast6.output["hv"].shape) == (None, 164, 164, 2)
    assert tuple(original0.output["np"].shape) == (None, 80, 80, 2)
    # official branch order tp, np, hv and decoder kernel sizes 3 / 5
    assert fast6.get_layer("decoder_np_u3_conva").kernel_size == (3, 3)
    assert original0.get_layer("decoder_np_u3_dense_units_0_conv2").kernel_size == (5, 5)
    assert original0.get_layer("decoder_np_u3_dense_units_0_conv2").groups == 4


@pytest.mark.slow
def test_small_window_roundtrip_fuse_and_predict_maps(tmp_path):
    model = HoVerNet("fast", 0, input_size=104, name="hv_small")
    assert "tp" not in model.output
    assert model.get_config() == {"mode": "fast", "num_types": 0, "input_size": 104, "fused": False,
                                  "name": "hv_small"}
    rng = np.random.default_rng(2)
    # non-trivial BN statistics so that folding them is actually tested
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n))
            layer.moving_variance.assign(rng.uniform(0.5, 2, n))
            layer.gamma.assign(rng.uniform(0.8, 1.2, n))
    x = rng.integers(0, 256, (2, 104, 104, 3)).astype(np.uint8)
    loaded = assert_saved_model_roundtrip(model, x, tmp_path, atol=1e-5)  # also rebuilds from_config
    assert isinstance(loaded, HoVerNet) and loaded.get_config() == model.get_config()
    raw = model(x, training=False)
    fused = fuse_batchnorm(loaded)
    assert fused.fused and len(fused.layers) < len(model.layers)
    maps = predict_maps(fused, x, batch_size=1)
    assert maps["np"].shape == (2, 12, 12) and maps["hv"].shape == (2, 12, 12, 2)
    assert maps["np"].min() >= 0 and maps["np"].max() <= 1
    scale = float(np.asarray(raw["hv"]).std())
    np.testing.assert_allclose(maps["hv"], np.asarray(raw["hv"]), atol=1e-4 * max(scale, 1.0))
    want_np = np.asarray(keras.ops.softmax(raw["np"], -1))[..., 1]
    np.testing.assert_allclose(maps["np"], want_np, atol=1e-4)
