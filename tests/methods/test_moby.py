"""MoBY: momentum target untouched by the optimizer and moved by exactly the EMA rule,
queue order, schedule, training, export, and MirroredStrategy == one device."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import histokd  # noqa: F401
from histokd.errors import ConfigError
from histokd.layers.heads import ProjectionHead
from histokd.methods.moby import MoBY
from histokd.registry import METHODS
from harness import assert_config_roundtrip, assert_saved_model_roundtrip

SIZE = 16


def tiny_encoder(bn=True, name="enc"):
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name=f"{name}_conv")(inp)
    if bn:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, x, name=name)


def make(bn=True, **kw):
    kw.setdefault("hidden_dim", 16)
    kw.setdefault("out_dim", 8)
    kw.setdefault("queue_size", 16)
    return MoBY(tiny_encoder(bn), **kw)


def views(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"view_a": rng.random((n, SIZE, SIZE, 3), dtype="float32"),
            "view_b": rng.random((n, SIZE, SIZE, 3), dtype="float32")}


def dataset(x, repeat=1):
    n = len(x["view_a"])
    return tf.data.Dataset.from_tensors((x, np.zeros(n, "int32"))).repeat(repeat)


def _np(ws):
    return [np.array(w) for w in ws]


def test_target_is_invisible_to_the_optimizer():
    m = make()
    online = {id(v) for v in m.encoder.weights + m.projector.weights + m.predictor.weights}
    target = {id(v) for v in m.target_encoder.weights + m.target_projector.weights}
    assert not online & target, "target shares variables with the online branch"
    trainable = {id(v) for v in m.trainable_variables}
    assert not trainable & target
    assert trainable == {id(v) for v in m.encoder.trainable_weights + m.projector.trainable_weights
                         + m.predictor.trainable_weights}
    # the target starts as an exact copy
    for a, b in zip(m.encoder.get_weights(), m.target_encoder.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_momentum_one_freezes_target_while_online_learns():
    m = make(base_momentum=1.0)
    m.compile(optimizer=keras.optimizers.SGD(0.5))
    pairs = m._ema_pairs()
    online0, target0 = _np(o for o, _ in pairs), _np(t for _, t in pairs)
    m.fit(dataset(views(), 3), verbose=0)
    for (o, t), o0, t0 in zip(pairs, online0, target0):
        np.testing.assert_array_equal(np.array(t), t0, err_msg=f"optimizer moved target {t.path}")
    assert any(not np.array_equal(np.array(o), o0) for (o, _), o0 in zip(pairs, online0))


def test_momentum_update_is_exactly_the_ema_rule():
    m = make(base_momentum=0.9)  # total_steps=None: constant m = 0.9
    pairs = m._ema_pairs()
    rng = np.random.default_rng(7)
    for _, t in pairs:  # make the target differ from the online branch
        t.assign(rng.standard_normal(t.shape).astype("float32"))
    m.compile(optimizer=keras.optimizers.SGD(0.5))
    online0, target0 = _np(o for o, _ in pairs), _np(t for _, t in pairs)
    m.fit(dataset(views()), verbose=0)  # one step
    assert int(m.optimizer.iterations) == 1
    for (o, t), o0, t0 in zip(pairs, online0, target0):
        np.testing.assert_allclose(np.array(t), 0.9 * t0 + 0.1 * o0, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{t.path} not moved by the EMA rule")
    moved = [not np.array_equal(np.array(o), o0) for (o, _), o0 in zip(pairs, online0)]
    assert all(moved), "the online branch did not learn"


def test_fit_follows_schedule_and_fills_queues_with_each_views_keys():
    m = make(base_momentum=0.99, total_steps=4, queue_size=16)
    m.compile(optimizer=keras.optimizers.SGD(0.1))
    x = views(8)
    h = m.fit(dataset(x, 4), verbose=0)
    # logged momentum = mean over the epoch of m(k), k = 0..3 = optimizer steps done before each step
    want = np.mean([1 - 0.01 * (np.cos(np.pi * k / 4) + 1) / 2 for k in range(4)])
    assert h.history["momentum"][0] == pytest.approx(want, rel=1e-6)
    assert float(m.momentum()) == pytest.approx(1.0)  # k = 4 = total_steps
    # 4 steps of 8 keys in a ring of 16: the last step wrote rows 8..15; its keys came from
    # the target after that step's EMA (unchanged since) with batch-statistic BatchNorm
    assert int(m.queue_ptr.numpy()) == 0
    np.testing.assert_allclose(np.array(m.queue1)[8:], m.keys(x["view_a"]).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(m.queue2)[8:], m.keys(x["view_b"]).numpy(), atol=1e-5)


def test_queue_enqueue_dequeue_order():
    m = make(queue_size=6)
    q1_0 = np.array(m.queue1)
    np.testing.assert_allclose(np.linalg.norm(q1_0, axis=1), 1.0, rtol=1e-5)  # random unit keys
    a = np.arange(4 * 8, dtype="float32").reshape(4, 8)
    m.enqueue(a, -a)
    q1 = np.array(m.queue1)
    np.testing.assert_array_equal(q1[:4], a)
    np.testing.assert_array_equal(q1[4:], q1_0[4:])  # untouched rows keep the oldest keys
    np.testing.assert_array_equal(np.array(m.queue2)[:4], -a)
    assert int(m.queue_ptr) == 4
    b = 100 + a
    m.enqueue(b, -b)  # wraps: rows 4, 5 then 0, 1 (the oldest) are overwritten
    q1 = np.array(m.queue1)
    np.testing.assert_array_equal(q1[4:6], b[:2])
    np.testing.assert_array_equal(q1[0:2], b[2:4])
    np.testing.assert_array_equal(q1[2:4], a[2:4])
    assert int(m.queue_ptr) == 2
    with pytest.raises(ConfigError, match="queue_size"):
        m.enqueue(np.zeros((7, 8), "float32"), np.zeros((7, 8), "float32"))


def test_fit_loss_finite_and_falls():
    keras.utils.set_random_seed(2)
    m = make(queue_size=32, total_steps=40)
    m.compile(optimizer=keras.optimizers.Adam(1e-2))
    h = m.fit(dataset(views(8, seed=3), 6), epochs=3, verbose=0)
    loss = h.history["loss"]
    assert np.all(np.isfinite(loss))
    assert loss[-1] < loss[0]
    ev = m.evaluate(dataset(views(8, seed=3)), verbose=0, return_dict=True)
    assert np.isfinite(ev["loss"]) and set(ev) >= {"loss", "accuracy", "momentum"}


def test_every_online_weight_gets_a_gradient():
    m = make()
    x = views()
    state = m.before_step(x, None, training=False)
    with tf.GradientTape() as tape:
        loss = m.compute_terms(x, None, training=True, state=state)["loss"]
    grads = tape.gradient(loss, m.trainable_variables)
    bad = [v.path for v, g in zip(m.trainable_variables, grads) if g is None or not np.any(g.numpy())]
    assert not bad


def test_errors():
    with pytest.raises(ConfigError, match="view_a"):
        m = make()
        m.compile(optimizer="sgd")
        m.train_on_batch(np.zeros((2, SIZE, SIZE, 3), "float32"))
    with pytest.raises(ConfigError, match="pooled"):
        inp = keras.Input((SIZE, SIZE, 3))
        MoBY(keras.Model(inp, keras.layers.Conv2D(2, 3)(inp)), hidden_dim=8, out_dim=4, queue_size=8)
    with pytest.raises(ConfigError, match="momentum"):
        make(base_momentum=1.5)


def test_serialization_and_encoder_export(tmp_path):
    m = make()
    assert_config_roundtrip(ProjectionHead.moby(16, 8, num_layers=3))
    clone = MoBY.from_config(m.get_config())
    assert clone.queue_size == m.queue_size and clone.out_dim == m.out_dim
    assert METHODS.get("moby") is MoBY
    x = views(4)["view_a"]
    assert_saved_model_roundtrip(m.branch_encoders()["online"], x, tmp_path)
    # the whole method reloads with its momentum target and queues
    m.enqueue(np.ones((4, 8), "float32"), -np.ones((4, 8), "float32"))
    m.save(tmp_path / "moby.keras")
    back = keras.saving.load_model(tmp_path / "moby.keras")
    assert isinstance(back, MoBY)
    for a, b in zip(m.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(back.queue_ptr.numpy()) == 4
    assert not {id(v) for v in back.trainable_variables} & {id(v) for v in back.target_encoder.weights}


from histokd.runtime import mirrored_strategy as fresh_mirrored  # noqa: E402


def _run(strategy, x, init_weights, epochs=2):
    with strategy.scope():
        m = make(bn=False, queue_size=16, total_steps=10)
        m.set_weights(init_weights)
        m.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [np.array(v) for v in m.trainable_variables]
    grads = []

    def first_step(epoch, logs):
        if epoch == 0:  # SGD step = -lr·g
            grads.extend((np.array(v) - b) / -0.1 for v, b in zip(m.trainable_variables, before))

    cb = keras.callbacks.LambdaCallback(on_epoch_end=first_step)
    h = m.fit(dataset(x), epochs=epochs, verbose=0, callbacks=[cb]).history["loss"]
    return m, h, grads


@pytest.mark.slow
def test_mirrored_equals_one_device():
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    x = views(8, seed=11)
    w0 = make(bn=False, queue_size=16, total_steps=10).get_weights()
    m1, h1, g1 = _run(tf.distribute.OneDeviceStrategy("/cpu:0"), x, w0)
    m2, h2, g2 = _run(fresh_mirrored([c.name for c in cpus[:2]]), x, w0)
    assert h1[0] == pytest.approx(h2[0], rel=1e-5)  # step 1
    assert h1[1] == pytest.approx(h2[1], rel=1e-4)  # step 2 (after one step of float32 noise)
    flat1 = np.concatenate([g.ravel() for g in g1])
    flat2 = np.concatenate([g.ravel() for g in g2])
    assert np.linalg.norm(flat1) > 0
    assert np.linalg.norm(flat1 - flat2) <= 1e-4 * np.linalg.norm(flat1)  # float32 summation order only
    # keys of both steps, gathered in replica order; step 2's keys come after one SGD step
    # (lr 0.1) of float32 noise: the products' summation order depends on the per-replica
    # batch (e.g. thin_dense's input gradient), which moves these unit vectors by up to
    # ~1e-4; a wrong gather order or a missing replica moves them by O(1)
    for name in ("queue1", "queue2"):
        np.testing.assert_allclose(np.array(getattr(m1, name)), np.array(getattr(m2, name)), atol=5e-4,
                                   err_msg=f"{name} differs")
    assert int(m1.queue_ptr.numpy()) == int(m2.queue_ptr.numpy()) == 0
    for (_, a), (_, b) in zip(m1._ema_pairs(), m2._ema_pairs()):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, err_msg=f"target {a.path} differs")
        vals = [v.numpy() for v in b.value.values]  # every replica holds the same copy
        for v in vals[1:]:
            np.testing.assert_array_equal(v, vals[0])
    for name in ("queue1", "queue2"):
        vals = [v.numpy() for v in getattr(m2, name).value.values]
        np.testing.assert_array_equal(vals[0], vals[1])
