"""BYOL / MoBY's random grayscale and Gaussian blur (augment.p_grayscale, augment.p_blur)."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from histokd.data.augment import AugmentConfig, augment_batch, grayscale_and_blur
from histokd.errors import ConfigError


def _images(n=4, size=24, seed=0):
    return np.random.default_rng(seed).random((n, size, size, 3)).astype("float32")


def test_off_by_default_and_other_draws_unchanged():
    x = _images()
    base = augment_batch(x, [1, 2], AugmentConfig()).numpy()
    assert AugmentConfig().p_blur == 0 and AugmentConfig().p_grayscale == 0
    np.testing.assert_array_equal(grayscale_and_blur(x, [1, 2], AugmentConfig()), x)
    # blur/grayscale draw from their own seed: the rest of the augmentation is the same
    cfg = AugmentConfig(p_grayscale=1.0)
    grey = augment_batch(x, [1, 2], cfg).numpy()
    luma = (base * [0.299, 0.587, 0.114]).sum(-1, keepdims=True)
    np.testing.assert_allclose(grey, np.repeat(luma, 3, -1), atol=1e-6)


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_blur_equals_scipy_gaussian_filter(sigma):
    x = _images()
    cfg = AugmentConfig(p_blur=1.0, blur_sigma=(sigma, sigma))
    got = grayscale_and_blur(x, [3, 4], cfg).numpy()
    radius = int(np.ceil(3 * sigma))
    want = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode="mirror", truncate=radius / sigma)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_probability_and_per_image_sigma():
    x = _images(n=64, size=16)
    out = grayscale_and_blur(x, [5, 6], AugmentConfig(p_blur=0.5, blur_sigma=(0.5, 2.0))).numpy()
    blurred = ~np.all(np.isclose(out, x), axis=(1, 2, 3))
    assert 16 < blurred.sum() < 48  # about half the images, the others untouched
    assert out[blurred].std() < x[blurred].std()  # blurring lowers the pixel spread
    again = grayscale_and_blur(x, [5, 6], AugmentConfig(p_blur=0.5, blur_sigma=(0.5, 2.0))).numpy()
    np.testing.assert_array_equal(out, again)  # deterministic given the seed
    in_graph = tf.function(lambda t: grayscale_and_blur(t, [5, 6], AugmentConfig(p_blur=0.5)))
    assert in_graph(tf.constant(x)).shape == x.shape


def test_bad_values_rejected():
    with pytest.raises(ConfigError, match="blur_sigma"):
        AugmentConfig(blur_sigma=(0.0, 1.0))
    with pytest.raises(ConfigError, match="p_blur"):
        AugmentConfig(p_blur=1.5)
