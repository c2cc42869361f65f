"""Tests of the batched view makers and the Downsample layer (histokd/data/views.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401
from histokd.data import augment as A
from histokd.data import views as V
from histokd.errors import ConfigError, DataError
from histokd.registry import VIEWS
from harness import assert_config_roundtrip, assert_saved_model_roundtrip

B, S, R = 4, 16, 4


def _u8(seed=0, b=B):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.integers(0, 256, (b, S, S, 3)), tf.uint8)


def _labels():
    return tf.range(B, dtype=tf.int64)


# --------------------------------------------------------------------------- Downsample


def test_downsample_is_identity_when_r_is_at_least_the_size():
    x = tf.cast(_u8(), tf.float32) / 255.0
    for r in (S, 2 * S):
        np.testing.assert_array_equal(V.Downsample(r)(x).numpy(), x.numpy())


def test_downsample_equals_resize_down_and_back_and_keeps_r_by_r_detail():
    x = tf.cast(_u8(), tf.float32) / 255.0
    y = V.Downsample(R)(x).numpy()
    small = tf.image.resize(x, [R, R], method="bilinear", antialias=True)
    np.testing.assert_allclose(y, tf.image.resize(small, [S, S]).numpy(), atol=1e-6)
    # bilinear upsampling of an R x R image: every channel is U @ small @ U^T, rank <= R
    for c in range(3):
        assert np.linalg.matrix_rank(y[0, :, :, c], tol=1e-4) <= R
    plain = V.Downsample(R, antialias=False)(x).numpy()
    ref = tf.image.resize(tf.image.resize(x, [R, R]), [S, S]).numpy()
    np.testing.assert_allclose(plain, ref, atol=1e-6)
    # uint8 in -> float32 [0, 1] out; explicit working size
    np.testing.assert_allclose(V.Downsample(R)(_u8()).numpy(), y, atol=1e-6)
    np.testing.assert_allclose(V.Downsample(R, S)(x).numpy(), y, atol=1e-6)
    assert V.Downsample(R, 2 * S)(x).shape == (B, 2 * S, 2 * S, 3)


def test_downsample_config_and_keras_roundtrip(tmp_path):
    layer = V.Downsample(R, S, antialias=False)
    clone = assert_config_roundtrip(layer)
    assert clone.size == R and clone.image_size == S and clone.antialias is False
    inp = keras.Input((S, S, 3))
    h = V.Downsample(R, name="down")(inp)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out, name="tiny_down")
    loaded = assert_saved_model_roundtrip(model, tf.cast(_u8(), tf.float32) / 255.0, tmp_path)
    assert loaded.get_layer("down").size == R
    with pytest.raises(ConfigError):
        V.Downsample(0)


def test_separable_resize_matches_tf_and_compiles_under_xla():
    x = tf.cast(_u8(), tf.float32) / 255.0
    for r, aa in ((R, True), (R, False), (6, True), (24, True)):
        np.testing.assert_allclose(
            V.separable_resize(x, (r, r), antialias=aa).numpy(),
            tf.image.resize(x, [r, r], antialias=aa).numpy(), atol=1e-5,
        )
    layer = V.Downsample(R)
    jitted = tf.function(lambda v: layer(v), jit_compile=True)(x)
    np.testing.assert_allclose(jitted.numpy(), layer(x).numpy(), atol=1e-6)


def test_fused_upsample_equals_bilinear_resize_back():
    small = tf.image.resize(tf.cast(_u8(), tf.float32) / 255.0, [R, R], antialias=True)
    fused = A.augment_batch(small, [0, 0], A.AugmentConfig.identity(), output_size=S)
    np.testing.assert_allclose(fused.numpy(), tf.image.resize(small, [S, S]).numpy(), atol=1e-5)


# --------------------------------------------------------------------------- view makers


@pytest.mark.parametrize("kind,keys", [
    ("asymmetric", {"view_a", "view_b"}),
    ("symmetric", {"view_a", "view_b"}),
    ("identity", {"image"}),
    ("eval", {"image"}),
])
def test_view_kinds_shapes_dtypes_and_ranges(kind, keys):
    vm = V.make_view_maker(kind, S, downsample=R, seed=0)
    views, labels = vm(_u8(), _labels(), seed=[1, 2])
    assert set(views) == keys
    np.testing.assert_array_equal(labels.numpy(), _labels().numpy())
    for v in views.values():
        assert v.shape == (B, S, S, 3) and v.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(v)) and float(tf.reduce_max(v)) <= 1.0


def test_asymmetric_views_without_augmentation_are_downsampled_and_original():
    x = _u8()
    views = V.make_view_maker("asymmetric", S, downsample=R, augment=False)(x)
    xf = x.numpy() / 255.0
    np.testing.assert_allclose(views["view_a"].numpy(), V.Downsample(R)(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(views["view_b"].numpy(), xf, atol=1e-6)
    sym = V.make_view_maker("symmetric", S, downsample=R, augment=False)(x)
    np.testing.assert_allclose(sym["view_a"].numpy(), sym["view_b"].numpy(), atol=1e-6)
    ev = V.make_view_maker("eval", S, downsample=R)(x, seed=[5, 5])
    np.testing.assert_allclose(ev["image"].numpy(), views["view_a"].numpy(), atol=1e-6)


def test_augmented_views_are_deterministic_per_seed_and_independent():
    vm = V.make_view_maker("asymmetric", S, seed=0)
    x = _u8()
    a = vm(x, seed=[1, 2])
    b = vm(x, seed=[1, 2])
    c = vm(x, seed=[1, 3])
    np.testing.assert_array_equal(a["view_a"].numpy(), b["view_a"].numpy())
    assert np.abs(a["view_a"].numpy() - c["view_a"].numpy()).max() > 0.05
    # no downsampling: the two views of a pair still get different draws
    assert np.abs(a["view_a"].numpy() - a["view_b"].numpy()).max() > 0.05
    # without an explicit seed every call draws a fresh one
    d, e = vm(x), vm(x)
    assert np.abs(d["view_b"].numpy() - e["view_b"].numpy()).max() > 0.05


def test_view_maker_in_dataset_map_and_tf_function():
    x, y = _u8(b=2 * B), tf.range(2 * B, dtype=tf.int64)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(B, drop_remainder=True)
    vm = V.make_view_maker("asymmetric", S, downsample=R, seed=7)
    batches = list(ds.map(vm, num_parallel_calls=tf.data.AUTOTUNE))
    assert len(batches) == 2 and batches[0][0]["view_a"].shape == (B, S, S, 3)
    np.testing.assert_array_equal(batches[1][1].numpy(), np.arange(B, 2 * B))
    # vm.map: one seed per batch, reproducible for a fixed seed, new draws every epoch
    first = [v["view_b"].numpy() for v, _ in vm.map(ds)]
    again = [v["view_b"].numpy() for v, _ in V.make_view_maker(
        "asymmetric", S, downsample=R, seed=7).map(ds)]
    np.testing.assert_array_equal(first[0], again[0])
    mapped = vm.map(ds)
    epoch1 = next(iter(mapped))[0]["view_b"].numpy()
    epoch2 = next(iter(mapped))[0]["view_b"].numpy()
    assert np.abs(epoch1 - epoch2).max() > 0.05
    # inside a tf.function
    fn = tf.function(lambda im, lab, s: vm(im, lab, seed=s))
    views, _ = fn(x[:B], y[:B], tf.constant([1, 2], tf.int64))
    np.testing.assert_allclose(views["view_a"].numpy(), vm(x[:B], seed=[1, 2])["view_a"].numpy(),
                               atol=1e-6)


def test_mask_views_geometric_only_for_masks():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    rng = np.random.default_rng(3)
    mask = tf.constant(palette[rng.integers(0, 4, (B, S, S))])
    image = _u8()
    vm = V.make_view_maker("mask", S, seed=0)
    for inputs in ((mask, image), {"mask": mask, "image": image}):
        views, _ = vm(inputs, _labels(), seed=[2, 2])
        colours = {tuple(c) for c in np.round(views["view_a"].numpy().reshape(-1, 3) * 255).astype(int)}
        assert colours <= {tuple(c) for c in palette.astype(int)}
        assert views["view_b"].shape == (B, S, S, 3)
    ds = tf.data.Dataset.from_tensor_slices(((mask, image), _labels())).batch(B)
    views, labels = next(iter(vm.map(ds)))
    assert set(views) == {"view_a", "view_b"} and labels.shape == (B,)
    with pytest.raises(ConfigError, match="downsample"):
        V.make_view_maker("mask", S, downsample=R)
    with pytest.raises(DataError):
        vm(image)


def test_view_maker_layer_training_flag_and_roundtrip(tmp_path):
    layer = V.ViewMakerLayer("asymmetric", S, downsample=R, seed=1)
    assert_config_roundtrip(layer)
    x = _u8()
    train = layer(x, training=True)
    infer = layer(x, training=False)
    plain = V.make_view_maker("asymmetric", S, downsample=R, augment=False)(x)
    for k in ("view_a", "view_b"):
        np.testing.assert_allclose(infer[k].numpy(), plain[k].numpy(), atol=1e-6)
        assert np.abs(train[k].numpy() - infer[k].numpy()).max() > 0.05
    again = layer(x, training=True)
    assert np.abs(again["view_b"].numpy() - train["view_b"].numpy()).max() > 0.05
    # augment_on: device -- usable inside an XLA-compiled training step
    jitted = tf.function(lambda v: layer(v, training=True), jit_compile=True)(x)
    assert jitted["view_a"].shape == (B, S, S, 3)

    inp = keras.Input((S, S, 3), dtype="uint8")
    views = V.ViewMakerLayer("asymmetric", S, downsample=R, seed=0, name="views")(inp)
    pooled = keras.layers.GlobalAveragePooling2D()
    out = keras.layers.Concatenate()([pooled(views["view_a"]), pooled(views["view_b"])])
    model = keras.Model(inp, out, name="tiny_views")
    loaded = assert_saved_model_roundtrip(model, x, tmp_path)
    assert loaded.get_layer("views").downsample == R


def test_registry_and_errors():
    for kind in V.KINDS:
        assert kind in VIEWS
    vm = VIEWS.get("symmetric").make(S, downsample=R, seed=3)
    assert isinstance(vm, V.ViewMaker) and vm.kind == "symmetric"
    with pytest.raises(ConfigError, match="valid kinds"):
        V.make_view_maker("pairs", S)
    with pytest.raises(ConfigError):
        V.make_view_maker("asymmetric", S, downsample=0)
    # tiles of another size are brought to the working size
    big = V.make_view_maker("eval", S)(tf.zeros([2, S + 4, S + 4, 3], tf.uint8))
    assert big["image"].shape == (2, S, S, 3)
    vm = V.make_view_maker("identity", S)
    with pytest.raises(DataError, match="batch"):
        vm(tf.zeros([S, S, 3], tf.uint8))
    with pytest.raises(DataError, match="3 channels"):
        vm(tf.zeros([2, S, S, 4], tf.uint8))
