"""MoBY self-supervised pre-training: MoCo v2's momentum encoder and queues + BYOL's predictor.

Xie et al., "Self-Supervised Learning with Swin Transformers" (arXiv:2105.04553,
2021), §3: an *online* encoder followed by a projector and a predictor, and a
*target* encoder + projector that is an exponential moving average (EMA) of the
online ones, with momentum rising from 0.99 to 1 on a cosine schedule; two queues
(one per view) of past target keys supply the negatives of a symmetric contrastive
loss with temperature 0.2 and 4096 keys per queue. Projector and predictor are
2-layer MLPs with BatchNorm (hidden 4096, output 256). The Swin V2 paper (Meng Li,
"Transformer-Based Self-Supervised Learning and Distillation for Medical Image
Classification", §III-A) pre-trains Swin V2 this way before fine-tuning and
distillation.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from histokd.errors import ConfigError
from histokd.layers.heads import ProjectionHead
from histokd.losses.moby import moby_loss
from histokd.methods.base import Method, build_encoder, gather_across_replicas, image_shape
from histokd.methods.momentum import MomentumTeacher, clone_fresh, momentum_schedule
from histokd.registry import METHODS


def _l2n(x):
    return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), 1e-12)


def _build_on(layer, shape):
    """Create ``layer``'s weights by a symbolic call on inputs of ``shape`` (batch excluded)."""
    if not layer.built:
        layer(keras.Input(shape=shape))
    return layer


@dataclasses.dataclass
class MoBYConfig:
    """MoBY pre-training (Xie et al. 2021, "Self-Supervised Learning with Swin Transformers"),
    used by the Swin V2 paper (§III-A) before fine-tuning; YAML section ``moby``.

    Args:
        hidden_dim, out_dim: int. Projector/predictor widths (MoBY: 4096, 256).
        proj_layers, pred_layers: int. Dense layers of projector and predictor (MoBY: 2).
        temperature: float. Contrastive temperature τ (MoBY: 0.2).
        queue_size: int. Keys per queue K (MoBY: 4096); at least the global batch size.
        base_momentum: float. Start of the momentum schedule, which rises to 1 (MoBY: 0.99).
    """

    hidden_dim: int = 4096
    out_dim: int = 256
    proj_layers: int = 2
    pred_layers: int = 2
    temperature: float = 0.2
    queue_size: int = 4096
    base_momentum: float = 0.99


@keras.saving.register_keras_serializable(package="histokd")
class MoBY(Method):
    """MoBY: online encoder + projector + predictor, momentum target, two key queues.

    ``fit`` trains it on a dataset yielding ``({"view_a": x1, "view_b": x2}, labels)``
    (labels ignored; images float32 in [0, 1]). Each step, in MoBY's order:

    1. momentum update of the target encoder and projector,
       ``θ_t ← m·θ_t + (1 − m)·θ_o`` with ``m = momentum_schedule(k, total_steps, m₀)``
       and ``k = optimizer.iterations`` (updates done so far);
    2. keys ``k₁, k₂`` (l2-normalised target projections, no gradient) and queries
       ``q₁, q₂`` (l2-normalised online predictions);
    3. loss ``L_q(q₁, k₂, Q₂) + L_q(q₂, k₁, Q₁)`` (see :func:`histokd.losses.moby.moby_loss`),
       one optimizer step on the online encoder, projector and predictor only;
    4. dequeue/enqueue: the batch's keys overwrite the oldest rows of ``Q₁`` (keys of
       view a) and ``Q₂`` (keys of view b), a ring buffer with pointer ``queue_ptr``.

    The target's variables are not trainable (the optimizer never sees them); its
    BatchNorm layers still use batch statistics in training, as in MoBY. Under a
    distribution strategy queries and keys are gathered across replicas, so loss,
    gradients and queues equal the single-device run on the same global batch.
    Logged: ``loss``, ``accuracy`` (positive-key accuracy), ``momentum``.

    Args:
        encoder: keras.Model. Backbone, images in [0, 1] → pooled features [B, F].
        image_shape: tuple. (H, W, C) used to build the encoder when it is not built
            (default: the encoder's input shape).
        hidden_dim: int. Projector/predictor hidden width (MoBY: 4096).
        out_dim: int. Projection width (MoBY: 256).
        proj_layers, pred_layers: int. Dense layers of projector and predictor (MoBY: 2).
        temperature: float. τ (MoBY: 0.2).
        queue_size: int. Keys per queue, K (MoBY: 4096); must be ≥ the global batch.
        base_momentum: float. m₀ (MoBY: 0.99).
        total_steps: int or None. Steps of the whole run, the schedule's K; None keeps
            m = m₀ (set it, e.g. ``epochs × steps_per_epoch``, to follow MoBY).
        synchronized_bn: bool. Cross-replica BatchNorm in projector/predictor (MoBY: SyncBN).
        target_training: bool. Run the target in training mode (batch-statistic BN,
            MoBY's behaviour) or inference mode.
        seed: int. Seed of the random initial queues.

    Example:
        >>> moby = MoBY(encoder, hidden_dim=4096, out_dim=256, queue_size=4096, total_steps=10_000)
        >>> moby.compile(optimizer=keras.optimizers.AdamW(1e-3))
        >>> moby.fit(pair_dataset, epochs=1)
        >>> moby.encoder.save("online_encoder.keras")
    """

    Config = MoBYConfig
    config_section = "moby"
    cpu_streams = 2  # one encoder chain per view: the CPU thread plan runs them side by side
    cross_replica = "global"
    nested = ("encoder",)

    def __init__(self, encoder, image_shape=None, hidden_dim=4096, out_dim=256, proj_layers=2, pred_layers=2,
                 temperature=0.2, queue_size=4096, base_momentum=0.99, total_steps=None, synchronized_bn=True,
                 target_training=True, seed=0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(base_momentum) <= 1.0:
            raise ConfigError(f"MoBY base_momentum must be in [0, 1], got {base_momentum}")
        if float(temperature) <= 0:
            raise ConfigError(f"MoBY temperature must be > 0, got {temperature}")
        if int(queue_size) < 1:
            raise ConfigError(f"MoBY queue_size must be >= 1, got {queue_size}")
        if total_steps is not None and int(total_steps) <= 0:
            raise ConfigError(f"MoBY total_steps must be > 0 (or None for constant momentum), got {total_steps}")
        self.hidden_dim = int(hidden_dim)
        self.out_dim = int(out_dim)
        self.proj_layers = int(proj_layers)
        self.pred_layers = int(pred_layers)
        self.temperature = float(temperature)
        self.queue_size = int(queue_size)
        self.base_momentum = float(base_momentum)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.synchronized_bn = bool(synchronized_bn)
        self.target_training = bool(target_training)
        self.seed = int(seed)

        if image_shape is None:
            try:
                image_shape = tuple(encoder.input_shape[1:])
            except (AttributeError, ValueError):
                raise ConfigError(
                    "MoBY cannot tell the encoder's input shape; pass image_shape=(H, W, 3)"
                ) from None
        self.image_shape = tuple(None if d is None else int(d) for d in image_shape)

        self.encoder = _build_on(encoder, self.image_shape)
        feat_shape = tuple(self.encoder.compute_output_spec(keras.KerasTensor((2,) + self.image_shape)).shape)
        if len(feat_shape) != 2:
            raise ConfigError(
                f"MoBY needs an encoder returning pooled features [B, F]; {self.encoder.name!r} "
                f"returns shape {feat_shape}. Add global pooling to the backbone."
            )
        feat_dim = feat_shape[-1]
        mlp = dict(hidden_dim=self.hidden_dim, out_dim=self.out_dim, synchronized=self.synchronized_bn)
        self.projector = ProjectionHead.moby(num_layers=self.proj_layers, name="projector", **mlp)
        self.projector.build((None, feat_dim))
        self.predictor = ProjectionHead.moby(num_layers=self.pred_layers, name="predictor", **mlp)
        self.predictor.build((None, self.out_dim))

        self.target_encoder = _build_on(clone_fresh(self.encoder, "encoder"), self.image_shape)
        self.target_projector = ProjectionHead.from_config(self.projector.get_config())
        self.target_projector.build((None, feat_dim))
        self._teacher = MomentumTeacher([self.encoder, self.projector],
                                        [self.target_encoder, self.target_projector], ["encoder", "projector"])

        rng = np.random.default_rng(self.seed)

        def queue_init(shape, dtype=None):
            q = rng.standard_normal(shape).astype("float32")
            return q / np.linalg.norm(q, axis=1, keepdims=True)

        self.queue1 = self.add_weight(shape=(self.queue_size, self.out_dim), initializer=queue_init,
                                      trainable=False, name="queue1")
        self.queue2 = self.add_weight(shape=(self.queue_size, self.out_dim), initializer=queue_init,
                                      trainable=False, name="queue2")
        self.queue_ptr = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False,
                                         name="queue_ptr")
        self.track("loss", "accuracy", "momentum")
        self.built = True

    # -- run-config hooks ------------------------------------------------------------------
    @classmethod
    def validate_run_config(cls, cfg):
        mc = cls.section(cfg)
        if mc.queue_size < cfg.train.batch_size:
            raise ConfigError(f"moby.queue_size={mc.queue_size} must be >= train.batch_size="
                              f"{cfg.train.batch_size} (each step enqueues one global batch of keys)")

    @classmethod
    def tiny_overrides(cls, workdir):
        return ["moby.hidden_dim=16", "moby.out_dim=8", "moby.queue_size=16", "views.kind=multiscale",
                "views.downsample=null"]

    @classmethod
    def from_run_config(cls, cfg, num_classes, total_steps=None):
        """MoBY on ``model.backbone`` (Swin V2 paper §III-A; Xie et al. 2021)."""
        mc = cls.section(cfg)
        return cls(build_encoder(cfg, "encoder"), image_shape=image_shape(cfg), hidden_dim=mc.hidden_dim,
                   out_dim=mc.out_dim, proj_layers=mc.proj_layers, pred_layers=mc.pred_layers,
                   temperature=mc.temperature, queue_size=mc.queue_size, base_momentum=mc.base_momentum,
                   total_steps=total_steps, seed=cfg.train.seed, name="moby")

    @classmethod
    def branch_input_kinds(cls, cfg):
        return {"online": "full"}  # MoBY's online encoder, on full images (Swin V2 paper §III-A)

    # -- momentum target -----------------------------------------------------------------
    def _ema_pairs(self):
        return self._teacher.pairs()

    def momentum(self, step=None):
        """Momentum m for update number ``step`` (default: ``optimizer.iterations``)."""
        if step is None:
            opt = getattr(self, "optimizer", None)
            step = opt.iterations if opt is not None else 0
        return momentum_schedule(step, self.total_steps, self.base_momentum)

    def momentum_update(self, m):
        """θ_target ← m·θ_target + (1 − m)·θ_online for encoder and projector."""
        self._teacher.update(m)

    # -- queues ---------------------------------------------------------------------------
    def enqueue(self, keys1, keys2):
        """Write ``keys1`` into Q₁ and ``keys2`` into Q₂ at the pointer (oldest first), advance it."""
        n = keys1.shape[0]
        if n is not None and n > self.queue_size:
            raise ConfigError(f"MoBY queue_size ({self.queue_size}) is smaller than the global batch ({n}); "
                              "raise model.queue_size or lower the batch size")
        n = ops.shape(keys1)[0]
        ptr = ops.convert_to_tensor(self.queue_ptr)
        idx = ops.mod(ptr + ops.arange(n, dtype="int32"), self.queue_size)[:, None]
        self.queue1.assign(ops.scatter_update(self.queue1, idx, ops.cast(keys1, "float32")))
        self.queue2.assign(ops.scatter_update(self.queue2, idx, ops.cast(keys2, "float32")))
        self.queue_ptr.assign(ops.mod(ptr + ops.cast(n, "int32"), self.queue_size))

    # -- forward --------------------------------------------------------------------------
    def call(self, inputs, training=False):
        """Online encoder features of ``view_a`` (or of plain images)."""
        if isinstance(inputs, dict):
            inputs = inputs["view_a"] if "view_a" in inputs else inputs["image"]
        return self.encoder(inputs, training=training)

    def queries(self, x, training=True):
        return _l2n(self.predictor(self.projector(self.encoder(x, training=training), training=training),
                                   training=training))

    def keys(self, x):
        t = self.target_training
        k = _l2n(self.target_projector(self.target_encoder(x, training=t), training=t))
        return ops.stop_gradient(k)

    @staticmethod
    def _views_of(x):
        if not isinstance(x, dict) or "view_a" not in x or "view_b" not in x:
            raise ConfigError("MoBY expects batches ({'view_a': x1, 'view_b': x2}, labels); "
                              "use a two-view view maker")
        return x["view_a"], x["view_b"]

    def before_step(self, x, y, training=True):
        """Momentum update (training only), then the keys of both views (no gradient)."""
        v1, v2 = self._views_of(x)
        m = self.momentum()
        if training:
            self.momentum_update(m)
        return {"m": m, "k1": gather_across_replicas(self.keys(v1)), "k2": gather_across_replicas(self.keys(v2))}

    def compute_terms(self, x, y, sample_weight=None, training=False, state=None):
        v1, v2 = self._views_of(x)
        q1 = gather_across_replicas(self.queries(v1, training))
        q2 = gather_across_replicas(self.queries(v2, training))
        terms = moby_loss(q1, q2, state["k1"], state["k2"], self.queue1, self.queue2, self.temperature,
                          normalize=False)
        terms["momentum"] = state["m"]
        return terms

    def after_step(self, x, y, terms, state):
        self.enqueue(state["k1"], state["k2"])

    # -- export ---------------------------------------------------------------------------
    def branch_encoders(self):
        """``{"online": encoder}``: the encoder to evaluate and export after pre-training."""
        return {"online": self.encoder}

    def get_config(self):
        cfg = super().get_config()
        cfg.update(
            **self.serialize_nested(encoder=self.encoder),
            image_shape=list(self.image_shape),
            hidden_dim=self.hidden_dim,
            out_dim=self.out_dim,
            proj_layers=self.proj_layers,
            pred_layers=self.pred_layers,
            temperature=self.temperature,
            queue_size=self.queue_size,
            base_momentum=self.base_momentum,
            total_steps=self.total_steps,
            synchronized_bn=self.synchronized_bn,
            target_training=self.target_training,
            seed=self.seed,
        )
        return cfg

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["image_shape"] = tuple(config["image_shape"])
        return super().from_config(config)


METHODS.register("moby", MoBY)
