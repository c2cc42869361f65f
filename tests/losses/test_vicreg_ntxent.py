"""VICReg and NT-Xent on hand-computed cases."""

import math

import numpy as np
import pytest
import keras
from keras import ops

import histokd  # noqa: F401
from histokd.errors import ConfigError
from histokd.losses import NTXentLoss, VICRegLoss, nt_xent, vicreg_terms
from harness import assert_config_roundtrip, assert_loss_decreases


def test_vicreg_hand_computed():
    za = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], "float32")
    zb = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], "float32")
    t = {k: float(v) for k, v in vicreg_terms(za, zb).items()}
    # invariance: squared diffs (0,1),(0,0),(0,1) → 2 / 6
    assert t["invariance"] == pytest.approx(2 / 6, rel=1e-6)
    # each column of za and zb is {1,0,1} or {0,1,1}: unbiased var = 1/3 → std = sqrt(1/3 + 1e-4)
    std = math.sqrt(1 / 3 + 1e-4)
    assert t["variance"] == pytest.approx(1 - std, rel=1e-5)
    # za: cov off-diagonal = sum((x-2/3)(y-2/3))/2 = (1/3·-2/3 + -2/3·1/3 + 1/3·1/3)/2 = -1/6;
    # off-diag squared sum = 2·(1/36), / D=2 → 1/36, for each branch (zb is za with columns swapped/perm)
    assert t["covariance"] == pytest.approx(2 / 36, rel=1e-5)
    assert t["loss"] == pytest.approx(25 * (2 / 6) + 25 * (1 - std) + 1 * (2 / 36), rel=1e-5)


def test_vicreg_symmetric_and_zero_invariance():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 16, 8)).astype("float32")
    ab = float(vicreg_terms(a, b)["loss"])
    ba = float(vicreg_terms(b, a)["loss"])
    assert ab == pytest.approx(ba, rel=1e-6)
    assert float(vicreg_terms(a, a)["invariance"]) == 0.0


@pytest.mark.parametrize("n,d", [(32, 64), (80, 16), (16, 16)])  # [N,N] Gram, [D,D], [D,D]
def test_vicreg_matches_masked_covariance_formula_values_and_gradients(n, d):
    """The covariance diagonal comes from the variances and Σ C² from the smaller Gram
    matrix; check both against the textbook C ⊙ (1 − I) on the [D, D] covariance."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    a = tf.constant(rng.standard_normal((n, d)).astype("float32"))
    b = tf.constant((rng.standard_normal((n, d)) * 0.3 + 0.1).astype("float32"))
    off_mask = 1.0 - tf.eye(d)

    def reference(za, zb):
        def var_cov(z):
            zc = z - tf.reduce_mean(z, 0, keepdims=True)
            cov = tf.matmul(zc, zc, transpose_a=True) / float(n - 1)
            std = tf.sqrt(tf.linalg.diag_part(cov) + 1e-4)
            return tf.reduce_mean(tf.nn.relu(1.0 - std)), tf.reduce_sum(tf.square(cov * off_mask)) / float(d)
        va, ca = var_cov(za)
        vb, cb = var_cov(zb)
        return 25.0 * tf.reduce_mean(tf.square(za - zb)) + 25.0 * 0.5 * (va + vb) + (ca + cb)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch([a, b])
        ours = vicreg_terms(a, b)["loss"]
        ref = reference(a, b)
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    for g_ours, g_ref in zip(tape.gradient(ours, [a, b]), tape.gradient(ref, [a, b])):
        np.testing.assert_allclose(g_ours.numpy(), g_ref.numpy(), rtol=1e-4, atol=1e-6)


def test_covariance_square_sum_through_the_smaller_gram_matrix():
    """||ZᵀZ||²_F = ||ZZᵀ||²_F, and the [N, N] product is the one built when N < D."""
    import tensorflow as tf

    from histokd.losses.vicreg import _cov_sq_sum

    rng = np.random.default_rng(4)
    z = rng.standard_normal((8, 300))
    expected = float(np.sum((z.T @ z) ** 2))
    assert float(_cov_sq_sum(tf.constant(z, tf.float32))) == pytest.approx(expected, rel=1e-5)
    graph = tf.function(_cov_sq_sum).get_concrete_function(tf.TensorSpec((8, 300), tf.float32)).graph
    shapes = [tuple(op.outputs[0].shape) for op in graph.get_operations()
              if op.type in ("MatMul", "BatchMatMulV2", "BatchMatMulV3")]
    assert shapes == [(8, 8)]


def test_ntxent_hand_computed():
    # two orthogonal pairs: z1 = z1' = e1, z2 = z2' = e2, t = 0.5
    za = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
    zb = za.copy()
    t = 0.5
    # each anchor: positive sim 1 → e^{2}; negatives: the other pair (sim 0) twice → 2·e^0
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 2.0))
    out = nt_xent(za, zb, temperature=t)
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(out["pair_accuracy"]) == 1.0
    # scale invariance (embeddings are normalised)
    assert float(nt_xent(3 * za, zb, t)["loss"]) == pytest.approx(expected, rel=1e-6)


def test_ntxent_symmetric_in_branches():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 10, 5)).astype("float32")
    assert float(nt_xent(a, b)["loss"]) == pytest.approx(float(nt_xent(b, a)["loss"]), rel=1e-6)


@pytest.mark.parametrize("fn", [vicreg_terms, nt_xent])
def test_batch_of_one_and_mismatch_rejected(fn):
    with pytest.raises(ConfigError, match="at least 2"):
        fn(np.ones((1, 4), "float32"), np.ones((1, 4), "float32"))
    with pytest.raises(ConfigError, match="width"):
        fn(np.ones((4, 4), "float32"), np.ones((4, 3), "float32"))


@pytest.mark.parametrize("fn", [lambda a, b: vicreg_terms(a, b)["loss"], lambda a, b: nt_xent(a, b)["loss"]])
def test_losses_decrease_on_free_embeddings(fn):
    assert_loss_decreases(fn, [(16, 8), (16, 8)], steps=20)


def test_loss_objects_roundtrip():
    v = assert_config_roundtrip(VICRegLoss(invariance=10.0))
    assert v.invariance == 10.0
    n = assert_config_roundtrip(NTXentLoss(temperature=0.2))
    assert n.temperature == 0.2
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 8, 4)).astype("float32")
    assert float(VICRegLoss().call(None, (a, b))) == pytest.approx(float(vicreg_terms(a, b)["loss"]), rel=1e-6)
