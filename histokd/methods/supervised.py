"""Supervised baseline: an encoder and a softmax head trained end to end on labels.

More From Less §2.2: "We produce supervised baseline comparisons using an equivalent
encoder and softmax classifier head, following the same training protocol." The Swin V2
paper fine-tunes the same way (batch 32, lr 1e-3); ``trainable_blocks`` lets BEiT-style
fine-tuning unfreeze only the top of an encoder.
"""

from __future__ import annotations

import keras

from histokd.layers.heads import LinearHead
from histokd.registry import METHODS


@keras.saving.register_keras_serializable(package="histokd")
class Supervised(keras.Model):
    """Encoder + softmax head, trained with sparse categorical cross-entropy.

    Accepts images or a dict with key ``image`` (as the identity view maker yields).

    Args:
        encoder: keras.Model. Images in [0, 1] → features.
        num_classes: int. Number of classes.

    Example:
        >>> model = Supervised(encoder, num_classes=9)
        >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    """

    def __init__(self, encoder, num_classes, head=None, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.num_classes = int(num_classes)
        self.head = head or LinearHead(self.num_classes, name="head")

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            inputs = inputs["image"]
        return self.head(self.encoder(inputs, training=training))

    def build(self, input_shape=None):
        if not self.head.built:
            self.head.build((None, self.encoder.output_shape[-1]))
        self.built = True

    def branch_encoders(self):
        return {"image": self.encoder}

    def get_config(self):
        cfg = super().get_config()
        cfg.update(encoder=keras.saving.serialize_keras_object(self.encoder), num_classes=self.num_classes)
        return cfg

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)


METHODS.register("supervised", Supervised)
