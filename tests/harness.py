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


def run_backbone_test(name, tiny_kwargs=None, input_size=None, tmp_path=None, batch=2, seed=0):
    """Every harness check on registered backbone ``name``, built small.

    Checks: pooled features ``[B, output_dim]`` (finite) and a batch axis on every stage
    output; ``get_config`` → ``from_config`` keeps every constructor argument;
    ``.keras`` save → load gives the same outputs (atol 1e-6); one optimizer step changes
    every trainable weight and nothing else.

    Args:
        name: str. Registry key (``histokd.registry.BACKBONES``).
        tiny_kwargs: dict or None. Factory options; None takes
            ``histokd.backbones.tiny_kwargs(name)``. An ``input_size`` entry is used when
            ``input_size`` is not given.
        input_size: int, tuple or None. Input size (default: the tiny kwargs', else 32).
        tmp_path: path or None. Folder for the ``.keras`` file (a temporary one if None).
        batch: int. Batch size of the random inputs.
        seed: int. Seed of the random inputs.

    Returns:
        The built backbone.

    Example:
        >>> from histokd.registry import BACKBONES
        >>> for name in BACKBONES.names():
        ...     run_backbone_test(name, tmp_path=tmp_path)
    """
    import inspect
    import tempfile
    from pathlib import Path

    from histokd.backbones import make_backbone, tiny_kwargs as registered_tiny_kwargs

    kwargs = dict(registered_tiny_kwargs(name) if tiny_kwargs is None else tiny_kwargs)
    size = kwargs.pop("input_size", 32)
    if input_size is not None:
        size = input_size
    model = make_backbone(name, size, **kwargs)
    rank = getattr(model, "spatial_rank", 2)
    spatial = tuple(s if s is not None else (size if isinstance(size, int) else 32)
                    for s in model.input_size)
    assert len(spatial) == rank, f"{name}: input_size {model.input_size} does not have spatial_rank {rank} axes"
    channels = model.inputs[0].shape[-1] or 3
    x = np.random.default_rng(seed).uniform(0.0, 1.0, (batch,) + spatial + (channels,)).astype("float32")

    pooled = ops.convert_to_numpy(model(x, training=False))
    assert pooled.shape == (batch, model.output_dim), (
        f"{name}: pooled features have shape {pooled.shape}, expected {(batch, model.output_dim)}")
    assert np.all(np.isfinite(pooled)), f"{name}: pooled features are not finite"
    assert model.stage_names, f"{name}: no stage_names"
    for stage, out in model.feature_model()(x, training=False).items():
        assert int(out.shape[0]) == batch, f"{name}: stage {stage!r} lost the batch axis ({out.shape})"

    cfg = model.get_config()
    params = [p for p, v in inspect.signature(type(model).__init__).parameters.items()
              if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    missing = [p for p in params if p not in cfg]
    assert not missing, f"{name}: get_config() lacks constructor argument(s) {missing}"
    clone = type(model).from_config(cfg)
    clone_cfg = clone.get_config()
    for p in params:
        assert clone_cfg[p] == cfg[p], f"{name}: argument {p!r} is {clone_cfg[p]!r} after from_config, was {cfg[p]!r}"
    # (a functional Backbone's config gains its layer graph once rebuilt; shared keys must agree)
    differ = sorted(k for k in set(cfg) & set(clone_cfg) if clone_cfg[k] != cfg[k])
    assert not differ, f"{name}: config entries {differ} change in a from_config round trip"
    assert [l.name for l in clone.layers] == [l.name for l in model.layers], f"{name}: from_config renamed layers"
    assert clone.count_params() == model.count_params(), f"{name}: from_config built another architecture"

    if tmp_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            assert_saved_model_roundtrip(model, x, Path(tmp), atol=1e-6)
    else:
        assert_saved_model_roundtrip(model, x, Path(tmp_path), atol=1e-6)
    # a loss linear in the features: mean(square(.)) of a LayerNorm'ed feature is ~constant
    direction = np.random.default_rng(seed + 1).standard_normal((batch, model.output_dim)).astype("float32")
    assert_trains_only_trainable(model, x, targets=direction,
                                 loss_fn=lambda t, y: ops.mean(ops.convert_to_tensor(t) * y))
    return model
