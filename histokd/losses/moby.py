"""MoBY's symmetric contrastive loss with key queues.

Xie et al., "Self-Supervised Learning with Swin Transformers" (arXiv:2105.04553,
2021), §3 (MoBY): the online branch (encoder → projector → predictor) of view 1
gives queries q₁, the momentum branch (encoder → projector) of view 2 gives keys
k₂; each query is contrasted with its own key (the positive) and with the K keys
held in a queue of past keys of the *other* view (the negatives):

    L_q(q, k, Q) = −1/N Σ_i log  exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·Q_j/τ)),

    L = L_q(q₁, k₂, Q₂) + L_q(q₂, k₁, Q₁),            τ = 0.2, K = 4096,

where Q₁ holds keys of view 1 and Q₂ keys of view 2. Queries and keys are
l2-normalised; keys and queues carry no gradient. The Swin V2 paper (Meng Li,
"Transformer-Based Self-Supervised Learning and Distillation for Medical Image
Classification", §III-A) pre-trains with this loss.
"""

from __future__ import annotations

from keras import ops

from histokd.errors import ConfigError
from histokd.registry import LOSSES


def _l2n(x):
    x = ops.cast(x, "float32")
    return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)


def _check(query, key, queue):
    sq, sk, sQ = tuple(query.shape), tuple(key.shape), tuple(queue.shape)
    if len(sq) != 2 or len(sk) != 2 or len(sQ) != 2:
        raise ConfigError(
            f"MoBY loss expects query [N, D], key [N, D] and queue [K, D]; got {sq}, {sk}, {sQ}"
        )
    if sq != sk and None not in sq + sk:
        raise ConfigError(f"MoBY loss: queries {sq} and keys {sk} must have the same shape "
                          "(one positive key per query)")
    if sq[1] is not None and sQ[1] is not None and sq[1] != sQ[1]:
        raise ConfigError(f"MoBY loss: the queue holds {sQ[1]}-d keys but the queries are "
                          f"{sq[1]}-d; give the queue the projector's output width")


def moby_contrastive(query, key, queue, temperature=0.2, normalize=True):
    """One direction of MoBY's loss: InfoNCE of queries against their keys and a queue.

    Args:
        query: tensor [N, D]. Online predictions of one view.
        key: tensor [N, D]. Momentum-branch projections of the other view (positives).
        queue: tensor [K, D]. Past keys of the other view (negatives).
        temperature: float. τ (0.2 in MoBY).
        normalize: bool. l2-normalise query, key and queue first (idempotent when they
            already are).

    Returns:
        dict with ``loss`` (mean over the N queries) and ``accuracy`` (fraction of
        queries whose positive beats every negative).

    Example:
        >>> out = moby_contrastive(q, k, queue, temperature=0.2)
    """
    _check(query, key, queue)
    if temperature <= 0:
        raise ConfigError(f"MoBY temperature must be > 0, got {temperature}")
    q = _l2n(query) if normalize else ops.cast(query, "float32")
    k = ops.stop_gradient(_l2n(key) if normalize else ops.cast(key, "float32"))
    Q = ops.stop_gradient(_l2n(queue) if normalize else ops.cast(queue, "float32"))
    pos = ops.sum(q * k, axis=-1, keepdims=True)
    neg = ops.matmul(q, ops.transpose(Q))
    logits = ops.concatenate([pos, neg], axis=1) / temperature
    logp0 = logits[:, 0] - ops.logsumexp(logits, axis=1)
    acc = ops.mean(ops.cast(ops.equal(ops.argmax(logits, axis=1), 0), "float32"))
    return {"loss": -ops.mean(logp0), "accuracy": acc}


def moby_loss(q1, q2, k1, k2, queue1, queue2, temperature=0.2, normalize=True):
    """MoBY's symmetric loss L_q(q₁, k₂, Q₂) + L_q(q₂, k₁, Q₁).

    Args:
        q1, q2: tensor [N, D]. Online predictions of view 1 and view 2.
        k1, k2: tensor [N, D]. Momentum projections of view 1 and view 2.
        queue1, queue2: tensor [K, D]. Queues of past keys of view 1 and view 2.
        temperature: float. τ (0.2 in MoBY).
        normalize: bool. l2-normalise inputs first.

    Returns:
        dict with ``loss`` (sum of both directions, as MoBY) and ``accuracy`` (mean
        of both directions' positive-key accuracies).

    Example:
        >>> terms = moby_loss(q1, q2, k1, k2, queue1, queue2)
        >>> terms["loss"]
    """
    a = moby_contrastive(q1, k2, queue2, temperature, normalize)
    b = moby_contrastive(q2, k1, queue1, temperature, normalize)
    return {"loss": a["loss"] + b["loss"], "accuracy": 0.5 * (a["accuracy"] + b["accuracy"])}


def _example():
    """Queries, keys and queues of 8 × 16-d embeddings, 32 keys per queue (registry tests)."""
    import numpy as np

    rng = np.random.default_rng(0)
    q1, q2, k1, k2 = (rng.standard_normal((8, 16)).astype("float32") for _ in range(4))
    return (q1, q2, k1, k2, rng.standard_normal((32, 16)).astype("float32"),
            rng.standard_normal((32, 16)).astype("float32")), {}


LOSSES.register("moby", moby_loss, example=_example)
