"""Optimizers and learning-rate schedules of the papers' recipes.

* :class:`FusedAdam` / :class:`FusedAdamW`: Keras' Adam / AdamW with the update done by
  TensorFlow's one-pass ``ResourceApplyAdam`` kernel (same formula, same slots).
* :func:`warmup_cosine`: linear warm-up then cosine decay (More From Less §2.2, after
  Goyal et al. 2017), the schedule of every ``histokd train`` run.
"""

from __future__ import annotations

import keras


class _FusedAdamUpdate:
    """Adam's update as one fused TensorFlow kernel per variable (mixin for Adam / AdamW).

    Keras 3 writes Adam's update as ~10 element-wise ops per variable, each streaming
    the variable-sized tensors through memory once more; TensorFlow's
    ``ResourceApplyAdam`` kernel does the same update in one pass:
    ``m += (g - m)(1 - β1)``, ``v += (g² - v)(1 - β2)``,
    ``var -= lr·sqrt(1 - β2^t)/(1 - β1^t) · m / (sqrt(v) + ε)`` — Keras' formula,
    ε included the same way (Kingma & Ba 2015, Algorithm 1 with the "ε-hat" form).
    Same config and slot variables as the Keras class, so checkpoints are
    interchangeable; anything the kernel does not cover (another backend, AMSGrad,
    sparse or differently-typed gradients) runs Keras' own update.
    """

    def update_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        if (keras.backend.backend() != "tensorflow" or self.amsgrad
                or not isinstance(gradient, tf.Tensor) or isinstance(gradient, tf.IndexedSlices)):
            return super().update_step(gradient, variable, learning_rate)
        var = variable.value if isinstance(variable, keras.Variable) else variable
        index = self._get_variable_index(variable)
        m = self._momentums[index].value
        v = self._velocities[index].value
        dtype = var.dtype
        if dtype not in (tf.float32, tf.float64) or not all(
                hasattr(t, "handle") for t in (var, m, v)):
            return super().update_step(gradient, variable, learning_rate)
        step = tf.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle, m=m.handle, v=v.handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype), use_locking=False, use_nesterov=False)


@keras.saving.register_keras_serializable(package="histokd")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with a one-kernel update on TensorFlow (see :class:`_FusedAdamUpdate`).

    The optimizer of the More From Less runs (§2.2: Adam, lr 1e-4, warm-up + cosine).

    Example:
        >>> opt = FusedAdam(1e-4)
        >>> model.compile(optimizer=opt)
    """


@keras.saving.register_keras_serializable(package="histokd")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` (decoupled weight decay, applied by Keras before the
    update) with the one-kernel Adam update on TensorFlow.

    Example:
        >>> opt = FusedAdamW(1e-4, weight_decay=0.05)
    """


def warmup_cosine(lr: float, total_steps: int, warmup_steps: int = 0):
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps`` (More From Less §2.2; Goyal et al. 2017).

    Args:
        lr: float. Peak learning rate.
        total_steps: int. Optimizer steps of the whole run.
        warmup_steps: int. Steps of the warm-up (clipped to ``total_steps - 1``).

    Example:
        >>> schedule = warmup_cosine(1e-3, total_steps=1000, warmup_steps=100)
    """
    total = max(1, int(total_steps))
    warmup = min(int(warmup_steps), total - 1)
    if warmup > 0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=total - warmup, alpha=0.0,
            warmup_target=lr, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(initial_learning_rate=lr, decay_steps=total)


def adam(schedule, weight_decay: float = 0.0):
    """:class:`FusedAdam`, or :class:`FusedAdamW` when ``weight_decay`` > 0."""
    if weight_decay > 0:
        return FusedAdamW(schedule, weight_decay=weight_decay)
    return FusedAdam(schedule)


__all__ = ["FusedAdam", "FusedAdamW", "adam", "warmup_cosine"]
