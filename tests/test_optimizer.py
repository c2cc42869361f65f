"""FusedAdam / FusedAdamW (histokd.train): Keras' Adam in one TensorFlow kernel per variable."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from histokd.optimizers import FusedAdam, FusedAdamW

CASES = [(FusedAdam, keras.optimizers.Adam, {}),
         (FusedAdamW, keras.optimizers.AdamW, {"weight_decay": 0.1})]


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(6, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")]


def _grads(rng, ws):
    return [tf.constant(rng.normal(size=w.shape).astype("float32")) for w in ws]


@pytest.mark.parametrize("fused_cls,keras_cls,kw", CASES)
def test_same_updates_as_keras_and_uses_the_fused_kernel(fused_cls, keras_cls, kw, monkeypatch):
    calls = []
    real = tf.raw_ops.ResourceApplyAdam

    def counting(**a):
        calls.append(1)
        return real(**a)

    monkeypatch.setattr(tf.raw_ops, "ResourceApplyAdam", counting)
    ws = _weights()
    va = [keras.Variable(w) for w in ws]
    vb = [keras.Variable(w) for w in ws]
    sched = keras.optimizers.schedules.CosineDecay(0.0, 10, warmup_target=1e-2, warmup_steps=2)
    oa, ob = fused_cls(sched, **kw), keras_cls(sched, **kw)
    rng = np.random.default_rng(1)
    fa = tf.function(lambda g: oa.apply(g, va))
    for i in range(6):  # eager and inside a tf.function, alternately
        g = _grads(rng, ws)
        if i % 2:
            fa(g)
        else:
            oa.apply(g, va)
        ob.apply(g, vb)
    assert calls, "the fused kernel was not used"
    for a, b, w in zip(va, vb, ws):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-6)
        assert np.abs(a.numpy() - w).min() > 0  # every weight moved
    assert int(oa.iterations.numpy()) == int(ob.iterations.numpy()) == 6


def test_amsgrad_and_sparse_gradients_use_the_keras_update():
    ws = _weights()
    va = [keras.Variable(w) for w in ws]
    vb = [keras.Variable(w) for w in ws]
    oa, ob = FusedAdam(1e-2, amsgrad=True), keras.optimizers.Adam(1e-2, amsgrad=True)
    g = _grads(np.random.default_rng(2), ws)
    oa.apply(g, va)
    ob.apply(g, vb)
    for a, b in zip(va, vb):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-7)
    emb = keras.Variable(np.ones((5, 3), "float32"))
    opt = FusedAdam(0.1)
    sparse = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 3]), tf.constant([5, 3]))
    opt.apply([sparse], [emb])
    changed = np.any(emb.numpy() != 1.0, axis=1)
    assert changed.tolist() == [True, False, False, True, False]


def test_mirrored_strategy_equals_one_device():
    ws = _weights()
    rng = np.random.default_rng(3)
    grads = [_grads(rng, ws) for _ in range(3)]
    one = [keras.Variable(w) for w in ws]
    opt1 = FusedAdam(1e-2)
    for g in grads:
        opt1.apply(g, one)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        two = [keras.Variable(w) for w in ws]
        opt2 = FusedAdam(1e-2)
        opt2.build(two)

    @tf.function
    def step(g):
        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            # each replica contributes half, so the all-reduced sum is g
            opt2.apply([x / ctx.num_replicas_in_sync for x in g], two)
        strategy.run(replica_fn)

    for g in grads:
        step(g)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-6)


def test_config_roundtrip_and_compiled_model_reload(tmp_path):
    opt = FusedAdamW(3e-4, weight_decay=0.05, beta_2=0.99)
    again = FusedAdamW.from_config(opt.get_config())
    assert again.get_config() == opt.get_config()
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    model.compile(optimizer=FusedAdam(1e-3), loss="mse")
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, FusedAdam)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
