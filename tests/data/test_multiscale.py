"""Multi-scale crops: window geometry, 2× magnification content, seeding, tf.data, layer config."""

import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401
from histokd.data.multiscale import (MultiScaleCrop, make_multiscale_views, multiscale_crop, multiscale_pair,
                                     sample_multiscale_boxes)
from histokd.errors import ConfigError
from histokd.registry import VIEWS
from harness import assert_config_roundtrip


def test_window_geometry():
    boxes, mag = sample_multiscale_boxes(4000, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), magnify_prob=0.3,
                                         seed=tf.constant([1, 2]))
    b, m = boxes.numpy(), mag.numpy()
    assert abs(m.mean() - 0.3) < 0.03
    assert b.min() >= 0.0 and b.max() <= 1.0 + 1e-6
    h, w = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    np.testing.assert_allclose(h[m], 0.5, atol=1e-6)  # 2×: half the field of view per side
    np.testing.assert_allclose(w[m], 0.5, atol=1e-6)
    area, ratio = (h * w)[~m], (w / h)[~m]
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1.0 + 1e-4
    assert ratio.min() >= 3 / 4 - 1e-4 and ratio.max() <= 4 / 3 + 1e-4
    # positions are spread over the whole image
    assert b[m, 0].min() < 0.05 and b[m, 0].max() > 0.45
    _, none = sample_multiscale_boxes(200, magnify_prob=0.0, seed=tf.constant([3, 4]))
    _, all_ = sample_multiscale_boxes(200, magnify_prob=1.0, seed=tf.constant([3, 4]))
    assert not none.numpy().any() and all_.numpy().all()
    b4, _ = sample_multiscale_boxes(10, magnify_prob=1.0, magnification=4.0, seed=tf.constant([5, 6]))
    np.testing.assert_allclose((b4[:, 2] - b4[:, 0]).numpy(), 0.25, atol=1e-6)


def test_magnified_crop_shows_half_the_field_of_view():
    size = 33
    ramp = np.tile(np.linspace(0, 1, size, dtype="float32")[None, :, None], (size, 1, 3))  # value = x position
    x = np.stack([ramp] * 6)
    out, (boxes, mag) = multiscale_crop(x, size=17, magnify_prob=1.0, seed=tf.constant([0, 1]), return_boxes=True)
    out = out.numpy()
    assert out.shape == (6, 17, 17, 3) and mag.numpy().all()
    span = out[:, 0, -1, 0] - out[:, 0, 0, 0]
    np.testing.assert_allclose(span, 0.5, atol=1e-5)  # left to right edge of the window: half the image
    np.testing.assert_allclose(out[:, 0, 0, 0], boxes.numpy()[:, 1], atol=1e-5)


def test_full_window_is_identity_and_uint8_is_scaled():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
    out = multiscale_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), magnify_prob=0.0, seed=tf.constant([1, 1]))
    assert out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), x / 255.0, atol=1e-6)


def test_seeding():
    x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[0, 0])
    a = multiscale_crop(x, 8, seed=tf.constant([7, 7])).numpy()
    b = multiscale_crop(x, 8, seed=tf.constant([7, 7])).numpy()
    c = multiscale_crop(x, 8, seed=tf.constant([7, 8])).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    pair = multiscale_pair(x, 8, seed=tf.constant([1, 2]))
    assert not np.allclose(pair["view_a"].numpy(), pair["view_b"].numpy())


def test_in_tf_data_fresh_windows_every_batch():
    x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 1])
    layer = MultiScaleCrop(8, seed=3)
    ds = tf.data.Dataset.from_tensors(x).repeat(2).map(lambda b: layer(b))
    first, second = [e.numpy() for e in ds]
    assert first.shape == (4, 8, 8, 3) and first.min() >= 0.0 and first.max() <= 1.0
    assert not np.allclose(first, second)
    make = VIEWS.get("multiscale").make
    views = tf.data.Dataset.from_tensors((x, tf.zeros([4], tf.int32))).map(lambda b, y: (make(size=8)(b), y))
    (v, _), = list(views)
    assert set(v) == {"view_a", "view_b"} and v["view_a"].shape == (4, 8, 8, 3)


def test_layer_inference_and_config():
    layer = MultiScaleCrop((8, 8), scale=(0.3, 1.0), magnify_prob=0.25, seed=1)
    x = tf.random.stateless_uniform([2, 16, 16, 3], seed=[2, 2])
    np.testing.assert_allclose(layer(x, training=False).numpy(), tf.image.resize(x, (8, 8)).numpy(), atol=1e-6)
    assert layer.compute_output_shape((None, 16, 16, 3)) == (None, 8, 8, 3)
    assert_config_roundtrip(layer)


def test_errors():
    with pytest.raises(ConfigError, match="scale"):
        MultiScaleCrop(scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="magnify_prob"):
        make_multiscale_views(magnify_prob=1.5)
    with pytest.raises(ConfigError, match="magnification"):
        sample_multiscale_boxes(2, magnification=0.5)
    with pytest.raises(ConfigError, match="batch"):
        multiscale_crop(np.zeros((8, 8, 3), "float32"))
