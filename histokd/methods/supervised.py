"""Supervised baseline: an encoder and a softmax head trained end to end on labels.

More From Less §2.2: "We produce supervised baseline comparisons using an equivalent
encoder and softmax classifier head, following the same training protocol." The Swin V2
paper fine-tunes the same way (batch 32, lr 1e-3).
"""

from __future__ import annotations

import keras

from histokd.layers.heads import LinearHead
from histokd.methods.base import Method, build_encoder, num_replicas
from histokd.registry import METHODS


@keras.saving.register_keras_serializable(package="histokd")
class Supervised(Method):
    """Encoder + softmax head, trained with the compiled loss (sparse categorical
    cross-entropy in ``histokd train``).

    Accepts images or a dict with key ``image`` (as the identity view maker yields).
    Logged: ``loss`` and the compiled metrics (``accuracy`` in ``histokd train``).

    Args:
        encoder: keras.Model. Images in [0, 1] → features.
        num_classes: int. Number of classes.
        head: keras layer. Features → probabilities (default: :class:`LinearHead`).

    Example:
        >>> model = Supervised(encoder, num_classes=9)
        >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        >>> model.fit(ds, epochs=10)
    """

    batch_inputs = ("image",)
    supports_device_augment = True
    cross_replica = "mean"
    nested = ("encoder", "head")

    def __init__(self, encoder, num_classes, head=None, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.head = head or LinearHead(self.num_classes, name="head")
        self.track("loss")

    @classmethod
    def from_run_config(cls, cfg, num_classes, total_steps=None):
        model = cls(build_encoder(cfg, "encoder"), num_classes=num_classes, name="supervised")
        model.build()
        return model

    @classmethod
    def tiny_overrides(cls, workdir):
        return ["views.kind=identity", "views.downsample=null"]

    @classmethod
    def compile_defaults(cls, cfg):
        return {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            inputs = inputs["image"]
        return self.head(self.encoder(inputs, training=training))

    def build(self, input_shape=None):
        if not self.head.built:
            self.head.build((None, self.encoder.output_shape[-1]))
        self.built = True

    def compute_terms(self, x, y, sample_weight=None, training=False, state=None):
        y_pred = self(x, training=training)
        # the compiled loss (+ regularisers): Keras already divides it by the number of
        # replicas; undo that, the base's cross-replica rule ("mean") divides once
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training)
        return {"loss": loss * num_replicas(), "y_pred": y_pred}

    def branch_encoders(self):
        return {"image": self.encoder}

    def trained_heads(self):
        return {"image": self.head}

    def get_config(self):
        cfg = super().get_config()
        cfg.update(self.serialize_nested(encoder=self.encoder, head=self.head), num_classes=self.num_classes)
        return cfg


METHODS.register("supervised", Supervised)
