"""Stain augmentation on the Macenko decomposition (a Keras augmentation layer).

Each image is decomposed with its *own* Macenko fit (the same batched graph as
:mod:`histokd.stain.macenko`): OD = HE C + residual. The augmentation scales
and shifts the H and E concentrations per image (C' = alpha C + beta, as in
torchstain's Macenko augmentor and the HED jitter of Tellez et al. 2018) and
slightly perturbs the two stain vectors (HE' = normalise(HE + noise)), then
recomposes OD' = HE' C' + residual. Keeping the residual (the part of the OD
off the stain plane) makes the layer the exact identity at zero jitter.
Tiles that fail the Macenko robustness policy (background, noise, single
stain, tiny tissue) are left unchanged.

Context: More From Less §2.3 colour-normalises every patch with Macenko; this
layer is the matching augmentation for view makers that want stain variation
instead of (or on top of) normalisation.

Example:
    >>> aug = StainAugmentation(scale=0.2, shift=0.05, vector_jitter=0.05, seed=1)
    >>> views = aug(images_0_1, training=True)      # float32 [B,H,W,3] in [0,1]
"""

from __future__ import annotations


import keras
import tensorflow as tf

from histokd.errors import StainError
from histokd.stain.macenko import CONSTANT_DEFAULTS, check_constants, macenko_decompose


@keras.saving.register_keras_serializable(package="histokd")
class StainAugmentation(keras.layers.Layer):
    """Random H&E stain jitter built on the per-image Macenko decomposition.

    Args:
        scale: float. Concentrations are multiplied by U[1 - scale, 1 + scale],
            independently for H and E and per image.
        shift: float. Then shifted by U[-shift, shift] (concentration units; a
            tissue's maxC is typically 1-2).
        vector_jitter: float. Each stain vector component gets U[-v, v] noise
            before renormalisation (0.05 ~ a few degrees).
        rate: float. Probability that an image is augmented at all.
        value_range: (low, high). Range of float inputs (uint8 inputs give uint8
            outputs).
        seed: int or None. Seed of the layer's random generator.
        **kwargs: Macenko constants (``io``, ``alpha``, ``beta``, ...) and Layer args.

    Call args:
        inputs: [B,H,W,3] uint8 or float images.
        training: bool. Augment only when true (default true, like Keras'
            Random* layers; ``model.predict`` passes false).

    Example:
        >>> aug = StainAugmentation(seed=0)
        >>> ds = ds.batch(32).map(lambda x: aug(tf.cast(x, "float32") / 255.0))
    """

    def __init__(
        self,
        scale: float = 0.2,
        shift: float = 0.05,
        vector_jitter: float = 0.05,
        rate: float = 1.0,
        value_range=(0.0, 1.0),
        seed=None,
        **kwargs,
    ):
        constants = {k: kwargs.pop(k) for k in list(kwargs) if k in CONSTANT_DEFAULTS}
        super().__init__(**kwargs)
        self.constants = check_constants(**constants)
        for name, v in (("scale", scale), ("shift", shift), ("vector_jitter", vector_jitter)):
            if not float(v) >= 0.0:
                raise StainError(f"StainAugmentation {name} must be >= 0, got {v}")
        if not 0.0 <= float(rate) <= 1.0:
            raise StainError(f"StainAugmentation rate must be in [0, 1], got {rate}")
        if float(scale) >= 1.0:
            raise StainError(
                f"StainAugmentation scale must be < 1 (concentrations stay positive), got {scale}"
            )
        self.scale = float(scale)
        self.shift = float(shift)
        self.vector_jitter = float(vector_jitter)
        self.rate = float(rate)
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise StainError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.value_range = (lo, hi)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = False  # see MacenkoNormalization: XLA is slower for these ops

    def _augment(self, x255, b):
        """x255: [B,H,W,3] uint8 or float 0..255 -> (float 0..255 [B,H,W,3], ok [B])."""
        c = self.constants
        dec = macenko_decompose(x255, **c)
        he, pinv, od, ok = dec["stain_matrix"], dec["pinv"], dec["od"], dec["ok"]
        sg = self.seed_generator
        apply = tf.cast(keras.random.uniform([b, 1], seed=sg) < self.rate, tf.float32)
        alpha = 1.0 + apply * keras.random.uniform([b, 2], -self.scale, self.scale, seed=sg)
        beta = apply * keras.random.uniform([b, 2], -self.shift, self.shift, seed=sg)
        noise = apply[:, :, None] * keras.random.uniform(
            [b, 3, 2], -self.vector_jitter, self.vector_jitter, seed=sg
        )
        he2 = tf.maximum(he + noise, 1e-3)
        he2 = he2 / tf.norm(he2, axis=1, keepdims=True)
        # OD' = OD + HE' (alpha C + beta) - HE C  with  C = pinv OD:
        # OD' = (I - HE pinv + HE' diag(alpha) pinv) OD + HE' beta.
        proj = tf.linalg.matmul(he, pinv)  # [B,3,3]
        mix = tf.eye(3, batch_shape=[b]) - proj + tf.linalg.matmul(he2 * alpha[:, None, :], pinv)
        mix = tf.where(ok[:, None, None], mix, tf.eye(3, batch_shape=[b]))
        bias = tf.where(ok[:, None], tf.linalg.matvec(he2, beta), 0.0)  # [B,3]
        od2 = tf.linalg.matmul(od, mix, transpose_b=True) + bias[:, None, :]
        out = c["io"] * tf.exp(-od2) - 1.0  # io exp(-OD) = I + 1
        out = tf.clip_by_value(out, 0.0, 255.0)
        return tf.reshape(out, tf.shape(x255)), ok

    def call(self, inputs, training=True):
        if not training:
            return inputs
        x = tf.convert_to_tensor(inputs)
        b = tf.shape(x)[0]
        if x.dtype == tf.uint8:
            out, ok = self._augment(x, b)
            out = tf.cast(tf.round(out), tf.uint8)
            return tf.where(ok[:, None, None, None], out, x)
        lo, hi = self.value_range
        xf = tf.cast(x, tf.float32)
        x255 = tf.clip_by_value((xf - lo) * (255.0 / (hi - lo)), 0.0, 255.0)
        out, ok = self._augment(x255, b)
        out = out * ((hi - lo) / 255.0) + lo
        out = tf.where(ok[:, None, None, None], out, xf)
        return tf.cast(out, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=True):
        # same dtype as the input (uint8 in -> uint8 out), not compute_dtype
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scale": self.scale,
                "shift": self.shift,
                "vector_jitter": self.vector_jitter,
                "rate": self.rate,
                "value_range": list(self.value_range),
                "seed": self.seed,
            }
        )
        config.update(self.constants)
        return config
