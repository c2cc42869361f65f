"""Tests of the fused Table S1 augmentations (histokd/data/augment.py)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401
from histokd.data import augment as A
from histokd.errors import ConfigError
from harness import assert_config_roundtrip, assert_saved_model_roundtrip

S = 16
OFF = A.AugmentConfig.identity()


def _img(b=4, s=S, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(0.0, 1.0, (b, s, s, 3)), tf.float32)


def _u(b=1, **cols):
    """Uniforms with every gate off (1.0) and the named columns set."""
    u = np.full((b, A.N_UNIFORMS), 0.5, np.float32)
    for gate in ("flip", "crop", "rot", "jitter", "solarize", "noise"):
        u[:, A._U[gate]] = 0.999
    for k, v in cols.items():
        u[:, A._U[k]] = v
    return tf.constant(u)


# --------------------------------------------------------------------------- basics


def test_shapes_dtypes_and_range_for_float_and_uint8():
    # uint8 inputs and output_size (upsampling) are also covered by tests/data/test_views.py
    x = _img()
    y = A.augment_batch(x, [1, 2])
    assert y.shape == x.shape and y.dtype == tf.float32
    y8 = A.augment_batch(tf.cast(x * 255, tf.uint8), [1, 2], jit=False)
    big = A.augment_batch(x, [1, 2], output_size=24, jit=False)
    assert y8.dtype == tf.float32 and big.shape == (4, 24, 24, 3)
    for v in (y, y8, big):
        assert float(tf.reduce_min(v)) >= 0.0 and float(tf.reduce_max(v)) <= 1.0


def test_deterministic_per_seed_and_independent_per_image_and_view():
    x = tf.repeat(_img(1), 4, axis=0)
    a = A.augment_batch(x, [3, 4]).numpy()
    b = A.augment_batch(x, [3, 4]).numpy()
    np.testing.assert_array_equal(a, b)
    c = A.augment_batch(x, [3, 5]).numpy()
    assert np.abs(a - c).max() > 0.05
    # identical inputs inside one batch get different augmentations
    for i in range(1, 4):
        assert np.abs(a[0] - a[i]).max() > 0.01


def test_identity_config_reproduces_input_exactly():
    x = _img()
    np.testing.assert_allclose(A.augment_batch(x, [0, 1], OFF).numpy(), x.numpy(), atol=1e-6)
    x8 = tf.cast(x * 255, tf.uint8)
    np.testing.assert_allclose(
        A.augment_batch(x8, [0, 1], OFF, jit=False).numpy(), x8.numpy() / 255.0, atol=1e-6
    )


def test_config_validation_and_dict_roundtrip():
    cfg = A.AugmentConfig(p_rotate=0.5, crop_scale=[0.5, 1.0])
    assert A.AugmentConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(A.AugmentConfig.from_dict(cfg.to_dict()))
    with pytest.raises(ConfigError, match="valid keys"):
        A.resolve_config({"p_rotation": 0.4})
    with pytest.raises(ConfigError, match="probability"):
        A.AugmentConfig(p_noise=1.5)
    with pytest.raises(ConfigError, match="crop_scale"):
        A.AugmentConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(ConfigError):
        A.augment_batch(tf.zeros([8, 8, 3]), [0, 0])


# --------------------------------------------------------------------------- probabilities


def _fraction_changed(cfg, x, ref, seed=(5, 6), tol=1e-4):
    # the gates are the same code with and without XLA (jit=False avoids compiling
    # XLA for yet another shape; the two paths are compared elsewhere)
    y = A.augment_batch(x, seed, cfg, jit=False).numpy()
    return float(np.mean(np.abs(y - ref).reshape(len(y), -1).max(axis=1) > tol))


def test_probabilities_respected_statistically():
    n = 2000
    const = tf.fill([n, 4, 4, 3], 0.8)
    # solarise: 0.8 -> 0.2 on the selected images
    frac = _fraction_changed(OFF.replace(p_solarize=0.3), const, 0.8)
    assert abs(frac - 0.3) < 0.05, frac
    # noise on a mid-grey image
    frac = _fraction_changed(OFF.replace(p_noise=0.3), tf.fill([n, 4, 4, 3], 0.5), 0.5)
    assert abs(frac - 0.3) < 0.05, frac
    # rotation of an asymmetric image
    x = tf.repeat(_img(1, 4), n, axis=0)
    frac = _fraction_changed(OFF.replace(p_rotate=0.4), x, x.numpy())
    assert abs(frac - 0.4) < 0.05, frac
    # jitter always on
    frac = _fraction_changed(OFF.replace(p_jitter=1.0), x, x.numpy())
    assert frac > 0.99
    # flips: each axis with probability 0.5 when p_flip = 1
    y = A.augment_batch(x, [7, 8], OFF.replace(p_flip=1.0), jit=False).numpy()
    lr = np.all(np.abs(y[:, :, ::-1] - x.numpy()) < 1e-6, axis=(1, 2, 3))
    ud = np.all(np.abs(y[:, ::-1] - x.numpy()) < 1e-6, axis=(1, 2, 3))
    both = np.all(np.abs(y[:, ::-1, ::-1] - x.numpy()) < 1e-6, axis=(1, 2, 3))
    none = np.all(np.abs(y - x.numpy()) < 1e-6, axis=(1, 2, 3))
    assert np.all(lr | ud | both | none)
    for f in (lr, ud, both, none):
        assert abs(f.mean() - 0.25) < 0.05


def test_noise_statistics_match_config():
    for dist in ("irwin_hall", "normal"):
        cfg = OFF.replace(p_noise=1.0, noise_std=0.05, noise_dist=dist)
        y = A.augment_batch(tf.fill([4, S, S, 3], 0.5), [1, 1], cfg).numpy() - 0.5
        assert abs(y.mean()) < 3e-3 and abs(y.std() - 0.05) < 3e-3, (dist, y.mean(), y.std())


# --------------------------------------------------------------------------- geometry


def test_pure_flips_equal_tf_image_flips():
    x = _img()
    cases = {
        (0.0, 0.9): tf.image.flip_left_right(x),
        (0.9, 0.0): tf.image.flip_up_down(x),
        (0.0, 0.0): tf.image.flip_up_down(tf.image.flip_left_right(x)),
    }
    for (lr, ud), ref in cases.items():
        u = _u(4, flip=0.0, flip_lr=lr, flip_ud=ud)
        for jit in (True, False):
            y = A.apply_augmentation(x, u, [0, 0], OFF.replace(p_flip=1.0), jit=jit)
            np.testing.assert_allclose(y.numpy(), ref.numpy(), atol=1e-6)


def test_quarter_turn_equals_rot90():
    x = _img()
    u = _u(4, rot=0.0, rot_angle=0.75)  # +90 degrees with max_rotation = 180
    y = A.apply_augmentation(x, u, [0, 0], OFF.replace(p_rotate=1.0)).numpy()
    ok = [np.abs(y - tf.image.rot90(x, k).numpy()).max() < 1e-5 for k in (1, 3)]
    assert any(ok)


def test_crop_equals_resize_of_the_cropped_region():
    # area 0.25, ratio 1, offset 0 -> top-left quarter resized x2
    x = _img()
    cfg = OFF.replace(p_crop=1.0, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    u = _u(4, crop=0.0, crop_x=0.0, crop_y=0.0)
    y = A.apply_augmentation(x, u, [0, 0], cfg).numpy()
    ref = tf.image.resize(x[:, : S // 2, : S // 2], [S, S], method="bilinear").numpy()
    # the last row/col interpolates towards the pixel outside the crop
    np.testing.assert_allclose(y[:, :-1, :-1], ref[:, :-1, :-1], atol=1e-5)


def test_crop_boxes_have_exact_area_and_fit():
    u = A.sample_uniforms(4000, [3, 3])
    cfg = A.AugmentConfig()
    x0, y0, w, h = (t.numpy() for t in A.crop_boxes(u, cfg))
    gate = u.numpy()[:, A._U["crop"]] < cfg.p_crop
    area = w * h
    assert np.all((area >= 0.75 - 1e-5) & (area <= 1 + 1e-5))
    assert np.all(x0 + w <= 1 + 1e-6) and np.all(y0 + h <= 1 + 1e-6)
    ratio = w / h
    assert np.all((ratio > 0.75 - 1e-4) & (ratio < 4 / 3 + 1e-4))
    assert gate.all()
    assert abs(area.mean() - 0.875) < 0.01


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_gather_resampler_matches_image_projective_transform(interpolation):
    x = _img(4)
    u = A.sample_uniforms(4, [9, 9])
    mats = A.geometry_matrices(u, A.AugmentConfig(p_rotate=1.0), (S, S), (20, 20))
    got = A.resample(x, mats, (20, 20), interpolation)  # same ops as inside the XLA cluster
    ref = A.projective_resample(x, mats, (20, 20), interpolation)
    if interpolation == "bilinear":
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4)
    else:  # rounding ties may pick the other neighbour on a handful of pixels
        assert np.mean(np.abs(got.numpy() - ref.numpy()) > 1e-5) < 0.01


def test_jit_and_reference_paths_agree_without_noise():
    x = _img(4)
    cfg = A.AugmentConfig(p_noise=0.0, p_rotate=1.0)
    a = A.augment_batch(x, [4, 2], cfg, jit=True).numpy()
    b = A.augment_batch(x, [4, 2], cfg, jit=False).numpy()
    np.testing.assert_allclose(a, b, atol=1e-4)


# --------------------------------------------------------------------------- colour


def _yiq_hue(x, turns):
    yiq = tf.image.rgb_to_yiq(x)
    c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    i, q = yiq[..., 1], yiq[..., 2]
    # same direction as tf.image.adjust_hue
    return tf.image.yiq_to_rgb(tf.stack([yiq[..., 0], c * i + s * q, -s * i + c * q], -1))


def test_colour_matrix_equals_sequential_reference():
    rng = np.random.default_rng(1)
    x = tf.constant(rng.uniform(0.35, 0.65, (4, S, S, 3)), tf.float32)
    cfg = OFF.replace(p_jitter=1.0)
    b, c, s, h = 1.1, 0.8, 1.2, 0.05
    u = _u(4, jitter=0.0,
           brightness=(b - 1) / (2 * cfg.brightness) + 0.5,
           contrast=(c - 1) / (2 * cfg.contrast) + 0.5,
           saturation=(s - 1) / (2 * cfg.saturation) + 0.5,
           hue=h / (2 * cfg.hue) + 0.5)
    m, t = A.colour_affine(u, cfg, tf.reduce_mean(x, [1, 2]))
    got = A.apply_colour(x, m, t)
    ref = x * b
    ref = tf.image.adjust_contrast(ref, c)
    gray = tf.reduce_sum(ref * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)
    ref = gray + s * (ref - gray)
    ref = _yiq_hue(ref, h)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=2e-4)
    # the fused path end to end (clip at the end) agrees too
    full = A.apply_augmentation(x, u, [0, 0], cfg).numpy()
    np.testing.assert_allclose(full, np.clip(ref.numpy(), 0, 1), atol=2e-4)


def test_single_colour_ops_match_tf_image():
    x = _img(1, 8)
    mean = tf.reduce_mean(x, [1, 2])
    add = A.AugmentConfig(brightness_mode="additive")
    m, t = A.colour_affine(_u(jitter=0.0, brightness=0.75), add, mean)  # delta = +0.2
    np.testing.assert_allclose(
        A.apply_colour(x, m, t).numpy(), tf.image.adjust_brightness(x, 0.2).numpy(), atol=1e-5
    )
    m, t = A.colour_affine(_u(jitter=0.0, contrast=0.25), A.AugmentConfig(), mean)  # c = 0.8
    np.testing.assert_allclose(
        A.apply_colour(x, m, t).numpy(), tf.image.adjust_contrast(x, 0.8).numpy(), atol=1e-5
    )
    # YIQ hue rotation shifts HSV hue by about the requested amount, in the same direction
    m, t = A.colour_affine(_u(jitter=0.0, hue=0.6), A.AugmentConfig(), mean)  # +0.02 turns
    y = tf.clip_by_value(A.apply_colour(x, m, t), 0, 1)
    d = (tf.image.rgb_to_hsv(y)[..., 0] - tf.image.rgb_to_hsv(x)[..., 0] + 0.5) % 1.0 - 0.5
    assert 0.01 < float(np.median(d)) < 0.03


def test_solarise_equals_threshold_inversion():
    x = _img()
    y = A.apply_augmentation(x, _u(4, solarize=0.0), [0, 0], OFF.replace(p_solarize=1.0)).numpy()
    ref = np.where(x.numpy() >= 0.5, 1 - x.numpy(), x.numpy())
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_geometric_only_leaves_colours_alone():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    rng = np.random.default_rng(2)
    mask = tf.constant(palette[rng.integers(0, 4, (4, S, S))])
    y = A.augment_batch(mask, [1, 1], geometric_only=True, interpolation="nearest").numpy()
    colours = {tuple(v) for v in np.round(y.reshape(-1, 3) * 255).astype(int)}
    assert colours <= {tuple(p) for p in palette.astype(int)}


# --------------------------------------------------------------------------- stock + layer


def test_stock_implementation_runs_and_shares_the_crop():
    x = _img(4)
    y = A.stock_augment_batch(x, tf.constant([1, 2], tf.int64))
    assert y.shape == x.shape and float(tf.reduce_max(y)) <= 1.0
    # crop only: Keras-layer baseline and fused path sample the same boxes
    cfg = OFF.replace(p_crop=1.0)
    seed = tf.constant([5, 5], tf.int64)
    stock = A.stock_augment_batch(x, seed, cfg).numpy()
    u = A.sample_uniforms(4, seed)
    fused = A.apply_augmentation(x, u, [0, 0], cfg).numpy()
    np.testing.assert_allclose(stock[:, 1:-1, 1:-1], fused[:, 1:-1, 1:-1], atol=1e-4)


def test_table_s1_layer_training_flag_config_and_keras_roundtrip(tmp_path):
    layer = A.TableS1Augment(seed=3, p_rotate=0.7, noise_std=0.02)
    assert layer.augment_config.p_rotate == 0.7
    clone = assert_config_roundtrip(layer)
    assert clone.augment_config == layer.augment_config
    x = _img()
    np.testing.assert_array_equal(layer(x, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(layer(x).numpy(), x.numpy())
    a, b = layer(x, training=True).numpy(), layer(x, training=True).numpy()
    assert np.abs(a - x.numpy()).max() > 0.01 and np.abs(a - b).max() > 0.01  # fresh seed per call

    inp = keras.Input((S, S, 3))
    h = A.TableS1Augment(seed=0, name="aug")(inp)
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out, name="tiny")
    loaded = assert_saved_model_roundtrip(model, x, tmp_path)
    assert loaded.get_layer("aug").augment_config == A.AugmentConfig()
    # augmentation is active inside training-mode calls of the model
    assert np.abs(model(x, training=True).numpy() - model(x).numpy()).max() > 0


def test_replicas_fold_their_id_into_the_seed():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = strategy.run(tf.function(lambda: A.replica_seed(tf.constant([1, 2], tf.int64))))
    a, b = (t.numpy() for t in strategy.experimental_local_results(out))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(A.replica_seed([1, 2]).numpy(), [1, 2])  # one replica: unchanged
