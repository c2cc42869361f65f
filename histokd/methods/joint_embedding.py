"""Joint-embedding self-supervised learning with asymmetric branches.

More From Less (Farndale, Insall, Yuan), §2.1–2.2 and Fig. 1: two branches, each an
encoder followed by an expander, see two views of the same image — a downsampled
(information-sparse) view and the original (information-dense) view in the asymmetric
case, two downsampled views in the symmetric case, or a nuclear-type mask and its
image. The branches share weights or not (Table S3) and are trained with VICReg
(λ=25, μ=25, ν=1) or SimCLR's NT-Xent (t=0.5). CASS (two different backbones on the
same view) is the same class with two different encoders.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from histokd.errors import ConfigError
from histokd.layers.heads import Expander
from histokd.losses.ntxent import nt_xent
from histokd.losses.vicreg import vicreg_terms
from histokd.methods.base import gather_across_replicas, kernels_side_by_side, normalized_std, unpack
from histokd.registry import METHODS

_LOSS_TERMS = {
    "vicreg": ("loss", "invariance", "variance", "covariance"),
    "simclr": ("loss", "pair_accuracy"),
}


@keras.saving.register_keras_serializable(package="histokd")
class JointEmbedding(keras.Model):
    """Two-branch joint-embedding model (VICReg or SimCLR), weights shared or independent.

    Branch a reads ``view_a`` (the information-sparse view), branch b reads ``view_b``.
    ``fit`` trains it on a dataset yielding ``({"view_a": xa, "view_b": xb}, labels)``
    (labels are ignored). Under a distribution strategy the embeddings are gathered
    across replicas, so the loss is the global-batch loss. Logged metrics: ``loss``,
    each loss term, and ``std_a``/``std_b`` (normalised embedding std, for the collapse
    monitor).

    Args:
        encoder_a: keras.Model. Encoder of branch a (images in [0, 1] → features).
        encoder_b: keras.Model. Encoder of branch b; ignored when ``shared``; when None and
            not shared, a clone of ``encoder_a`` with fresh weights.
        shared: bool. One encoder and one expander for both branches.
        expander_dims: list of int. Expander widths (paper: 3×8192).
        loss: str. ``vicreg`` or ``simclr``.
        loss_kwargs: dict. ``invariance``/``variance``/``covariance`` or ``temperature``.
        expander_a, expander_b: Expander. Pre-built expanders (used when reloading).

    Example:
        >>> from histokd.backbones import make_backbone
        >>> enc = make_backbone("resnet18", input_size=32, width=0.25, small_input=True)
        >>> model = JointEmbedding(enc, shared=False, expander_dims=[64, 64, 64])
        >>> model.compile(optimizer="adam")
    """

    #: one encoder chain per view: the runtime's CPU thread plan runs them side by side
    cpu_streams = 2

    def __init__(self, encoder_a, encoder_b=None, shared=False, expander_dims=(8192, 8192, 8192),
                 loss="vicreg", loss_kwargs=None, expander_a=None, expander_b=None, **kwargs):
        super().__init__(**kwargs)
        if loss not in _LOSS_TERMS:
            raise ConfigError(f"JointEmbedding loss must be one of {sorted(_LOSS_TERMS)}, got {loss!r}")
        self.loss_name = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        if loss == "vicreg":
            allowed = {"invariance", "variance", "covariance"}
        else:
            allowed = {"temperature"}
        bad = set(self.loss_kwargs) - allowed
        if bad:
            raise ConfigError(f"{loss} loss takes {sorted(allowed)}, got unexpected {sorted(bad)}")
        self.shared = bool(shared)
        self.expander_dims = [int(d) for d in expander_dims]
        self.encoder_a = encoder_a
        self.expander_a = expander_a or Expander(self.expander_dims, name="expander_a")
        if self.shared:
            self.encoder_b = self.encoder_a
            self.expander_b = self.expander_a
        else:
            if encoder_b is None:
                encoder_b = keras.models.clone_model(encoder_a)
            if encoder_b is encoder_a:
                raise ConfigError("independent branches need two encoder objects; pass shared=True to share one")
            self.encoder_b = encoder_b
            self.expander_b = expander_b or Expander(self.expander_dims, name="expander_b")
        self.view_maker = None  # set by the runner for views.augment_on=device (not saved)
        self._trackers = {k: keras.metrics.Mean(name=k) for k in _LOSS_TERMS[loss]}
        self._trackers["std_a"] = keras.metrics.Mean(name="std_a")
        self._trackers["std_b"] = keras.metrics.Mean(name="std_b")

    # -- forward ---------------------------------------------------------------------------
    def embed_a(self, x, training=False):
        return self.expander_a(self.encoder_a(x, training=training), training=training)

    def embed_b(self, x, training=False):
        return self.expander_b(self.encoder_b(x, training=training), training=training)

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict) or "view_a" not in inputs or "view_b" not in inputs:
            raise ConfigError("JointEmbedding expects a dict with 'view_a' and 'view_b' images")
        if self.shared and not kernels_side_by_side():
            # one expander for both branches: its dense layers run once on both views
            # (BatchNorm still per view), see Expander.call_views. Not when the process
            # runs each view's chain on its own cores (histokd train's CPU thread plan):
            # there two per-view chains beat one merged single-pool product (+1.5 % on
            # the ResNet-50 VICReg step on 2 cores).
            f_a = self.encoder_a(inputs["view_a"], training=training)
            f_b = self.encoder_a(inputs["view_b"], training=training)
            z_a, z_b = self.expander_a.call_views([f_a, f_b], training=training)
            return {"z_a": z_a, "z_b": z_b}
        if self.shared:
            return {"z_a": self.embed_a(inputs["view_a"], training),
                    "z_b": self.embed_a(inputs["view_b"], training)}
        return {"z_a": self.embed_a(inputs["view_a"], training), "z_b": self.embed_b(inputs["view_b"], training)}

    def build(self, input_shape=None):
        if isinstance(input_shape, dict):
            sa, sb = input_shape["view_a"], input_shape["view_b"]
        else:
            s = tuple(self.encoder_a.input_shape)
            sa = sb = s
        for enc, exp, s in ((self.encoder_a, self.expander_a, sa), (self.encoder_b, self.expander_b, sb)):
            if not exp.built:
                exp.build((None, enc.output_shape[-1]))
        self.built = True

    # -- loss --------------------------------------------------------------------------------
    def loss_terms(self, z_a, z_b):
        """Loss terms on the global batch (gathered across replicas)."""
        z_a = gather_across_replicas(z_a)
        z_b = gather_across_replicas(z_b)
        if self.loss_name == "vicreg":
            return vicreg_terms(z_a, z_b, **self.loss_kwargs)
        return nt_xent(z_a, z_b, **self.loss_kwargs)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def _step(self, data, training):
        x, y, _ = unpack(data)
        if self.view_maker is not None and not (isinstance(x, dict) and "view_a" in x):
            # augment_on: device — views are made inside the step, on the accelerator
            x, _ = self.view_maker(x, y)
        out = self(x, training=training)
        terms = self.loss_terms(out["z_a"], out["z_b"])
        terms["std_a"] = normalized_std(out["z_a"])
        terms["std_b"] = normalized_std(out["z_b"])
        return terms

    def train_step(self, data):
        with tf.GradientTape() as tape:
            terms = self._step(data, training=True)
            loss = terms["loss"]
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._update(terms)

    def test_step(self, data):
        return self._update(self._step(data, training=False))

    def _update(self, terms):
        for k, tracker in self._trackers.items():
            tracker.update_state(terms[k])
        return {k: t.result() for k, t in self._trackers.items()}

    # -- encoders for evaluation / export --------------------------------------------------
    def branch_encoders(self):
        """``{"a": encoder_a, "b": encoder_b}`` (the same object twice when shared)."""
        return {"a": self.encoder_a, "b": self.encoder_b}

    def get_config(self):
        cfg = super().get_config()
        ser = keras.saving.serialize_keras_object
        cfg.update(
            encoder_a=ser(self.encoder_a),
            encoder_b=None if self.shared else ser(self.encoder_b),
            shared=self.shared,
            expander_dims=self.expander_dims,
            loss=self.loss_name,
            loss_kwargs=self.loss_kwargs,
        )
        return cfg

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        de = keras.saving.deserialize_keras_object
        config["encoder_a"] = de(config["encoder_a"])
        if config.get("encoder_b") is not None:
            config["encoder_b"] = de(config["encoder_b"])
        return cls(**config)


METHODS.register("vicreg", JointEmbedding)
METHODS.register("simclr", JointEmbedding)
