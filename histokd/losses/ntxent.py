"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen, Kornblith,
Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020), used by More From Less §2.2 with t=0.5.

For a batch of N pairs the 2N embeddings are l2-normalised; each one's positive is
its partner view and its 2N−2 negatives are every other embedding:

    ℓ(i, j) = −log exp(sim(z_i, z_j)/t) / Σ_{k≠i} exp(sim(z_i, z_k)/t),

and the loss is the mean of ℓ over all 2N anchors (both directions).
"""

from __future__ import annotations

import keras
from keras import ops

from histokd.losses._checks import check_pair
from histokd.registry import LOSSES


def nt_xent(za, zb, temperature=0.5):
    """NT-Xent loss and the pair-classification accuracy.

    Args:
        za: tensor [N, D]. Embeddings of branch a.
        zb: tensor [N, D]. Embeddings of branch b (row i pairs with row i of ``za``).
        temperature: float. t.

    Returns:
        dict with ``loss`` and ``pair_accuracy`` (fraction of anchors whose most similar
        other embedding is their partner).

    Example:
        >>> out = nt_xent(keras.random.normal((8, 16)), keras.random.normal((8, 16)))
    """
    check_pair(za, zb, "NT-Xent")
    za = ops.cast(za, "float32")
    zb = ops.cast(zb, "float32")
    n = ops.shape(za)[0]
    z = ops.concatenate([za, zb], axis=0)
    z = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    logits = ops.matmul(z, ops.transpose(z)) / temperature
    eye = ops.eye(2 * n, dtype=logits.dtype)
    logits = logits - eye * 1e9  # an anchor is never its own negative
    idx = ops.arange(2 * n)
    positives = ops.concatenate([idx[n:], idx[:n]], axis=0)
    logp = ops.log_softmax(logits, axis=1)
    onehot = ops.one_hot(positives, 2 * n, dtype=logits.dtype)
    loss = -ops.mean(ops.sum(logp * onehot, axis=1))
    acc = ops.mean(ops.cast(ops.equal(ops.argmax(logits, axis=1), positives), "float32"))
    return {"loss": loss, "pair_accuracy": acc}


@keras.saving.register_keras_serializable(package="histokd")
class NTXentLoss(keras.losses.Loss):
    """NT-Xent as a Keras loss on ``y_pred = (za, zb)`` (``y_true`` ignored).

    Args:
        temperature: float. t (0.5 in More From Less).
    """

    def __init__(self, temperature=0.5, name="nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = temperature

    def call(self, y_true, y_pred):
        za, zb = y_pred
        return nt_xent(za, zb, self.temperature)["loss"]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(temperature=self.temperature)
        return cfg


def _example_pair():
    """Two correlated embedding batches [8, 16] (registry tests)."""
    import numpy as np

    rng = np.random.default_rng(0)
    za = rng.standard_normal((8, 16)).astype("float32")
    return (za, za + 0.3 * rng.standard_normal((8, 16)).astype("float32")), {}


LOSSES.register("nt_xent", nt_xent, example=_example_pair)
LOSSES.register("simclr", nt_xent, example=_example_pair)
