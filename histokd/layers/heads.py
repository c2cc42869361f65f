"""Projection heads: the VICReg/SimCLR expander and the linear-evaluation head."""

from __future__ import annotations

import keras

from histokd.errors import ConfigError


@keras.saving.register_keras_serializable(package="histokd")
class Expander(keras.layers.Layer):
    """Expander (projector) of a joint-embedding branch.

    Dense layers with BatchNorm + ReLU between them and a plain linear last layer,
    as in VICReg (Bardes et al. 2022) and More From Less §2.2 ("expanders were
    composed of three dense layers with ReLU activations and output size 8192").

    Args:
        dims: list of int. Output width of each dense layer (paper: [8192, 8192, 8192]).

    Example:
        >>> z = Expander([64, 64, 64])(keras.random.normal((4, 32)))
    """

    def __init__(self, dims=(8192, 8192, 8192), **kwargs):
        super().__init__(**kwargs)
        if not dims:
            raise ConfigError("Expander needs at least one layer width (model.expander_dims)")
        self.dims = [int(d) for d in dims]
        self.dense = [keras.layers.Dense(d, use_bias=(i == len(self.dims) - 1), name=f"dense_{i}")
                      for i, d in enumerate(self.dims)]
        self.norms = [keras.layers.BatchNormalization(name=f"bn_{i}") for i in range(len(self.dims) - 1)]

    def build(self, input_shape):
        shape = input_shape
        for i, dense in enumerate(self.dense):
            dense.build(shape)
            shape = dense.compute_output_shape(shape)
            if i < len(self.norms):
                self.norms[i].build(shape)
        self.built = True

    def call(self, x, training=None):
        for i, dense in enumerate(self.dense):
            x = dense(x)
            if i < len(self.norms):
                x = keras.ops.relu(self.norms[i](x, training=training))
        return x

    def call_views(self, views, training=None):
        """The expander applied to each of several views, with each view's own BatchNorm
        statistics (as separate calls), but every dense layer run once on all views.

        Equal to ``[self(v) for v in views]`` (the dense layers are linear, so one matrix
        product over the concatenated rows is the same product; BatchNorm still sees one
        view at a time, in the same order, so moving statistics update identically) —
        only faster: a VICReg batch of 32 per view makes thin matrix products, and
        doubling their rows speeds the expander up by ~30 % on CPU.

        Args:
            views: list of [B_i, D] tensors.
            training: bool.

        Returns:
            list of [B_i, dims[-1]] tensors.
        """
        if len(views) == 1:
            return [self(views[0], training=training)]
        sizes = [keras.ops.shape(v)[0] for v in views]
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        x = keras.ops.concatenate(views, axis=0)
        for i, dense in enumerate(self.dense):
            x = dense(x)
            if i < len(self.norms):
                parts = [self.norms[i](x[bounds[j]:bounds[j + 1]], training=training)
                         for j in range(len(views))]
                x = keras.ops.relu(keras.ops.concatenate(parts, axis=0))
        return [x[bounds[j]:bounds[j + 1]] for j in range(len(views))]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.dims[-1],)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(dims=list(self.dims))
        return cfg


@keras.saving.register_keras_serializable(package="histokd")
class LinearHead(keras.layers.Layer):
    """Linear-evaluation head: one dense layer with softmax (More From Less §2.2).

    Args:
        num_classes: int. Number of classes.

    Example:
        >>> p = LinearHead(9)(keras.random.normal((4, 2048)))
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.dense = keras.layers.Dense(self.num_classes, activation="softmax", dtype="float32", name="dense")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.built = True

    def call(self, x):
        return self.dense(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        cfg = super().get_config()
        cfg.update(num_classes=self.num_classes)
        return cfg
