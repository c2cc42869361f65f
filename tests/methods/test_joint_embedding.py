"""JointEmbedding: shapes, sharing, gradients, .keras round trip, distribution equality."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import histokd  # noqa: F401
from histokd.errors import ConfigError
from histokd.methods import JointEmbedding
from histokd.methods.base import synchronize_batchnorm
from histokd.runtime import mirrored_strategy
from harness import assert_saved_model_roundtrip, assert_all_grads


def tiny_encoder(name="enc", size=16):
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"{name}_conv")(inp)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, x, name=name)


def batch(n=8, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"view_a": rng.random((n, size, size, 3), dtype="float32"),
            "view_b": rng.random((n, size, size, 3), dtype="float32")}


@pytest.mark.parametrize("loss", ["vicreg", "simclr"])
def test_shapes_and_metrics(loss):
    m = JointEmbedding(tiny_encoder(), expander_dims=[8, 8, 6], loss=loss)
    out = m(batch())
    assert out["z_a"].shape == (8, 6) and out["z_b"].shape == (8, 6)
    m.compile(optimizer=keras.optimizers.Adam(1e-3))
    logs = m.train_on_batch(batch(), return_dict=True)
    expected = {"loss", "std_a", "std_b"} | ({"invariance", "variance", "covariance"} if loss == "vicreg" else {"pair_accuracy"})
    assert expected <= set(logs)
    assert all(np.isfinite(v) for v in logs.values())


def test_shared_really_shares():
    shared = JointEmbedding(tiny_encoder(), shared=True, expander_dims=[8, 8])
    indep = JointEmbedding(tiny_encoder(), shared=False, expander_dims=[8, 8])
    shared(batch()); indep(batch())
    assert shared.encoder_a is shared.encoder_b and shared.expander_a is shared.expander_b
    assert len(indep.trainable_weights) == 2 * len(shared.trainable_weights)
    assert shared.count_params() * 2 == indep.count_params()
    x = batch()
    x["view_b"] = x["view_a"]
    out = shared(x)
    np.testing.assert_allclose(out["z_a"], out["z_b"])


def test_independent_needs_two_encoders():
    enc = tiny_encoder()
    with pytest.raises(ConfigError, match="two encoder"):
        JointEmbedding(enc, encoder_b=enc, shared=False)
    with pytest.raises(ConfigError, match="loss"):
        JointEmbedding(enc, loss="barlow")


@pytest.mark.parametrize("loss", ["vicreg", "simclr"])
def test_every_weight_gets_gradient(loss):
    m = JointEmbedding(tiny_encoder(), expander_dims=[8, 8, 8], loss=loss)
    x = batch()
    m(x)
    def f():
        out = m(x, training=True)
        return m.loss_terms(out["z_a"], out["z_b"])["loss"]
    assert_all_grads(f, m.trainable_weights)


def test_fit_lowers_loss_and_roundtrip(tmp_path):
    keras.utils.set_random_seed(1)
    m = JointEmbedding(tiny_encoder(), expander_dims=[16, 16, 16])
    x = batch(16)
    ds = tf.data.Dataset.from_tensors((x, np.zeros(16, "int32"))).repeat(30)
    m.compile(optimizer=keras.optimizers.Adam(1e-2))
    h = m.fit(ds, epochs=1, verbose=0)
    first = m.evaluate(tf.data.Dataset.from_tensors((x, np.zeros(16))), verbose=0, return_dict=True)
    assert np.isfinite(first["loss"])
    h2 = m.fit(ds, epochs=2, verbose=0)
    assert h2.history["loss"][-1] < h.history["loss"][0]
    loaded = assert_saved_model_roundtrip(m, x, tmp_path)
    assert isinstance(loaded, JointEmbedding) and not loaded.shared


def _grads_and_loss(strategy, loss, x):
    keras.utils.set_random_seed(3)
    with strategy.scope():
        m = JointEmbedding(tiny_encoder(), expander_dims=[8, 8, 8], loss=loss)
        m(x)  # build
        synchronize_batchnorm(m)
        m.compile(optimizer=keras.optimizers.SGD(0.1))
    ds = tf.data.Dataset.from_tensors((x, np.zeros(8, "int32")))
    w0 = [w.numpy() for w in m.trainable_weights]
    logs = m.fit(ds, epochs=1, verbose=0).history
    # SGD(0.1): the step taken is -0.1 × gradient
    return logs["loss"][0], [(w.numpy() - a) / -0.1 for w, a in zip(m.trainable_weights, w0)]


@pytest.mark.parametrize("loss", ["vicreg", "simclr"])
def test_mirrored_equals_one_device(loss):
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    x = batch(8, seed=5)
    one = tf.distribute.OneDeviceStrategy("/cpu:0")
    mirrored = mirrored_strategy([c.name for c in cpus[:2]])
    l1, g1 = _grads_and_loss(one, loss, x)
    l2, g2 = _grads_and_loss(mirrored, loss, x)
    assert l1 == pytest.approx(l2, rel=1e-5)
    # same gradients up to float32 summation order (sync BN uses E[x²]−E[x]²)
    flat1 = np.concatenate([g.ravel() for g in g1])
    flat2 = np.concatenate([g.ravel() for g in g2])
    assert np.linalg.norm(flat1) > 0
    assert np.linalg.norm(flat1 - flat2) <= 1e-3 * np.linalg.norm(flat1)
    for a, b in zip(g1, g2):  # and per weight, relative to the global gradient scale
        assert np.abs(a - b).max() <= 1e-4 * np.abs(flat1).max()


def test_expander_call_views_equals_separate_calls():
    """Shared branches run the expander's dense layers once on both views; outputs and
    BatchNorm moving statistics must equal two separate calls."""
    from histokd.layers.heads import ProjectionHead

    rng = np.random.default_rng(0)
    fa = tf.constant(rng.normal(size=(6, 16)).astype("float32"))
    fb = tf.constant(rng.normal(size=(6, 16)).astype("float32") * 2 + 1)
    one, two = ProjectionHead([24, 24, 8]), ProjectionHead([24, 24, 8])
    one.build((None, 16))
    two.build((None, 16))
    two.set_weights(one.get_weights())
    za, zb = one.call_views([fa, fb], training=True)
    ra, rb = two(fa, training=True), two(fb, training=True)
    np.testing.assert_allclose(za.numpy(), ra.numpy(), atol=1e-5)
    np.testing.assert_allclose(zb.numpy(), rb.numpy(), atol=1e-5)
    for w1, w2 in zip(one.weights, two.weights):  # incl. moving mean / variance
        np.testing.assert_allclose(w1.numpy(), w2.numpy(), atol=1e-6, err_msg=w1.path)
    ia, ib = one.call_views([fa, fb], training=False)
    np.testing.assert_allclose(ia.numpy(), two(fa, training=False).numpy(), atol=1e-5)
    np.testing.assert_allclose(ib.numpy(), two(fb, training=False).numpy(), atol=1e-5)


def test_shared_branches_same_result_merged_or_side_by_side(monkeypatch):
    """With shared branches the expander runs merged (ProjectionHead.call_views) under
    TensorFlow's default pools and per view when histokd train's CPU thread plan runs the
    views side by side; both give the same embeddings and BatchNorm statistics."""
    import histokd.methods.joint_embedding as je
    from histokd.runtime import kernels_side_by_side

    assert kernels_side_by_side(cores=2, intra=1, inter=2)
    assert kernels_side_by_side(cores=16, intra=8, inter=2)
    assert not kernels_side_by_side(cores=2, intra=0, inter=0)  # TensorFlow's defaults
    assert not kernels_side_by_side(cores=2, intra=2, inter=2)
    assert not kernels_side_by_side(cores=4, intra=1, inter=1)

    x = batch(8, seed=3)
    models, outs, calls, start = [], [], [], []
    for side in (False, True):
        monkeypatch.setattr(je, "kernels_side_by_side", lambda side=side: side)
        m = JointEmbedding(tiny_encoder(), shared=True, expander_dims=[8, 8, 6])
        m(x)
        if start:
            m.set_weights(start)
        else:
            start = m.get_weights()
        merged = m.expander_a.call_views
        monkeypatch.setattr(m.expander_a, "call_views",
                            lambda views, training=None, f=merged: calls.append(1) or f(views, training))
        outs.append(m(x, training=True))
        models.append(m)
    assert len(calls) == 1  # only the default-pool model merged the views
    for k in ("z_a", "z_b"):
        np.testing.assert_allclose(outs[0][k].numpy(), outs[1][k].numpy(), atol=1e-5)
    for w0, w1 in zip(models[0].weights, models[1].weights):
        np.testing.assert_allclose(w0.numpy(), w1.numpy(), atol=1e-6, err_msg=w0.path)
