"""Distillation losses: KL·τ² and CE and feature terms against hand computations."""

import math

import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401
from histokd.errors import ConfigError
from histokd.losses.distillation import cross_entropy, distillation_loss, feature_alignment, kd_kl
from histokd.registry import LOSSES
from harness import assert_loss_decreases


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_hand_computed():
    # z_T = (2, 0), z_S = (0, 0), τ = 2: p_T = softmax(1, 0), p_S = (½, ½)
    pt = np.array([math.e / (math.e + 1), 1 / (math.e + 1)])
    kl = sum(p * math.log(p / 0.5) for p in pt)
    got = float(kd_kl(np.array([[2.0, 0.0]], "float32"), np.array([[0.0, 0.0]], "float32"), temperature=2.0))
    assert got == pytest.approx(4 * kl, rel=1e-6)  # × τ²
    got1 = float(kd_kl(np.array([[2.0, 0.0]], "float32"), np.array([[0.0, 0.0]], "float32"), 2.0, scale_by_t2=False))
    assert got1 == pytest.approx(kl, rel=1e-6)


def test_kd_batch_mean_direction_and_zero():
    rng = np.random.default_rng(0)
    zt, zs = rng.standard_normal((5, 4)).astype("float32"), rng.standard_normal((5, 4)).astype("float32")
    tau = 3.0
    pt, ps = _softmax(zt / tau), _softmax(zs / tau)
    want = tau ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))  # KL(T‖S), not KL(S‖T)
    assert float(kd_kl(zt, zs, tau)) == pytest.approx(want, rel=1e-5)
    reverse = tau ** 2 * np.mean(np.sum(ps * (np.log(ps) - np.log(pt)), -1))
    assert abs(want - reverse) > 1e-3
    assert float(kd_kl(zt, zt, tau)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_kl(zt, zt + 5.0, tau)) == pytest.approx(0.0, abs=1e-5)  # shift invariant


def test_cross_entropy_labels_and_onehot():
    z = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]], "float32")
    y = np.array([1, 0])
    logp = np.log(_softmax(z))
    want = -(logp[0, 1] + logp[1, 0]) / 2
    assert float(cross_entropy(y, z)) == pytest.approx(want, rel=1e-6)
    assert float(cross_entropy(y[:, None], z)) == pytest.approx(want, rel=1e-6)
    assert float(cross_entropy(np.eye(3, dtype="float32")[y], z)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ConfigError, match="labels"):
        cross_entropy(np.zeros((2, 3, 1)), z)


def test_feature_alignment_values():
    s = np.ones((2, 3, 3, 4), "float32")
    assert float(feature_alignment(s, np.zeros_like(s), "mse")) == pytest.approx(1.0)
    assert float(feature_alignment(s, 3 * s, "cosine")) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(feature_alignment(s, -s, "cosine")) == pytest.approx(2.0)
    a = np.array([[1.0, 0.0], [1.0, 1.0]], "float32")
    b = np.array([[0.0, 1.0], [1.0, 0.0]], "float32")
    assert float(feature_alignment(a, b, "cosine")) == pytest.approx(((1 - 0) + (1 - 1 / math.sqrt(2))) / 2, rel=1e-6)
    assert float(feature_alignment(a, b, "mse")) == pytest.approx((1 + 1 + 0 + 1) / 4)
    with pytest.raises(ConfigError, match="aligned"):
        feature_alignment(np.ones((2, 4, 4, 3)), np.ones((2, 2, 2, 3)))
    with pytest.raises(ConfigError, match="feature loss"):
        feature_alignment(s, s, "l1")


def test_total_equals_hand_computation():
    rng = np.random.default_rng(1)
    zs, zt = rng.standard_normal((4, 3)).astype("float32"), rng.standard_normal((4, 3)).astype("float32")
    y = np.array([0, 2, 1, 1])
    fs = [rng.standard_normal((4, 8, 8, 5)).astype("float32"), rng.standard_normal((4, 4, 4, 6)).astype("float32"),
          rng.standard_normal((4, 7)).astype("float32")]
    ft = [rng.standard_normal(f.shape).astype("float32") for f in fs]
    alphas = [0.2, 0.15, 0.1]
    tau, ce_w = 4.0, 0.5
    out = distillation_loss(zs, zt, y, fs, ft, alphas, temperature=tau, ce_weight=ce_w, feature_loss="mse")
    pt, ps = _softmax(zt / tau), _softmax(zs / tau)
    kd = tau ** 2 * np.mean(np.sum(pt * np.log(pt / ps), -1))
    ce = -np.mean(np.log(_softmax(zs))[np.arange(4), y])
    stages = [np.mean((a - b) ** 2) for a, b in zip(fs, ft)]
    feat = sum(a * d for a, d in zip(alphas, stages))
    assert float(out["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(out["ce"]) == pytest.approx(ce, rel=1e-5)
    np.testing.assert_allclose(out["stage_losses"].numpy(), stages, rtol=1e-5)
    assert float(out["feature"]) == pytest.approx(feat, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(kd + ce_w * ce + feat, rel=1e-5)
    # a zero weight switches a stage off
    off = distillation_loss(zs, zt, y, fs, ft, [0.0, 0.15, 0.1], temperature=tau, ce_weight=ce_w)
    assert float(off["feature"]) == pytest.approx(0.15 * stages[1] + 0.1 * stages[2], rel=1e-5)


def test_teacher_side_gets_no_gradient():
    rng = np.random.default_rng(2)
    zs, zt = (tf.Variable(rng.standard_normal((4, 3)).astype("float32")) for _ in range(2))
    fs, ft = (tf.Variable(rng.standard_normal((4, 2, 2, 3)).astype("float32")) for _ in range(2))
    with tf.GradientTape() as tape:
        loss = distillation_loss(zs, zt, np.array([0, 1, 2, 0]), [fs], [ft], [0.2])["loss"]
    g = tape.gradient(loss, [zs, zt, fs, ft])
    assert g[0] is not None and g[2] is not None
    assert g[1] is None and g[3] is None


def test_errors():
    z = np.zeros((2, 3), "float32")
    with pytest.raises(ConfigError, match="classes"):
        kd_kl(z, np.zeros((2, 4), "float32"))
    with pytest.raises(ConfigError, match="temperature"):
        kd_kl(z, z, temperature=0)
    with pytest.raises(ConfigError, match="labels"):
        distillation_loss(z, z, None)
    assert float(distillation_loss(z, z, None, ce_weight=0.0)["loss"]) == 0.0
    f = np.zeros((2, 4), "float32")
    with pytest.raises(ConfigError, match="one α per stage"):
        distillation_loss(z, z, np.array([0, 1]), [f, f], [f, f], [0.2])
    with pytest.raises(ConfigError, match="stages"):
        distillation_loss(z, z, np.array([0, 1]), [f], [f, f], [0.2])


def test_free_student_lowers_the_loss():
    zt = np.random.default_rng(3).standard_normal((6, 4)).astype("float32")
    ft = np.random.default_rng(4).standard_normal((6, 2, 2, 3)).astype("float32")
    y = np.array([0, 1, 2, 3, 0, 1])

    def f(zs, fs):
        return distillation_loss(zs, zt, y, [fs], [ft], [0.2])["loss"]

    assert_loss_decreases(f, [(6, 4), (6, 2, 2, 3)], steps=20)


def test_registered():
    assert LOSSES.get("distillation") is distillation_loss
    assert LOSSES.get("kd_kl") is kd_kl
