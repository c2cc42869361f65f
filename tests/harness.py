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


def assert_config_roundtrip_full(obj):
    """``get_config`` holds every constructor argument (except those the class lists in
    ``rebuilt_args``: pre-built parts its config rebuilds), and ``from_config`` rebuilds an
    object whose config is identical — nested Keras objects (the class's ``nested``
    arguments) compared by class, their weights by the ``.keras`` round trip."""
    import inspect

    cfg = obj.get_config()
    skip = set(getattr(type(obj), "rebuilt_args", ()))
    params = [p for p in inspect.signature(type(obj).__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in skip]
    missing = [p.name for p in params if p.name not in cfg]
    assert not missing, f"{type(obj).__name__}.get_config() lacks constructor arguments {missing}"
    clone = type(obj).from_config(cfg)
    again = clone.get_config()
    nested = set(getattr(type(obj), "nested", ()))

    def brief(v):
        return v.get("class_name") if isinstance(v, dict) else v

    diff = sorted(k for k in set(cfg) | set(again)
                  if (brief(cfg.get(k)) != brief(again.get(k)) if k in nested else cfg.get(k) != again.get(k)))
    assert not diff, f"{type(obj).__name__} config does not round-trip: keys {diff} differ"
    return clone


def tiny_method(name, workdir, extra=()):
    """``(method, batch, cfg)``: the registered method ``name`` built from its tiny run config,
    compiled with its defaults, and one batch of its views (random uint8 tiles, random labels)."""
    import tensorflow as tf

    from histokd.data.datasets import make_views
    from histokd.methods.base import TINY_CLASSES, tiny_run_config
    from histokd.registry import METHODS

    cls = METHODS.get(name)
    cfg = tiny_run_config(name, workdir, extra)
    model = cls.from_run_config(cfg, num_classes=TINY_CLASSES, total_steps=20)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), **cls.compile_defaults(cfg))
    rng = np.random.default_rng(0)
    size = cfg.data.image_size
    images = tf.constant(rng.integers(0, 256, (cfg.train.batch_size, size, size, 3), dtype=np.uint8))
    labels = tf.constant(np.arange(cfg.train.batch_size) % TINY_CLASSES, tf.int32)
    views, labels = make_views(cfg, training=True)(images, labels)
    return model, (views, labels), cfg


def run_method_test(model, batch, tmp_path, steps=12):
    """What every method must do (ARCHITECTURE.md, tests): every trainable weight gets a
    gradient; ``fit`` on a few tiny batches gives a finite loss that falls; the optimizer
    touches no non-trainable (frozen, momentum, teacher) variable; a ``.keras`` round trip
    gives identical outputs.

    Args:
        model: a compiled :class:`histokd.methods.base.Method`.
        batch: ``(inputs, labels)`` of the method's views.
        tmp_path: pathlib.Path. Scratch folder for the ``.keras`` file.
        steps: int. Optimizer steps of the fit.
    """
    import tensorflow as tf

    x, y = batch
    state = model.before_step(x, y, training=False)
    with tf.GradientTape() as tape:
        loss = model.compute_terms(x, y, training=True, state=state)["loss"]
    grads = tape.gradient(loss, model.trainable_variables)
    bad = [v.path for v, g in zip(model.trainable_variables, grads)
           if g is None or not np.any(ops.convert_to_numpy(g))]
    assert not bad, f"no (or all-zero) gradient reaches: {bad[:10]}"
    assert np.isfinite(float(loss)), f"loss is not finite: {float(loss)}"

    ds = tf.data.Dataset.from_tensors((x, y)).repeat(steps)
    hist = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    per_step = model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(2), epochs=2, verbose=0, shuffle=False)
    first, last = hist.history["loss"][0], per_step.history["loss"][-1]
    assert np.isfinite(first) and np.isfinite(last), f"non-finite loss: {first} -> {last}"
    assert last < first, f"loss did not fall over {steps + 4} steps: {first} -> {last}"
    opt_ids = {id(v) for v in model.optimizer._trainable_variables}
    touched = [v.path for v in model.non_trainable_variables if id(v) in opt_ids]
    assert not touched, f"the optimizer updates non-trainable variables: {touched[:10]}"
    trainable_ids = {id(v) for v in model.trainable_variables}
    assert opt_ids <= trainable_ids, "the optimizer holds variables that are not the method's trainable ones"
    assert_saved_model_roundtrip(model, x, tmp_path)
    return hist


def assert_mirrored_matches_one_device(make_model, batch, loss_atol=1e-5, grad_rtol=1e-4, devices=None):
    """One SGD step of ``make_model()`` under ``MirroredStrategy`` on 2 logical CPUs gives the
    same loss and the same weight update as on one device (the cross-replica rule).

    Args:
        make_model: callable returning a built, uncompiled method (seeded: both calls must
            build the same initial weights).
        batch: ``(inputs, labels)``; the global batch (split over the replicas).
        loss_atol: float. Tolerance of the loss.
        grad_rtol: float. Tolerance of each weight's update, relative to the largest update.
        devices: list of str. Devices to mirror over (default: the first two logical CPUs).
    """
    import tensorflow as tf

    from histokd.methods.base import synchronize_batchnorm
    from histokd.runtime import mirrored_strategy

    def one(strategy):
        with strategy.scope():
            model = make_model()
            if strategy.num_replicas_in_sync > 1:
                synchronize_batchnorm(model)
            model.compile(optimizer=keras.optimizers.SGD(0.1), **type(model).compile_defaults(None))
        w0 = [ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
        logs = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False).history
        step = [ops.convert_to_numpy(w) - a for w, a in zip(model.trainable_weights, w0)]
        return logs["loss"][0], step

    cpus = devices or [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    assert len(cpus) == 2, "needs two logical CPU devices (tests/conftest.py makes them)"
    loss1, step1 = one(tf.distribute.OneDeviceStrategy(cpus[0]))
    loss2, step2 = one(mirrored_strategy(cpus))
    assert abs(loss1 - loss2) <= loss_atol * max(1.0, abs(loss1)), f"loss {loss1} (one device) != {loss2} (mirrored)"
    scale = max(float(np.abs(s).max()) for s in step1) or 1.0
    for i, (a, b) in enumerate(zip(step1, step2)):
        assert np.abs(a - b).max() <= grad_rtol * scale, f"update of weight {i} differs under MirroredStrategy"


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
