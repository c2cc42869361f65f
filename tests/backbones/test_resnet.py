"""Tests of histokd.backbones: keras.applications encoders and the small ResNet-18."""

import json
import re

import numpy as np
import pytest

import histokd  # noqa: F401  (sets the backend)
import keras

from histokd.backbones import (
    Backbone,
    BatchNormalization,
    ImageNormalization,
    backbone_names,
    make_backbone,
)
from histokd.errors import ConfigError, RegistryError, WeightsError
from harness import (
    assert_config_roundtrip,
    assert_saved_model_roundtrip,
    assert_trains_only_trainable,
)

APPS = {  # name → (smallest input, pooled dim, stage names)
    "resnet50": (32, 2048, ["conv1_relu", "conv2_block3_out", "conv3_block4_out",
                            "conv4_block6_out", "conv5_block3_out"]),
    "mobilenet_v2": (32, 1280, ["expanded_conv_project_BN", "block_2_add", "block_5_add",
                                "block_12_add", "out_relu"]),
    "efficientnet_b0": (32, 1280, ["block1a_project_bn", "block2b_add", "block3b_add",
                                   "block5c_add", "top_activation"]),
    "xception": (71, 2048, ["block1_conv2_act", "block2_add", "block3_add", "block12_add",
                            "block14_sepconv2_act"]),
}


def _images(n, size, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


def _tiny18(**kw):
    kw = {"width": 0.125, "small_input": True, **kw}
    return make_backbone("resnet18", 32, **kw)


@pytest.fixture(scope="module")
def apps():
    keras.utils.set_random_seed(0)
    # Bump Keras' session-wide name counters so that layers Keras leaves unnamed
    # would get session-dependent names (add_3, rescaling_2) unless histokd renames them.
    keras.layers.Add(), keras.layers.Conv2D(1, 1), keras.layers.BatchNormalization()
    keras.layers.Rescaling(1.0), keras.layers.Normalization()
    return {name: make_backbone(name, size) for name, (size, _, _) in APPS.items()}


# ----------------------------------------------------------------- normalisation


@pytest.mark.parametrize("mode,reference", [
    ("caffe", lambda x: keras.applications.resnet50.preprocess_input(x * 255.0)),
    ("tf", lambda x: keras.applications.mobilenet_v2.preprocess_input(x * 255.0)),
    ("tf", lambda x: keras.applications.xception.preprocess_input(x * 255.0)),
    ("scale255", lambda x: keras.applications.efficientnet.preprocess_input(x * 255.0)),
    ("torch", lambda x: keras.applications.imagenet_utils.preprocess_input(x * 255.0, mode="torch")),
    ("none", lambda x: x),
])
def test_image_normalization_matches_keras_preprocess_input(mode, reference):
    x = _images(2, 8)
    layer = ImageNormalization(mode)
    got = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(got, np.asarray(reference(x.copy())), rtol=1e-5, atol=1e-4)
    assert_config_roundtrip(layer)


def test_image_normalization_rejects_unknown_mode_and_grey_input():
    with pytest.raises(ConfigError, match="valid modes"):
        ImageNormalization("imagenet")
    with pytest.raises(ConfigError, match="3 channels"):
        ImageNormalization("caffe")(np.zeros((1, 4, 4, 1), "float32"))


# ----------------------------------------------------------------- fused BatchNormalization


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "epsilon": 1e-5}, {"center": False, "scale": False}])
def test_fused_batchnorm_matches_keras_batchnorm(policy, kw):
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    try:
        ref, fused = keras.layers.BatchNormalization(**kw), BatchNormalization(**kw)
        x = tf.constant(np.random.default_rng(0).normal(2, 3, (4, 5, 6, 7)).astype("float32"))
        ref.build(x.shape)
        fused.build(x.shape)
        rng = np.random.default_rng(1)
        fused.set_weights([rng.random(w.shape).astype("float32") + 0.5 for w in ref.weights])
        ref.set_weights(fused.get_weights())
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            outs = [layer(x, training=True) for layer in (ref, fused)]
            losses = [tf.reduce_sum(tf.cast(o, "float32") ** 3) for o in outs]
        grads = [tape.gradient(l, [x] + layer.trainable_weights)
                 for l, layer in zip(losses, (ref, fused))]
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert outs[1].dtype == outs[0].dtype
    f32 = lambda t: np.asarray(tf.cast(t, "float32"))  # noqa: E731
    np.testing.assert_allclose(f32(outs[1]), f32(outs[0]), atol=2e-6)
    for g_ref, g_fused in zip(*grads):
        np.testing.assert_allclose(f32(g_fused), f32(g_ref), rtol=1e-4, atol=1e-3)
    for w_ref, w_fused in zip(ref.non_trainable_weights, fused.non_trainable_weights):
        np.testing.assert_allclose(f32(w_fused), f32(w_ref), rtol=1e-6, atol=1e-6)
    # inference uses the (identical) moving statistics through the Keras code
    np.testing.assert_allclose(f32(fused(x, training=False)), f32(ref(x, training=False)), atol=2e-6)


def test_fused_batchnorm_falls_back_for_synchronized_and_2d():
    bn = BatchNormalization(synchronized=True)
    x = np.random.default_rng(0).random((4, 3, 3, 5)).astype("float32")
    assert not bn._can_fuse(keras.ops.convert_to_tensor(x), True, None)
    bn2 = BatchNormalization()
    y = bn2(np.ones((4, 5), "float32") * np.arange(4)[:, None], training=True)  # 2-D: Keras path
    assert tuple(y.shape) == (4, 5)
    assert_config_roundtrip(BatchNormalization(momentum=0.9, epsilon=1e-5))


def test_stock_and_fused_backbones_share_weights_files(tmp_path):
    fused = _tiny18()
    stock = _tiny18(fused_bn=False)
    assert all(type(l) is keras.layers.BatchNormalization
               for l in stock.layers if isinstance(l, keras.layers.BatchNormalization))
    assert any(type(l) is BatchNormalization for l in fused.layers)
    path = tmp_path / "fused.weights.h5"
    fused.save_weights(path)
    again = _tiny18(fused_bn=False, weights=path)
    x = _images(4, 32)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(again(x, training=True)),
        keras.ops.convert_to_numpy(fused(x, training=True)), rtol=1e-4, atol=1e-5,
    )


# ----------------------------------------------------------------- registry / options


def test_registry_has_paper_encoders_and_resnet18():
    assert {"resnet50", "mobilenet_v2", "efficientnet_b0", "xception", "resnet18"} <= set(
        backbone_names()
    )


def test_unknown_backbone_and_option_raise_clear_errors():
    with pytest.raises(RegistryError, match="resnet50"):
        make_backbone("resnet51", 64)
    with pytest.raises(ConfigError, match="small_input"):
        make_backbone("resnet18", 64, wdith=0.5)
    with pytest.raises(ConfigError, match="alpha"):
        make_backbone("mobilenet_v2", 64, width=0.5)
    with pytest.raises(ConfigError, match="positive"):
        make_backbone("resnet18", 64, width=0)


@pytest.mark.parametrize("name,size,minimum", [
    ("xception", 64, 71), ("resnet50", 16, 32), ("resnet18", 31, 32),
    ("efficientnet_b0", (64, 20), 32), ("mobilenet_v2", 8, 32),
])
def test_too_small_input_names_the_minimum(name, size, minimum):
    with pytest.raises(ConfigError, match=f"at least {minimum}x{minimum}"):
        make_backbone(name, size)


def test_bad_input_size_type():
    with pytest.raises(ConfigError, match="input_size"):
        make_backbone("resnet18", "64")
    with pytest.raises(ConfigError, match="input_size"):
        make_backbone("resnet18", (64, 64, 64, 3))


# ----------------------------------------------------------------- parameter counts


def test_resnet50_param_count_matches_keras_applications(apps):
    reference = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(32, 32, 3), pooling="avg"
    )
    assert reference.count_params() == 23_587_712
    assert apps["resnet50"].count_params() == 23_587_712


def test_resnet18_param_count_equals_torchvision_without_fc():
    bb = make_backbone("resnet18", 32)  # width 1, 7x7 stem
    trainable = sum(int(np.prod(w.shape)) for w in bb.trainable_weights)
    # torchvision resnet18: 11,689,512 − fc (512·1000 + 1000) = 11,176,512
    assert trainable == 11_176_512
    # + BatchNorm moving mean/variance (4,800 channels × 2) kept as non-trainable weights
    assert bb.count_params() == 11_176_512 + 2 * 4_800
    assert bb.output_dim == 512


# ----------------------------------------------------------------- keras.applications encoders


@pytest.mark.parametrize("name", sorted(APPS))
def test_keras_app_output_stages_and_names(apps, name):
    size, dim, stages = APPS[name]
    bb = apps[name]
    assert isinstance(bb, Backbone) and bb.arch == name and bb.name == name
    assert bb.output_dim == dim
    assert bb.stage_names == stages
    assert bb.layers[1].name == "normalize" and isinstance(bb.layers[1], ImageNormalization)
    out = bb(_images(2, size), training=False)
    assert tuple(out.shape) == (2, dim)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(out)))
    # every layer named deterministically (no session-counter names such as add_7)
    auto = r"(add|conv2d|batch_normalization|global_average_pooling2d|input_layer)(_\d+)?"
    assert not [l.name for l in bb.layers if re.fullmatch(auto, l.name)]
    feats = bb.feature_model()(_images(1, size))
    assert list(feats) == stages + ["pooled"]
    # stages get deeper: spatial size never grows
    spatial = [feats[n].shape[1] for n in stages]
    assert spatial == sorted(spatial, reverse=True)


def test_xception_unnamed_keras_layers_get_block_names(apps):
    names = [l.name for l in apps["xception"].layers]
    for block in (2, 3, 4, 13):
        assert {f"block{block}_shortcut_conv", f"block{block}_shortcut_bn",
                f"block{block}_add"} <= set(names)
    middle = [n for n in names if re.fullmatch(r"block([5-9]|1[0-2])_add", n)]
    assert middle == [f"block{b}_add" for b in range(5, 13)]


def test_layer_names_do_not_depend_on_session_history(apps):
    # the fixture bumped Keras' counters first, so these names are histokd's, not Keras'
    names = [l.name for l in apps["efficientnet_b0"].layers]
    assert names[:4] == ["image", "normalize", "rescaling", "normalization"]
    paths = [w.path for w in apps["efficientnet_b0"].weights]
    assert "normalization/mean" in paths
    assert "block2_shortcut_conv/kernel" in [w.path for w in apps["xception"].weights]


def test_xception_saved_model_roundtrip(apps, tmp_path):
    loaded = assert_saved_model_roundtrip(apps["xception"], _images(2, 71), tmp_path, atol=1e-5)
    assert isinstance(loaded, Backbone)
    assert loaded.stage_names == APPS["xception"][2] and loaded.arch == "xception"
    assert [l.name for l in loaded.layers] == [l.name for l in apps["xception"].layers]
    assert [type(l) for l in loaded.layers] == [type(l) for l in apps["xception"].layers]
    assert type(loaded.get_layer("block2_shortcut_bn")) is BatchNormalization


def test_keras_app_weights_file_roundtrip_and_resize(apps, tmp_path):
    path = tmp_path / "mnv2.weights.h5"
    apps["mobilenet_v2"].save_weights(path)
    bigger = make_backbone("mobilenet_v2", 48, weights=str(path))  # conv weights are size-free
    for a, b in zip(apps["mobilenet_v2"].weights, bigger.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_wrong_architecture_weights_raise_weights_error(apps, tmp_path):
    path = tmp_path / "mnv2.weights.h5"
    apps["mobilenet_v2"].save_weights(path)
    with pytest.raises(WeightsError, match=r"mnv2\.weights\.h5.*resnet18"):
        make_backbone("resnet18", 32, weights=str(path))


def test_imagenet_download_failure_is_a_weights_error(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError, match="needs internet access"):
        make_backbone("resnet50", 32, weights="imagenet")


# ----------------------------------------------------------------- ResNet-18


def test_resnet18_width_and_stems():
    small = _tiny18()
    assert small.output_dim == 64  # round(512 * 0.125)
    names = {l.name for l in small.layers}
    assert "pool1_pool" not in names
    assert small.get_layer("conv1_conv").kernel_size == (3, 3)
    assert small.get_layer("conv1_conv").strides == (1, 1)
    feats = small.feature_model()(_images(1, 32))
    assert [feats[n].shape[1] for n in small.stage_names] == [32, 32, 16, 8, 4]

    big = make_backbone("resnet18", 64, width=0.125)
    assert big.get_layer("conv1_conv").kernel_size == (7, 7)
    assert big.get_layer("conv1_conv").strides == (2, 2)
    assert "pool1_pool" in {l.name for l in big.layers}
    feats = big.feature_model()(_images(1, 64))
    assert [feats[n].shape[1] for n in big.stage_names] == [32, 16, 8, 4, 2]
    assert big.stage_names == ["conv1_relu", "conv2_block2_out", "conv3_block2_out",
                               "conv4_block2_out", "conv5_block2_out"]


def test_resnet18_is_deterministic_in_names():
    a, b = _tiny18(), _tiny18()
    assert [l.name for l in a.layers] == [l.name for l in b.layers]
    assert [w.path for w in a.weights] == [w.path for w in b.weights]
    assert len(set(l.name for l in a.layers)) == len(a.layers)


def test_resnet18_saved_model_and_config_roundtrip(tmp_path):
    bb = _tiny18()
    bb(_images(4, 32), training=True)  # move BN statistics away from their init
    loaded = assert_saved_model_roundtrip(bb, _images(2, 32, seed=1), tmp_path)
    assert loaded.stage_names == bb.stage_names and loaded.output_dim == bb.output_dim
    as_json = lambda m: json.dumps(m.get_config(), sort_keys=True, default=str)  # noqa: E731
    assert as_json(loaded) == as_json(bb)  # lists vs tuples aside, the same config


def test_clone_model_keeps_stage_names_and_arch(apps):
    # JointEmbedding clones encoder_a for independent branches with keras.models.clone_model
    for bb in (_tiny18(), apps["resnet50"]):
        clone = keras.models.clone_model(bb)
        assert isinstance(clone, Backbone)
        assert clone.stage_names == bb.stage_names and clone.arch == bb.arch
        assert type(clone.layers[2]) is type(bb.layers[2])


def test_resnet18_trains_only_trainable():
    bb = _tiny18()
    assert_trains_only_trainable(bb, _images(4, 32))


def test_resnet18_weights_file(tmp_path):
    bb = _tiny18()
    path = tmp_path / "r18.weights.h5"
    bb.save_weights(path)
    again = _tiny18(weights=str(path))
    x = _images(2, 32)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(bb(x, training=False)),
        keras.ops.convert_to_numpy(again(x, training=False)),
    )
    keras_path = tmp_path / "r18.keras"
    bb.save(keras_path)
    _tiny18(weights=keras_path)  # a whole saved backbone works as a weights file too

    with pytest.raises(WeightsError, match=r"r18\.weights\.h5.*width=0\.25"):
        _tiny18(width=0.25, weights=str(path))
    with pytest.raises(WeightsError, match="does not exist"):
        _tiny18(weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(WeightsError, match="unsupported type"):
        (tmp_path / "r18.pth").write_bytes(b"x")
        _tiny18(weights=str(tmp_path / "r18.pth"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="junk.h5"):
        _tiny18(weights=str(tmp_path / "junk.h5"))
    with pytest.raises(WeightsError, match="ImageNet"):
        _tiny18(weights="imagenet")


def test_resnet18_matches_a_torch_resnet18_with_copied_weights():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    bb = make_backbone("resnet18", 32, width=0.125)  # 7x7 stem + max-pool, odd sizes inside
    bb(_images(4, 32), training=True)  # non-trivial BN statistics

    def conv_bn(name, cin, cout, k, s):
        conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        bn = nn.BatchNorm2d(cout, eps=1e-5)
        kernel = keras.ops.convert_to_numpy(bb.get_layer(f"{name}_conv").kernel)
        conv.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        layer = bb.get_layer(f"{name}_bn")
        for attr, w in (("weight", layer.gamma), ("bias", layer.beta),
                        ("running_mean", layer.moving_mean), ("running_var", layer.moving_variance)):
            getattr(bn, attr).data = torch.from_numpy(keras.ops.convert_to_numpy(w).copy())
        return nn.Sequential(conv, bn)

    class Block(nn.Module):
        def __init__(self, name, cin, cout, s):
            super().__init__()
            self.a = conv_bn(f"{name}_1", cin, cout, 3, s)
            self.b = conv_bn(f"{name}_2", cout, cout, 3, 1)
            self.sc = conv_bn(f"{name}_0", cin, cout, 1, s) if (s != 1 or cin != cout) else nn.Identity()

        def forward(self, x):
            return torch.relu(self.sc(x) + self.b(torch.relu(self.a(x))))

    w = [8, 16, 32, 64]
    layers = [conv_bn("conv1", 3, 8, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 8
    for s, cout in enumerate(w, start=2):
        layers += [Block(f"conv{s}_block1", cin, cout, 1 if s == 2 else 2),
                   Block(f"conv{s}_block2", cout, cout, 1)]
        cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()

    x = _images(2, 32, seed=3)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    xt = torch.from_numpy(((x - mean) / std).astype("float32").transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = net(xt).numpy()
    got = keras.ops.convert_to_numpy(bb(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

