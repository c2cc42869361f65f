"""Pieces shared by the methods: cross-replica gathering and small utilities.

TensorFlow-specific on purpose: gathering across replicas needs ``tf.distribute``.
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from histokd.runtime import available_cpus, kernel_slots, kernels_side_by_side, mirrored_strategy  # noqa: F401


def gather_across_replicas(z):
    """Concatenate ``z`` from every replica along the batch axis, keeping gradients local.

    Batch-statistic losses (VICReg, NT-Xent, MoBY) must see the global batch so a
    run on R replicas optimises the same loss as one device. The other replicas'
    embeddings enter as constants and this replica's own slice stays live, so each
    replica's gradient is the partial derivative through its own samples; the
    optimizer's all-reduce SUM of those partials is exactly the single-device
    gradient of the global-batch loss.

    Args:
        z: tensor [n, D]. This replica's embeddings.

    Returns:
        tensor [R·n, D] in replica order (identical on every replica).
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return z
    everyone = ctx.all_gather(tf.stop_gradient(z), axis=0)
    n = tf.shape(z)[0]
    rid = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return tf.concat([everyone[: rid * n], z, everyone[(rid + 1) * n:]], axis=0)


def num_replicas():
    ctx = tf.distribute.get_replica_context()
    return 1 if ctx is None else ctx.num_replicas_in_sync


def normalized_std(z):
    """Mean per-dimension std of l2-normalised embeddings, times sqrt(D).

    ≈1 for embeddings spread over the sphere, → 0 when they collapse to a point
    (the collapse monitor of VICReg's appendix and SimSiam's §4).
    """
    z = ops.cast(z, "float32")
    zn = z / ops.maximum(ops.norm(z, axis=1, keepdims=True), 1e-12)
    d = ops.cast(ops.shape(z)[1], "float32")
    return ops.mean(ops.std(zn, axis=0)) * ops.sqrt(d)


def unpack(data):
    """(x, y, sample_weight) from whatever a dataset yields."""
    if isinstance(data, (tuple, list)):
        if len(data) == 1:
            return data[0], None, None
        if len(data) == 2:
            return data[0], data[1], None
        return data[0], data[1], data[2]
    return data, None, None


def synchronize_batchnorm(model):
    """Make every BatchNormalization layer of ``model`` compute cross-replica statistics.

    Under MirroredStrategy each replica sees only its slice of the global batch; with
    synchronized statistics BatchNorm normalises with the global-batch moments, so R
    replicas train exactly as one device on the same global batch. Returns the count.
    """
    import keras

    n = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
            n += 1
    return n


def _all_layers(obj):
    seen = set()
    stack = [obj]
    while stack:
        cur = stack.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        for attr in ("layers", "_layers"):
            sub = getattr(cur, attr, None)
            if isinstance(sub, (list, tuple)):
                stack.extend(sub)
        for v in list(vars(cur).values()) if hasattr(cur, "__dict__") else []:
            if hasattr(v, "built") and hasattr(v, "weights") and id(v) not in seen:
                stack.append(v)
            elif isinstance(v, (list, tuple)):
                stack.extend(x for x in v if hasattr(x, "built") and hasattr(x, "weights"))
