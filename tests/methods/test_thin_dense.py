"""histokd.layers.heads.thin_dense: same function and gradients as the Keras Dense layer.

The expander and MoBY heads run their dense layers through ``thin_dense``, whose
custom gradient computes the input gradient ``dY Wᵀ`` as ``(W dYᵀ)ᵀ`` for thin
batches. These tests pin the values (forward, input, kernel and bias gradients)
to the plain layer's for thin, wide and unknown batch sizes, under mixed
precision, and check that the fast form is really the one taken.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

from histokd.layers import heads
from histokd.layers.heads import ProjectionHead, thin_dense


def _dense(units, in_dim, use_bias=True, activation=None, seed=0):
    layer = keras.layers.Dense(units, use_bias=use_bias, activation=activation)
    layer.build((None, in_dim))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(in_dim, units)).astype("float32") / np.sqrt(in_dim))
    if use_bias:
        layer.bias.assign(rng.normal(size=(units,)).astype("float32"))
    return layer


def _grads(fn, layer, x, upstream):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    gx, *gw = tape.gradient(loss, [x] + layer.trainable_variables)
    return y.numpy(), gx.numpy(), [g.numpy() for g in gw]


@pytest.mark.parametrize("rows,use_bias,activation", [(8, True, None), (8, False, "relu"), (300, True, None)])
def test_values_and_gradients_equal_the_dense_layer(rows, use_bias, activation):
    layer = _dense(24, 40, use_bias, activation)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 40)).astype("float32")
    up = tf.constant(rng.normal(size=(rows, 24)).astype("float32"))
    ref = _grads(layer, layer, x, up)
    for fn in (lambda t: thin_dense(t, layer), tf.function(lambda t: thin_dense(t, layer))):
        got = _grads(fn, layer, x, up)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
        assert len(got[2]) == len(ref[2]) == (2 if use_bias else 1)
        for g, r in zip(got[2], ref[2]):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_unknown_batch_size_takes_the_runtime_branch():
    layer = _dense(16, 12)
    rng = np.random.default_rng(2)
    fn = tf.function(lambda t: thin_dense(t, layer), input_signature=[tf.TensorSpec([None, 12], tf.float32)])
    for rows in (4, 200):  # below and above the thin limit, one traced graph
        x = rng.normal(size=(rows, 12)).astype("float32")
        up = tf.constant(rng.normal(size=(rows, 16)).astype("float32"))
        got, ref = _grads(fn, layer, x, up), _grads(layer, layer, x, up)
        for g, r in zip([got[0], got[1]] + got[2], [ref[0], ref[1]] + ref[2]):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_thin_batches_use_the_transposed_product(monkeypatch):
    """The input gradient of a thin batch is one W·dYᵀ product (no ``transpose_b`` on dY·Wᵀ)."""
    seen = []
    real = tf.matmul

    def spy(a, b, transpose_a=False, transpose_b=False, **kw):
        seen.append((tuple(a.shape), tuple(b.shape), transpose_a, transpose_b))
        return real(a, b, transpose_a=transpose_a, transpose_b=transpose_b, **kw)

    monkeypatch.setattr(tf, "matmul", spy)
    layer = _dense(64, 48)
    x = tf.constant(np.ones((8, 48), np.float32))
    _grads(lambda t: thin_dense(t, layer), layer, x.numpy(), tf.ones((8, 64)))
    assert ((48, 64), (8, 64), False, True) in seen  # W [48,64] · dYᵀ
    assert not any(a == (8, 64) and tb for a, _, _, tb in seen)  # never dY · Wᵀ
    assert heads._thin(32, 2048, 2048) and heads._thin(256, 8192, 8192)
    assert not heads._thin(256, 384, 1536) and not heads._thin(1024, 2048, 2048)


def test_mixed_precision_follows_the_layer_dtype():
    layer = keras.layers.Dense(8, dtype="mixed_bfloat16")
    layer.build((None, 6))
    x = tf.constant(np.random.default_rng(3).normal(size=(4, 6)).astype("float32"))
    y = thin_dense(x, layer)
    assert y.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), tf.cast(layer(x), tf.float32).numpy(), atol=1e-2)


def test_expander_training_step_matches_plain_dense_layers():
    """The whole expander (both call paths) gives the Keras layers' outputs and gradients."""
    exp = ProjectionHead([32, 32, 16])
    exp.build((None, 20))
    rng = np.random.default_rng(4)
    views = [tf.constant(rng.normal(size=(6, 20)).astype("float32")) for _ in range(2)]

    def plain(v):
        x = v
        for i, dense in enumerate(exp.dense):
            x = dense(x)
            if i < len(exp.norms):
                x = keras.ops.relu(exp.norms[i](x, training=True))
        return x

    def loss_of(fn):
        with tf.GradientTape() as tape:
            outs = fn()
            loss = sum(tf.reduce_sum(tf.sin(o)) for o in outs)
        return [o.numpy() for o in outs], [g.numpy() for g in tape.gradient(loss, exp.trainable_variables)]

    ref = loss_of(lambda: [plain(v) for v in views])
    for fn in (lambda: [exp(v, training=True) for v in views], lambda: exp.call_views(views, training=True)):
        got = loss_of(fn)
        for g, r in zip(got[0] + got[1], ref[0] + ref[1]):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
