"""One call per check of ARCHITECTURE.md's test harness.

Every helper raises ``AssertionError`` with a message saying which weight or
output was wrong, so a failing test reads like a diagnosis.
"""

from __future__ import annotations

import numpy as np
import keras
from keras import ops


def _as_list(x):
    if isinstance(x, dict):
        return [x[k] for k in sorted(x)]
    if isinstance(x, (list, tuple)):
        out = []
        for v in x:
            out.extend(_as_list(v))
        return out
    return [x]


def assert_config_roundtrip(obj):
    """``from_config(get_config())`` rebuilds an object with the same config."""
    cfg = obj.get_config()
    clone = obj.__class__.from_config(cfg)
    assert clone.get_config() == cfg, f"{obj.__class__.__name__} config does not round-trip"
    return clone


def assert_saved_model_roundtrip(model, inputs, tmp_path, atol=1e-6):
    """``.keras`` save → load gives the same outputs (inference mode)."""
    path = tmp_path / f"{model.name}.keras"
    before = _as_list(model(inputs, training=False))
    model.save(path)
    loaded = keras.saving.load_model(path)
    after = _as_list(loaded(inputs, training=False))
    assert len(before) == len(after)
    for i, (a, b) in enumerate(zip(before, after)):
        np.testing.assert_allclose(
            ops.convert_to_numpy(a), ops.convert_to_numpy(b), atol=atol,
            err_msg=f"output {i} differs after .keras reload",
        )
    return loaded


def assert_trains_only_trainable(model, inputs, targets=None, loss_fn=None, lr=1e-2):
    """One optimizer step changes every trainable weight and no other weight.

    Non-trainable weights that legitimately change in training mode (BatchNorm
    moving statistics, step counters) are exempt by name.
    """
    import tensorflow as tf

    if loss_fn is None:
        def loss_fn(y_true, y_pred):
            return ops.mean(ops.square(ops.convert_to_tensor(y_pred)))
    frozen_before = {
        id(w): ops.convert_to_numpy(w).copy() for w in model.non_trainable_weights
    }
    train_before = {id(w): ops.convert_to_numpy(w).copy() for w in model.trainable_weights}
    assert model.trainable_weights, "model has no trainable weights"
    with tf.GradientTape() as tape:
        out = model(inputs, training=True)
        loss = loss_fn(targets, out)
    grads = tape.gradient(loss, model.trainable_weights)
    missing = [w.path for w, g in zip(model.trainable_weights, grads) if g is None]
    assert not missing, f"no gradient reaches: {missing[:10]}"
    opt = keras.optimizers.SGD(lr)
    opt.apply(grads, model.trainable_weights)
    unchanged = [
        w.path for w in model.trainable_weights
        if np.array_equal(train_before[id(w)], ops.convert_to_numpy(w))
    ]
    assert not unchanged, f"trainable weights not updated: {unchanged[:10]}"
    moved = [
        w.path for w in model.non_trainable_weights
        if not any(s in w.path for s in ("moving_mean", "moving_variance", "seed", "counter", "iteration"))
        and not np.array_equal(frozen_before[id(w)], ops.convert_to_numpy(w))
    ]
    assert not moved, f"non-trainable weights changed: {moved[:10]}"


def assert_all_grads(loss_value_fn, weights):
    """Every weight in ``weights`` receives a non-zero gradient from ``loss_value_fn()``."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_value_fn()
    grads = tape.gradient(loss, weights)
    bad = [w.path for w, g in zip(weights, grads)
           if g is None or not np.any(ops.convert_to_numpy(g))]
    assert not bad, f"no (or all-zero) gradient reaches: {bad[:10]}"


def assert_loss_decreases(loss_fn, shapes, steps=20, lr=0.05, seed=0):
    """20 Adam steps on free embeddings of the given shapes lower ``loss_fn(*embeddings)``."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    vars_ = [tf.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    opt = keras.optimizers.Adam(lr)
    first = None
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(*vars_)
        if first is None:
            first = float(loss)
        grads = tape.gradient(loss, vars_)
        opt.apply(grads, vars_)
    last = float(loss_fn(*vars_))
    assert np.isfinite(last) and last < first, f"loss did not decrease: {first} -> {last}"
    return first, last
