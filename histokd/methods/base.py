"""The ``Method`` base class: what every training method shares, and the hooks the runner calls.

A method is a ``keras.Model`` whose ``fit`` trains it. This base owns what the methods
would otherwise repeat — metric trackers fed from a dict of loss terms, one train and
one test step (loss scaling, the cross-replica rule below), (de)serialisation of nested
models, and the class-level hooks through which ``histokd train``, config validation and
evaluation use a method without ever comparing its name:

===============================  =====================================================
hook                             meaning
===============================  =====================================================
``Config`` / ``config_section``  the method's own YAML section (a dataclass), validated
                                 like every other section
``validate_run_config(cfg)``     cross-section checks (raise ``ConfigError``)
``from_run_config(cfg, ...)``    build the method a run config describes
``batch_inputs``                 the batch keys a step needs (``view_a``/``view_b``, ``image``)
``branch_input_kinds(cfg)``      which input each exported encoder reads
``compile_defaults(cfg)``        extra ``compile`` arguments (loss, metrics)
``cpu_streams``                  independent kernel chains of a step (CPU thread plan)
``supports_device_augment``      whether views may be made inside the step
``cross_replica``                how the loss relates to the global batch (below)
===============================  =====================================================

Instance hooks: ``compute_terms`` (the loss terms of a batch; required),
``before_step``/``after_step`` (work outside the gradient tape: momentum updates,
queues), ``branch_encoders()`` (encoders to evaluate and export), ``trained_heads()``
(classifier heads trained with the method) and ``evaluation_model()`` (the model the
task evaluates — a distiller's student).

**Cross-replica rule.** Under a distribution strategy every replica runs the step on
its slice of the global batch and the optimizer sums the replicas' gradients. A method
declares one of two kinds of loss:

* ``cross_replica = "global"``: the loss is a statistic of the *global* batch, computed
  from embeddings gathered from every replica with :func:`gather_across_replicas`
  (VICReg, NT-Xent, MoBY). Each replica's value equals the single-device loss; the
  gathered tensors of the other replicas are constants, so each replica's gradient is
  the partial derivative through its own samples and their sum is the single-device
  gradient. The loss is not rescaled.
* ``cross_replica = "mean"``: the loss is a mean over this replica's examples
  (cross-entropy, distillation). It is divided by the number of replicas before
  differentiation, so the summed gradients are those of the global mean.

Logged values are the unscaled terms, averaged over replicas and batches.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from keras import ops

from histokd.errors import ConfigError


def gather_across_replicas(z):
    """Concatenate ``z`` from every replica along the batch axis, keeping gradients local.

    Batch-statistic losses (VICReg, NT-Xent, MoBY) must see the global batch so a
    run on R replicas optimises the same loss as one device. The other replicas'
    embeddings enter as constants and this replica's own slice stays live (see the
    cross-replica rule in the module docstring).

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


def build_encoder(cfg, name: str, backbone: str | None = None):
    """The encoder ``cfg.model`` describes (``model.backbone`` or ``backbone``), named ``name``.

    Args:
        cfg: RunConfig.
        name: str. Layer name, unique per branch so several encoders live in one model.
        backbone: str. Registered backbone to build instead of ``model.backbone``.
    """
    from histokd.backbones import make_backbone

    enc = make_backbone(backbone or cfg.model.backbone, input_size=cfg.data.image_size,
                        weights=cfg.model.weights, **dict(cfg.model.backbone_kwargs))
    enc.name = name
    return enc


def image_shape(cfg) -> tuple:
    """``(H, W, 3)`` (or ``(D, H, W, C)``) of the working size ``data.image_size``."""
    size = cfg.data.image_size
    sides = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return tuple(int(s) for s in sides) + (3,)


#: ``--set`` overrides of the packaged ``default`` config that make a run tiny: 32-px synthetic
#: tiles, a ResNet-18 of width 1/8, batches of 8 (tests and smoke runs of every method)
TINY_OVERRIDES = [
    "data.source=synthetic", "data.path=null", "data.test_path=null", "data.image_size=32",
    "data.synthetic_per_class=8", "data.synthetic_classes=3", "data.stain.method=none",
    "model.backbone=resnet18", "model.backbone_kwargs={width: 0.125, small_input: true}", "model.weights=null",
    "train.batch_size=8", "train.epochs=1", "train.verbose=0", "eval.probe_epochs=2", "eval.embedding_plot=false",
]
TINY_CLASSES = 3


def tiny_run_config(method: str, workdir, extra=()):
    """A validated tiny run config of the registered ``method`` (:data:`TINY_OVERRIDES`,
    then the method's own :meth:`Method.tiny_overrides`, then ``extra``), writing to ``workdir``.

    Example:
        >>> cfg = tiny_run_config("vicreg", "/tmp/smoke")
    """
    from histokd.config import load_config
    from histokd.registry import METHODS

    cls = METHODS.get(method)
    over = TINY_OVERRIDES + [f"model.method={method}", f"output_dir={workdir}", f"name=tiny_{method}"]
    return load_config("default", over + list(cls.tiny_overrides(workdir)) + list(extra))


class Method(keras.Model):
    """Base class of the training methods (see the module docstring for the hooks).

    A subclass implements :meth:`compute_terms` (and :meth:`from_run_config` to be usable
    from a YAML config), calls :meth:`track` with the names of the terms it logs, and
    registers itself: ``METHODS.register("name", MyMethod)``.

    Example:
        >>> class MeanFeature(Method):
        ...     batch_inputs = ("image",)
        ...     def __init__(self, encoder, **kw):
        ...         super().__init__(**kw)
        ...         self.encoder = encoder
        ...         self.track("loss")
        ...     def compute_terms(self, x, y, sample_weight=None, training=False):
        ...         return {"loss": ops.mean(ops.square(self.encoder(x["image"], training=training)))}
    """

    #: dataclass of the method's YAML section (None: the method has no section)
    Config = None
    #: name of that section in the run config
    config_section: str | None = None
    #: batch keys a step needs; the view kind must yield them
    batch_inputs: tuple = ("view_a", "view_b")
    #: independent kernel chains of a step (2: one encoder chain per view)
    cpu_streams: int = 1
    #: whether ``views.augment_on: device`` (views made inside the step) is supported
    supports_device_augment: bool = False
    #: "global" (loss of gathered embeddings) or "mean" (mean over this replica's slice)
    cross_replica: str = "mean"
    #: constructor arguments holding Keras objects, (de)serialised by the base
    nested: tuple = ()
    #: constructor arguments for pre-built parts that ``get_config`` leaves out because the
    #: other arguments rebuild them (e.g. expanders from their widths)
    rebuilt_args: tuple = ()

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.view_maker = None  # views.augment_on=device: views are made inside the step (not saved)
        self._trackers = {}

    # -- class hooks -----------------------------------------------------------------------
    @classmethod
    def section(cls, cfg):
        """This method's section of ``cfg`` (an instance of :attr:`Config`), or None."""
        return getattr(cfg, cls.config_section) if cls.config_section else None

    @classmethod
    def validate_run_config(cls, cfg):
        """Cross-section checks of a run config that uses this method; raise ``ConfigError``."""

    @classmethod
    def from_run_config(cls, cfg, num_classes: int, total_steps: int | None = None):
        """The method a run config describes (not compiled).

        Args:
            cfg: RunConfig.
            num_classes: int. Classes of the labelled task.
            total_steps: int. Optimizer steps of the whole run (schedules); None when
                only rebuilding to load weights.
        """
        raise NotImplementedError(f"{cls.__name__} cannot be built from a run config")

    @classmethod
    def tiny_overrides(cls, workdir) -> list:
        """``--set`` overrides that make a tiny instance of this method on top of a tiny
        config (tests run every registered method this way; ``workdir`` is a scratch
        folder for whatever the method needs on disk, e.g. a teacher run)."""
        return []

    @classmethod
    def compile_defaults(cls, cfg) -> dict:
        """Extra ``compile`` keyword arguments (e.g. ``loss``, ``metrics``) for a run."""
        return {}

    @classmethod
    def branch_input_kinds(cls, cfg) -> dict:
        """``{branch: input kind}`` of the encoders :meth:`branch_encoders` returns, as the
        view kind feeds them (``full``, ``downsampled`` or ``mask``)."""
        from histokd.registry import VIEWS

        return VIEWS.get(cfg.views.kind).branch_inputs(cfg)

    # -- metrics ---------------------------------------------------------------------------
    def track(self, *names):
        """Create a ``Mean`` tracker for each named loss term (logged as ``name``)."""
        for name in names:
            if name not in self._trackers:
                self._trackers[name] = keras.metrics.Mean(name=name)

    @property
    def metrics(self):
        mine = list(self._trackers.values())
        ids = {id(m) for m in mine}
        # compiled metrics (accuracy, ...) after the trackers; Keras' own loss tracker is ours
        rest = [m for m in super().metrics if id(m) not in ids and m.name != "loss"]
        return mine + rest

    def update_metrics(self, terms, x=None, y=None, sample_weight=None):
        """Feed the trackers from ``terms`` and the compiled metrics from ``terms["y_pred"]``."""
        for name, tracker in self._trackers.items():
            tracker.update_state(terms[name])
        if y is not None and "y_pred" in terms and self.compiled:
            return self.compute_metrics(x, y, terms["y_pred"], sample_weight=sample_weight)
        return self.get_metrics_result()

    # -- steps -----------------------------------------------------------------------------
    def compute_terms(self, x, y, sample_weight=None, training=False, state=None) -> dict:
        """Loss terms of a batch: a dict with ``loss`` (the value to minimise), every
        tracked term, and optionally ``y_pred`` (predictions for compiled metrics).

        Args:
            x: the batch's inputs (a dict with :attr:`batch_inputs`, or images).
            y: labels or None.
            sample_weight: per-example weights or None.
            training: bool.
            state: what :meth:`before_step` returned.
        """
        raise NotImplementedError

    def before_step(self, x, y, training=True):
        """Work before the gradient tape opens (no gradient: momentum updates, targets);
        the result reaches :meth:`compute_terms` and :meth:`after_step` as ``state``.
        ``training`` is False in ``test_step``, where it must not change any state."""
        return None

    def after_step(self, x, y, terms, state):
        """Work after the optimizer step (queue updates, ...)."""

    def _views(self, x, y):
        if self.view_maker is not None and not (isinstance(x, dict) and all(k in x for k in self.batch_inputs)):
            x, _ = self.view_maker(x, y)  # views.augment_on: device — made inside the step
        return x

    def train_step(self, data):
        x, y, sw = unpack(data)
        x = self._views(x, y)
        state = self.before_step(x, y, training=True)
        with tf.GradientTape() as tape:
            terms = self.compute_terms(x, y, sample_weight=sw, training=True, state=state)
            loss = terms["loss"]
            if self.cross_replica == "mean":
                loss = loss / num_replicas()
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables  # after the forward pass: it builds lazy layers
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        self.after_step(x, y, terms, state)
        return self.update_metrics(terms, x, y, sw)

    def test_step(self, data):
        x, y, sw = unpack(data)
        x = self._views(x, y)
        state = self.before_step(x, y, training=False)
        terms = self.compute_terms(x, y, sample_weight=sw, training=False, state=state)
        return self.update_metrics(terms, x, y, sw)

    # -- evaluation and export -------------------------------------------------------------
    def branch_encoders(self) -> dict:
        """``{branch: encoder}`` to evaluate and export."""
        return {"encoder": self.encoder}

    def trained_heads(self) -> dict:
        """``{branch: head}`` classifier heads trained with the method (a supervised
        head); branches without one are evaluated with a linear probe."""
        return {}

    def evaluation_model(self):
        """The model whose encoders the task evaluates and exports."""
        return self

    # -- serialisation ---------------------------------------------------------------------
    def serialize_nested(self, **objects) -> dict:
        """``get_config`` entries for nested Keras objects (None stays None)."""
        ser = keras.saving.serialize_keras_object
        return {k: None if v is None else ser(v) for k, v in objects.items()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        for key in cls.nested:
            if config.get(key) is not None:
                config[key] = de(config[key])
        return cls(**config)


def config_fields(obj) -> dict:
    """A method section's fields as a dict (``dataclasses.asdict``)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj or {})


__all__ = ["Method", "TINY_CLASSES", "TINY_OVERRIDES", "build_encoder", "tiny_run_config", "config_fields", "gather_across_replicas", "image_shape", "normalized_std",
           "num_replicas", "synchronize_batchnorm", "unpack"]
