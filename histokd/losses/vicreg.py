"""VICReg loss (Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance
Regularization for Self-Supervised Learning", ICLR 2022), as used by More From Less §2.2
with λ=25, μ=25, ν=1.

For embeddings Z, Z' of shape [N, D]:

* invariance  s(Z, Z') = 1/(N·D) Σ ||z_i − z'_i||²  (mean squared error),
* variance    v(Z) = 1/D Σ_j max(0, γ − sqrt(Var(Z_·j) + ε)), γ=1, ε=1e-4, unbiased variance,
* covariance  c(Z) = 1/D Σ_{i≠j} C(Z)_ij², C(Z) = (Z−Z̄)ᵀ(Z−Z̄)/(N−1),

loss = λ·s + μ·(v(Z) + v(Z'))/2 + ν·(c(Z) + c(Z')).

The variance term is averaged over the two branches and the covariance term summed,
exactly as the authors' reference implementation does.
"""

from __future__ import annotations

import keras
from keras import ops

from histokd.losses._checks import check_pair
from histokd.registry import LOSSES


def _var_cov(z, gamma, eps):
    """Variance and covariance terms of one branch from a single centring of ``z``.

    The diagonal of C(Z) is the unbiased per-dimension variance, which the variance term
    needs anyway; it is taken from there (Σ_i (z_ij − z̄_j)² / (N−1)) instead of from the
    matrix product, so the loss builds no [D, D] diagonal extraction — and its gradient no
    [D, D] diagonal matrix (a few per cent of the training step at D=2048; docs/benchmarks.md).
    The off-diagonal sum of squares is Σ_ij C_ij² − Σ_j C_jj², the first from
    :func:`_cov_sq_sum`.
    """
    n = ops.cast(ops.shape(z)[0], z.dtype)
    d = ops.cast(ops.shape(z)[1], z.dtype)
    zc = z - ops.mean(z, axis=0, keepdims=True)
    var = ops.sum(ops.square(zc), axis=0) / (n - 1.0)  # = diag(C(Z))
    v = ops.mean(ops.relu(gamma - ops.sqrt(var + eps)))
    c = (_cov_sq_sum(zc) / ops.square(n - 1.0) - ops.sum(ops.square(var))) / d
    return v, c


def _cov_sq_sum(zc):
    """Σ_ij ((Zcᵀ Zc)_ij)² for centred ``zc`` [N, D], through the smaller Gram matrix.

    ||ZcᵀZc||²_F = tr(ZcᵀZc ZcᵀZc) = tr(ZcZcᵀ ZcZcᵀ) = ||ZcZcᵀ||²_F: the [D, D] and [N, N]
    Gram matrices have the same non-zero eigenvalues, so the sum of squares of the
    [D, D] covariance comes exactly from the [N, N] one when the batch is smaller than
    the embedding (always, at the paper's scale: N = 128, D = 8192, where the [D, D]
    matrix alone is 256 MiB and its product 17 GFLOP, against 64 KiB and 0.3 GFLOP).
    Values and gradients are the same as the [D, D] form up to float rounding (tested).
    The [D, D] product is used when N ≥ D or N is not known when the graph is built.
    """
    n, d = zc.shape[0], zc.shape[1]
    if n is not None and d is not None and n < d:
        gram = ops.matmul(zc, ops.transpose(zc))  # [N, N]
    else:
        gram = ops.matmul(ops.transpose(zc), zc)  # [D, D]
    return ops.sum(ops.square(gram))


def vicreg_terms(za, zb, invariance=25.0, variance=25.0, covariance=1.0, gamma=1.0, eps=1e-4):
    """The three VICReg terms and the weighted total.

    Args:
        za: tensor [N, D]. Embeddings of branch a.
        zb: tensor [N, D]. Embeddings of branch b.
        invariance: float. λ. variance: float. μ. covariance: float. ν.
        gamma: float. Target standard deviation γ. eps: float. ε inside the square root.

    Returns:
        dict with ``loss`` (λ·inv + μ·var + ν·cov), ``invariance``, ``variance``,
        ``covariance`` (unweighted terms).

    Example:
        >>> t = vicreg_terms(keras.random.normal((8, 4)), keras.random.normal((8, 4)))
    """
    check_pair(za, zb, "VICReg")
    za = ops.cast(za, "float32")
    zb = ops.cast(zb, "float32")
    inv = ops.mean(ops.square(za - zb))
    var_a, cov_a = _var_cov(za, gamma, eps)
    var_b, cov_b = _var_cov(zb, gamma, eps)
    var = 0.5 * (var_a + var_b)
    cov = cov_a + cov_b
    total = invariance * inv + variance * var + covariance * cov
    return {"loss": total, "invariance": inv, "variance": var, "covariance": cov}


@keras.saving.register_keras_serializable(package="histokd")
class VICRegLoss(keras.losses.Loss):
    """VICReg as a Keras loss on ``y_pred = (za, zb)`` (``y_true`` ignored).

    Args:
        invariance: float. λ (25). variance: float. μ (25). covariance: float. ν (1).
    """

    def __init__(self, invariance=25.0, variance=25.0, covariance=1.0, name="vicreg", **kwargs):
        super().__init__(name=name, **kwargs)
        self.invariance, self.variance, self.covariance = invariance, variance, covariance

    def call(self, y_true, y_pred):
        za, zb = y_pred
        return vicreg_terms(za, zb, self.invariance, self.variance, self.covariance)["loss"]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(invariance=self.invariance, variance=self.variance, covariance=self.covariance)
        return cfg


def _example_pair():
    """Two correlated embedding batches [8, 16] (registry tests)."""
    import numpy as np

    rng = np.random.default_rng(0)
    za = rng.standard_normal((8, 16)).astype("float32")
    return (za, za + 0.3 * rng.standard_normal((8, 16)).astype("float32")), {}


LOSSES.register("vicreg", vicreg_terms, example=_example_pair)
