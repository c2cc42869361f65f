"""Joint-embedding self-supervised learning with asymmetric branches.

More From Less (Farndale, Insall, Yuan), §2.1–2.2 and Fig. 1: two branches, each an
encoder followed by an expander, see two views of the same image — a downsampled
(information-sparse) view and the original (information-dense) view in the asymmetric
case, two downsampled views in the symmetric case, or a nuclear-type mask and its
image. The branches share weights or not (Table S3) and are trained with VICReg
(λ=25, μ=25, ν=1) or SimCLR's NT-Xent (t=0.5). The loss is any registered ``LOSSES``
entry taking two embedding batches and returning a dict of terms with ``loss``.
"""

from __future__ import annotations

import dataclasses
import inspect

import keras
import numpy as np

from histokd.errors import ConfigError
from histokd.layers.heads import ProjectionHead
from histokd.methods.base import Method, build_encoder, gather_across_replicas, normalized_std
from histokd.registry import LOSSES, METHODS
from histokd.runtime import kernels_side_by_side

#: former loss names of saved models
_LOSS_ALIASES = {"simclr": "nt_xent"}


@dataclasses.dataclass
class LossConfig:
    """Loss coefficients of the joint-embedding methods, YAML section ``loss``
    (More From Less §2.2, following the original implementations).

    Args:
        invariance, variance, covariance: float. VICReg's λ=25, μ=25, ν=1 (Bardes et al. 2022).
        temperature: float. NT-Xent temperature t=0.5 (SimCLR, Chen et al. 2020).
    """

    invariance: float = 25.0
    variance: float = 25.0
    covariance: float = 1.0
    temperature: float = 0.5


def _loss_fn(name):
    return LOSSES.get(_LOSS_ALIASES.get(name, name))


def _loss_params(fn):
    return [p for p in list(inspect.signature(fn).parameters)[2:]]


@keras.saving.register_keras_serializable(package="histokd")
class JointEmbedding(Method):
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
        loss: str. A ``LOSSES`` key: ``vicreg`` or ``nt_xent`` (``simclr`` is accepted for it);
            any registered loss ``f(z_a, z_b, **loss_kwargs) -> {"loss": ..., ...}`` works.
        loss_kwargs: dict. Keyword arguments of the loss (``invariance``/``variance``/
            ``covariance`` for VICReg, ``temperature`` for NT-Xent).
        expander_a, expander_b: ProjectionHead. Pre-built expanders (used when reloading).
        merge_views: bool. Shared branches only: run the expander's dense layers once on both
            views (:meth:`ProjectionHead.call_views`); default: yes unless TensorFlow's pools
            run kernels side by side (:func:`histokd.runtime.kernels_side_by_side`).

    Example:
        >>> from histokd.backbones import make_backbone
        >>> enc = make_backbone("resnet18", input_size=32, width=0.25, small_input=True)
        >>> model = VICReg(enc, shared=False, expander_dims=[64, 64, 64])
        >>> model.compile(optimizer="adam")
    """

    Config = LossConfig
    config_section = "loss"
    cpu_streams = 2  # one encoder chain per view: the CPU thread plan runs them side by side
    supports_device_augment = True
    cross_replica = "global"
    nested = ("encoder_a", "encoder_b")
    rebuilt_args = ("expander_a", "expander_b")
    #: the loss a registered subclass trains with (VICReg, SimCLR)
    default_loss = "vicreg"

    def __init__(self, encoder_a, encoder_b=None, shared=False, expander_dims=(8192, 8192, 8192),
                 loss=None, loss_kwargs=None, expander_a=None, expander_b=None, merge_views=None, **kwargs):
        super().__init__(**kwargs)
        # Shared branches: one merged expander product for both views is faster with
        # TensorFlow's default pools; when the CPU thread plan runs each view's chain on
        # its own cores, two per-view chains are faster. Decided once, here, and saved,
        # so call() builds the same graph whatever the process's pools are later.
        self.merge_views = (not kernels_side_by_side()) if merge_views is None else bool(merge_views)
        loss = loss or self.default_loss
        try:
            self._loss = _loss_fn(loss)
        except KeyError as e:
            raise ConfigError(f"JointEmbedding loss: {e}") from None
        self.loss_name = loss
        self.loss_kwargs = dict(loss_kwargs or {})
        allowed = set(_loss_params(self._loss))
        bad = set(self.loss_kwargs) - allowed
        if bad:
            raise ConfigError(f"{loss} loss takes {sorted(allowed)}, got unexpected {sorted(bad)}")
        self.shared = bool(shared)
        self.expander_dims = [int(d) for d in expander_dims]
        self.encoder_a = encoder_a
        self.expander_a = expander_a or ProjectionHead.expander(self.expander_dims, name="expander_a")
        if self.shared:
            self.encoder_b = self.encoder_a
            self.expander_b = self.expander_a
        else:
            if encoder_b is None:
                encoder_b = keras.models.clone_model(encoder_a)
            if encoder_b is encoder_a:
                raise ConfigError("independent branches need two encoder objects; pass shared=True to share one")
            self.encoder_b = encoder_b
            self.expander_b = expander_b or ProjectionHead.expander(self.expander_dims, name="expander_b")
        self.track(*self._term_names(), "std_a", "std_b")

    def _term_names(self):
        """Names of the loss's terms, read from one call on a small random batch."""
        z = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
        terms = self._loss(z, z[::-1], **self.loss_kwargs)
        if "loss" not in terms:
            raise ConfigError(f"loss {self.loss_name!r} must return a dict with 'loss', got {sorted(terms)}")
        return ["loss"] + sorted(k for k in terms if k != "loss")

    # -- run-config hooks ------------------------------------------------------------------
    @classmethod
    def validate_run_config(cls, cfg):
        m = cfg.model
        if not m.expander_dims:
            raise ConfigError("model.expander_dims must list at least one width")
        if m.shared and m.backbone_b and m.backbone_b != m.backbone:
            raise ConfigError("model.shared=true cannot use two different backbones (model.backbone_b)")

    @classmethod
    def tiny_overrides(cls, workdir):
        return ["model.expander_dims=[16,16]", "views.kind=asymmetric", "views.downsample=8"]

    @classmethod
    def from_run_config(cls, cfg, num_classes, total_steps=None):
        m = cfg.model
        enc_a = build_encoder(cfg, "encoder_a")
        enc_b = None if m.shared else build_encoder(cfg, "encoder_b", backbone=m.backbone_b)
        loss = _loss_fn(cls.default_loss)
        section = dataclasses.asdict(cls.section(cfg))
        loss_kwargs = {k: section[k] for k in _loss_params(loss) if k in section}
        model = cls(enc_a, enc_b, shared=m.shared, expander_dims=m.expander_dims, loss=cls.default_loss,
                    loss_kwargs=loss_kwargs, name=f"{m.method}_joint_embedding")
        model.build()
        return model

    # -- forward ---------------------------------------------------------------------------
    def embed_a(self, x, training=False):
        return self.expander_a(self.encoder_a(x, training=training), training=training)

    def embed_b(self, x, training=False):
        return self.expander_b(self.encoder_b(x, training=training), training=training)

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict) or "view_a" not in inputs or "view_b" not in inputs:
            raise ConfigError("JointEmbedding expects a dict with 'view_a' and 'view_b' images")
        if self.shared and self.merge_views:
            # one expander for both branches: its dense layers run once on both views
            # (BatchNorm still per view), see ProjectionHead.call_views
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
        return self._loss(gather_across_replicas(z_a), gather_across_replicas(z_b), **self.loss_kwargs)

    def compute_terms(self, x, y, sample_weight=None, training=False, state=None):
        out = self(x, training=training)
        terms = self.loss_terms(out["z_a"], out["z_b"])
        terms["std_a"] = normalized_std(out["z_a"])
        terms["std_b"] = normalized_std(out["z_b"])
        return terms

    # -- encoders for evaluation / export --------------------------------------------------
    def branch_encoders(self):
        """``{"a": encoder_a, "b": encoder_b}`` (the same object twice when shared)."""
        return {"a": self.encoder_a, "b": self.encoder_b}

    def get_config(self):
        cfg = super().get_config()
        cfg.update(self.serialize_nested(encoder_a=self.encoder_a,
                                         encoder_b=None if self.shared else self.encoder_b))
        cfg.update(shared=self.shared, expander_dims=self.expander_dims, loss=self.loss_name,
                   loss_kwargs=self.loss_kwargs, merge_views=self.merge_views)
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class VICReg(JointEmbedding):
    """:class:`JointEmbedding` trained with VICReg (Bardes et al. 2022; More From Less §2.2:
    λ=25, μ=25, ν=1). ``model.method: vicreg``."""

    default_loss = "vicreg"


@keras.saving.register_keras_serializable(package="histokd")
class SimCLR(JointEmbedding):
    """:class:`JointEmbedding` trained with SimCLR's NT-Xent (Chen et al. 2020; More From Less
    §2.2: t=0.5). ``model.method: simclr``."""

    default_loss = "nt_xent"


METHODS.register("vicreg", VICReg)
METHODS.register("simclr", SimCLR)
