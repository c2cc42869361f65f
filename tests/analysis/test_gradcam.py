"""Tests for histokd.analysis.gradcam (More From Less §3.3, Fig. 3, Fig. S5)."""

import numpy as np
import pytest

import histokd  # noqa: F401
import keras

from histokd.analysis import gradcam as G
from histokd.errors import ConfigError

S = 32  # image size
H = S // 2  # quadrant size


def _scene(n=2):
    """Black images with a red square in the top-left and a green one in the bottom-right quadrant."""
    x = np.zeros((n, S, S, 3), np.float32)
    x[:, 3:11, 4:12, 0] = 1.0
    x[:, 20:28, 19:27, 1] = 1.0
    return x


def _feature_conv(name="feat"):
    """1x1 conv with hand-set weights: channel 0 = red, channel 1 = green."""
    conv = keras.layers.Conv2D(2, 1, activation="relu", name=name)
    conv.build((None, S, S, 3))
    k = np.zeros((1, 1, 3, 2), np.float32)
    k[0, 0, 0, 0] = 1.0
    k[0, 0, 1, 1] = 1.0
    conv.set_weights([k, np.zeros(2, np.float32)])
    return conv


def _region_head_weights(grid):
    """Dense weights on a flattened [grid, grid, 2] map.

    Class 1 sums channel 0 in the top-left quadrant only; class 0 sums channel 1 everywhere.
    """
    w = np.zeros((grid, grid, 2, 2), np.float32)
    q = grid // 2
    w[:q, :q, 0, 1] = 1.0
    w[:, :, 1, 0] = 1.0
    return w.reshape(-1, 2), np.zeros(2, np.float32)


def _head(grid, name="head"):
    dense = keras.layers.Dense(2, name="logits")
    head = keras.Sequential([keras.Input((grid, grid, 2)), keras.layers.Flatten(), dense], name=name)
    dense.set_weights(list(_region_head_weights(grid)))
    return head


def _flat_model():
    inp = keras.Input((S, S, 3))
    a = _feature_conv()(inp)
    x = keras.layers.Flatten()(a)
    dense = keras.layers.Dense(2, name="logits")
    out = dense(x)
    dense.set_weights(list(_region_head_weights(S)))
    return keras.Model(inp, out, name="flat")


def _encoder():
    inp = keras.Input((S, S, 3))
    return keras.Model(inp, _feature_conv()(inp), name="encoder")


def _nested_functional():
    inp = keras.Input((S, S, 3))
    x = keras.layers.Rescaling(1.0, name="preproc")(inp)
    return keras.Model(inp, _head(S)(_encoder()(x)), name="nested")


def _nested_sequential():
    return keras.Sequential([keras.Input((S, S, 3)), _encoder(), _head(S)], name="nested_seq")


class _ClassToken(keras.layers.Layer):
    def call(self, x):
        cls = keras.ops.zeros_like(x[:, :1, :])
        return keras.ops.concatenate([cls, x], axis=1)


class _DropClassToken(keras.layers.Layer):
    def call(self, x):
        return x[:, 1:, :]


def _token_model(grid=8):
    """Patchify to a grid x grid token map with a class token, like a ViT stage."""
    p = S // grid
    inp = keras.Input((S, S, 3))
    a = _feature_conv()(inp)
    a = keras.layers.AveragePooling2D(p, name="patchify")(a)
    t = keras.layers.Reshape((grid * grid, 2))(a)
    t = _ClassToken(name="add_cls")(t)
    t = keras.layers.Activation("linear", name="tokens")(t)
    x = keras.layers.Flatten()(_DropClassToken()(t))
    dense = keras.layers.Dense(2, name="logits")
    out = dense(x)
    dense.set_weights(list(_region_head_weights(grid)))
    return keras.Model(inp, out, name="tokens_model")


def _argmax_rc(m):
    return np.unravel_index(np.argmax(m), m.shape)


@pytest.mark.parametrize("build", [_flat_model, _nested_functional, _nested_sequential])
def test_heatmap_peak_lies_in_the_region_the_class_depends_on(build):
    model = build()
    x = _scene(2)
    maps = G.gradcam(model, x, "feat", class_index=1)
    assert maps.shape == (2, S, S) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    for m in maps:
        r, c = _argmax_rc(m)
        assert r < H and c < H, (r, c)
        assert m[H:, H:].max() == 0.0  # the green square does not count for class 1
    # class 0 depends on green, which only lies in the bottom-right quadrant
    r, c = _argmax_rc(G.gradcam(model, x[:1], "feat", class_index=0)[0])
    assert r >= H and c >= H


def test_predicted_class_and_uint8_and_single_image():
    model = _nested_functional()
    x = _scene(1)
    x[:, 20:28, 19:27, 1] = 0.0  # no green: class 1 is predicted
    maps, cls = G.gradcam(model, (x * 255).astype(np.uint8)[0], "encoder/feat", return_class=True)
    assert cls == 1 and maps.shape == (S, S)
    r, c = _argmax_rc(maps)
    assert r < H and c < H


def test_transformer_tokens_with_class_token():
    model = _token_model(grid=8)
    maps = G.gradcam(model, _scene(2), "tokens", class_index=1)
    assert maps.shape == (2, S, S)
    for m in maps:
        r, c = _argmax_rc(m)
        assert r < H and c < H
    low = G.gradcam(model, _scene(1), "tokens", class_index=1, upsample=False)
    assert low.shape == (1, 8, 8)


def test_tokens_to_grid():
    t = np.arange(2 * 17 * 3, dtype=np.float32).reshape(2, 17, 3)
    g = G.tokens_to_grid(t)
    assert tuple(g.shape) == (2, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(g)[:, 0, 0], t[:, 1])
    assert tuple(G.tokens_to_grid(t[:, 1:], grid=(2, 8)).shape) == (2, 2, 8, 3)
    with pytest.raises(ConfigError, match="grid"):
        G.tokens_to_grid(np.zeros((1, 7, 3)))


def test_errors_name_the_problem():
    model = _flat_model()
    with pytest.raises(ConfigError, match="no layer named 'nope'"):
        G.gradcam(model, _scene(1), "nope")
    with pytest.raises(ConfigError, match="out of range"):
        G.gradcam(model, _scene(1), "feat", class_index=5)
    enc = _encoder()
    with pytest.raises(ConfigError, match="classifier output"):
        G.gradcam(enc, _scene(1), "feat")


def test_overlay_and_grid_png(tmp_path):
    x = _scene(2)
    ov = G.overlay_heatmap(x[0], np.linspace(0, 1, 64).reshape(8, 8), alpha=0.5)
    assert ov.shape == (S, S, 3) and ov.dtype == np.uint8
    assert G.overlay_heatmap(x[0], np.zeros((S, S)), alpha=0.0).tolist() == (x[0] * 255).astype(np.uint8).tolist()
    out = G.gradcam_grid({"flat": _flat_model(), "nested": _nested_functional()}, (x * 255).astype(np.uint8),
                         ["feat"], str(tmp_path / "sub" / "gradcam.png"),
                         extra_columns={"mask": x[..., :1]}, row_labels=["a", "b"])
    import matplotlib.image as mpimg

    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0.01


class _SubclassedClassifier(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.encoder = _encoder()
        self.flat = keras.layers.Flatten()
        self.logits = keras.layers.Dense(2, name="logits")

    def call(self, x):
        return self.logits(self.flat(self.encoder(x)))


def test_subclassed_model_and_taps_are_removed_after_errors():
    model = _SubclassedClassifier()
    model(_scene(1))
    model.logits.set_weights(list(_region_head_weights(S)))
    r, c = _argmax_rc(G.gradcam(model, _scene(1), "feat", class_index=1)[0])
    assert r < H and c < H
    feat = model.encoder.get_layer("feat")
    with pytest.raises(ConfigError):
        G.gradcam(model, _scene(1), "feat", class_index=7)
    assert "call" not in vars(feat)  # the temporary wrapper is gone
    np.testing.assert_allclose(model(_scene(1)), model(_scene(1)))
