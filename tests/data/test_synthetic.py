"""Synthetic H&E demo set: shapes, determinism, colour, learnability."""

import cv2
import numpy as np
import pytest

from histokd.data.synthetic import CLASS_NAMES, make_synthetic_he
from histokd.errors import DataError


@pytest.fixture(scope="module")
def demo():
    return make_synthetic_he(n_per_class=48, image_size=64, seed=0, num_classes=4)


def test_shapes_dtypes_and_names(demo):
    x, y, names = demo
    assert x.shape == (192, 64, 64, 3) and x.dtype == np.uint8
    assert y.shape == (192,) and names == CLASS_NAMES[:4]
    assert np.bincount(y).tolist() == [48] * 4
    # shuffled, not grouped by class
    assert len(set(y[:8].tolist())) > 1


def test_deterministic_from_seed():
    a = make_synthetic_he(3, 32, seed=5, num_classes=6)
    b = make_synthetic_he(3, 32, seed=5, num_classes=6)
    c = make_synthetic_he(3, 32, seed=6, num_classes=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[2] == CLASS_NAMES and sorted(set(a[1].tolist())) == list(range(6))


def test_looks_like_h_and_e(demo):
    """Both stains absorb green most, so H&E tissue is pink/purple: R and B above G."""
    x, y, names = demo
    for k, name in enumerate(names):
        m = x[y == k].reshape(-1, 3).astype(float).mean(0)
        assert m[0] > m[1] and m[2] > m[1], (name, m)
    # adipose is mostly empty (bright); lymphocyte sheets are the darkest
    means = [x[y == k].mean() for k in range(4)]
    assert int(np.argmax(means)) == names.index("adipose")
    assert int(np.argmin(means)) == names.index("lymphocytes")
    # not flat colour: texture inside every tile
    assert x.reshape(len(x), -1, 3).std(axis=1).min() > 3


def test_classes_learnable_but_not_trivial(demo):
    """A linear probe on 16x16 thumbnails beats chance clearly on held-out seeds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, _ = demo
    xt, yt, _ = make_synthetic_he(24, 64, seed=1, num_classes=4)

    def feats(a):
        return np.stack([cv2.resize(i, (16, 16), interpolation=cv2.INTER_AREA) for i in a]).reshape(len(a), -1) / 255.0

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500)).fit(feats(x), y)
    acc = clf.score(feats(xt), yt)
    assert acc > 0.6, acc  # chance is 0.25 (measured ~0.83)


def test_224_and_tiny_sizes_work():
    x, y, _ = make_synthetic_he(1, 224, seed=0, num_classes=6)
    assert x.shape == (6, 224, 224, 3)
    x, _, _ = make_synthetic_he(2, 8, seed=0, num_classes=2)
    assert x.shape == (4, 8, 8, 3)


@pytest.mark.parametrize("kw", [dict(num_classes=7), dict(num_classes=0), dict(image_size=4), dict(n_per_class=0)])
def test_bad_arguments(kw):
    args = dict(n_per_class=2, image_size=32, seed=0, num_classes=4)
    args.update(kw)
    with pytest.raises(DataError):
        make_synthetic_he(**args)
