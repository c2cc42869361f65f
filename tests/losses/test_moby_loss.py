"""MoBY contrastive loss and momentum schedule: hand-computed values, symmetry, errors, gradients."""

import math

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import histokd  # noqa: F401
from histokd.errors import ConfigError
from histokd.losses.moby import moby_contrastive, moby_loss
from histokd.methods.momentum import momentum_schedule
from histokd.registry import LOSSES
from harness import assert_loss_decreases


def _np_infonce(q, k, Q, t):
    """Reference written out term by term."""
    n = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    q, k, Q = n(q), n(k), n(Q)
    losses = []
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / t)
        negs = sum(math.exp(float(q[i] @ Q[j]) / t) for j in range(len(Q)))
        losses.append(-math.log(pos / (pos + negs)))
    return sum(losses) / len(losses)


def test_hand_computed_single_pair():
    # q = k = e1, one negative e2, τ = 0.5: logits (2, 0) → loss = log(1 + e^-2)
    q = np.array([[1.0, 0.0]], "float32")
    Q = np.array([[0.0, 1.0]], "float32")
    out = moby_contrastive(q, q, Q, temperature=0.5)
    assert float(out["loss"]) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert float(out["accuracy"]) == 1.0


def test_matches_reference_and_is_symmetric():
    rng = np.random.default_rng(0)
    q1, q2, k1, k2 = (rng.standard_normal((4, 8)).astype("float32") for _ in range(4))
    Q1, Q2 = (rng.standard_normal((6, 8)).astype("float32") for _ in range(2))
    got = float(moby_loss(q1, q2, k1, k2, Q1, Q2, temperature=0.2)["loss"])
    want = _np_infonce(q1, k2, Q2, 0.2) + _np_infonce(q2, k1, Q1, 0.2)
    assert got == pytest.approx(want, rel=1e-5)
    swapped = float(moby_loss(q2, q1, k2, k1, Q2, Q1, temperature=0.2)["loss"])
    assert swapped == pytest.approx(got, rel=1e-6)
    # inputs are l2-normalised inside: scaling changes nothing
    scaled = float(moby_loss(3 * q1, q2, k1, 0.5 * k2, 7 * Q1, Q2, temperature=0.2)["loss"])
    assert scaled == pytest.approx(got, rel=1e-5)


def test_no_gradient_to_keys_or_queue():
    rng = np.random.default_rng(1)
    q, k = tf.Variable(rng.standard_normal((3, 4)), dtype="float32"), tf.Variable(rng.standard_normal((3, 4)), dtype="float32")
    Q = tf.Variable(rng.standard_normal((5, 4)), dtype="float32")
    with tf.GradientTape() as tape:
        loss = moby_contrastive(q, k, Q)["loss"]
    gq, gk, gQ = tape.gradient(loss, [q, k, Q])
    assert gq is not None and np.any(gq.numpy())
    assert gk is None and gQ is None


def test_shape_errors():
    with pytest.raises(ConfigError, match="same shape"):
        moby_contrastive(np.ones((4, 8), "float32"), np.ones((3, 8), "float32"), np.ones((5, 8), "float32"))
    with pytest.raises(ConfigError, match="queue"):
        moby_contrastive(np.ones((4, 8), "float32"), np.ones((4, 8), "float32"), np.ones((5, 6), "float32"))
    with pytest.raises(ConfigError, match="temperature"):
        moby_contrastive(np.ones((4, 8), "float32"), np.ones((4, 8), "float32"), np.ones((5, 8), "float32"), 0.0)


def test_free_embeddings_lower_the_loss():
    queue1 = np.random.default_rng(2).standard_normal((16, 8)).astype("float32")
    queue2 = np.random.default_rng(3).standard_normal((16, 8)).astype("float32")

    k1, k2 = (np.random.default_rng(s).standard_normal((6, 8)).astype("float32") for s in (4, 5))

    def f(q1, q2):  # keys and queues are constants (no gradient reaches them)
        return moby_loss(q1, q2, k1, k2, queue1, queue2)["loss"]

    assert_loss_decreases(f, [(6, 8)] * 2, steps=20)


def test_momentum_schedule():
    assert float(momentum_schedule(0, 100, 0.99)) == pytest.approx(0.99, abs=1e-7)
    assert float(momentum_schedule(50, 100, 0.99)) == pytest.approx(0.995, abs=1e-7)
    assert float(momentum_schedule(100, 100, 0.99)) == pytest.approx(1.0, abs=1e-7)
    assert float(momentum_schedule(250, 100, 0.99)) == pytest.approx(1.0, abs=1e-7)  # clipped
    k = np.arange(0, 101)
    m = np.array([float(momentum_schedule(int(i), 100, 0.9)) for i in k])
    np.testing.assert_allclose(m, 1 - 0.1 * (np.cos(np.pi * k / 100) + 1) / 2, atol=1e-6)
    assert np.all(np.diff(m) >= 0)
    assert float(momentum_schedule(37, None, 0.99)) == pytest.approx(0.99)
    assert float(momentum_schedule(ops.convert_to_tensor(25), 100, 0.99)) == pytest.approx(
        1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-7)
    with pytest.raises(ConfigError):
        momentum_schedule(0, 0)


def test_registered():
    assert LOSSES.get("moby") is moby_loss
