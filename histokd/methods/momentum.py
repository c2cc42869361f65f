"""Momentum (EMA) teachers: clone a network, freeze the clone, update it as a moving average.

The target network of MoBY (Xie et al. 2021, §3, after MoCo and BYOL), the teacher of
DINO (Caron et al. 2021, §3.1) and of BYOL-style methods is an exponential moving
average of the online (student) network,

    θ_t ← m·θ_t + (1 − m)·θ_o,

with ``m`` rising from a base value to 1 on a cosine schedule over training
(:func:`momentum_schedule`, BYOL §3.2 / MoBY / DINO). The target's variables are not
trainable, so the optimizer never touches them; its layers stay "trainable" so that
BatchNorm layers run on batch statistics in training mode, as in those methods.

Example:
    >>> teacher = MomentumTeacher([encoder, projector], ["encoder", "projector"])
    >>> teacher.update(momentum_schedule(step, total_steps, 0.99))
    >>> keys = teacher.models[0](x, training=True)
"""

from __future__ import annotations

import keras
from keras import ops

from histokd.errors import ConfigError


def momentum_schedule(step, total_steps, base_momentum=0.99):
    """BYOL's / MoBY's / DINO's cosine momentum schedule from ``base_momentum`` to 1.

        m(k) = 1 − (1 − m₀) · (cos(π k / K) + 1) / 2,    k clipped to [0, K].

    Args:
        step: int or scalar tensor. k, the number of updates done so far.
        total_steps: int or None. K; None keeps m = m₀ constant.
        base_momentum: float. m₀ (0.99 in MoBY, 0.996 in DINO).

    Returns:
        float32 scalar tensor m(k).

    Example:
        >>> float(momentum_schedule(0, 100))   # 0.99
        >>> float(momentum_schedule(100, 100))  # 1.0
    """
    m0 = ops.convert_to_tensor(base_momentum, "float32")
    if total_steps is None:
        return m0
    if int(total_steps) <= 0:
        raise ConfigError(f"momentum schedule total_steps must be > 0, got {total_steps}")
    k = ops.clip(ops.cast(step, "float32"), 0.0, float(total_steps))
    cos = ops.cos(ops.convert_to_tensor(3.141592653589793, "float32") * k / float(total_steps))
    return 1.0 - (1.0 - m0) * (cos + 1.0) / 2.0


def clone_fresh(model, what="network"):
    """A copy of ``model`` with the same architecture and its own (not shared) variables.

    Args:
        model: keras.Model or layer. Functional, Sequential, or a registered subclass with
            ``get_config``/``from_config``.
        what: str. Name used in error messages.
    """
    if isinstance(model, keras.Model):
        try:
            # recursive: nested sub-models (a keras.applications net inside a wrapper) must be
            # copied too, or the "momentum" twin would share their variables with the online net
            return keras.models.clone_model(model, recursive=True)
        except Exception as e:  # noqa: BLE001 - turned into an actionable message
            raise ConfigError(
                f"cannot copy the {what} {getattr(model, 'name', model)!r} to make its momentum twin "
                f"({type(e).__name__}: {e}). Use a functional/Sequential model or a registered subclass "
                "with get_config/from_config."
            ) from None
    return model.__class__.from_config(model.get_config())


def pair_and_freeze(online, target, what="network"):
    """Copy ``online``'s weights into ``target``, make the target's counterparts of the
    trainable weights non-trainable, and return their indices into ``.weights``.

    Args:
        online: built layer or model.
        target: built layer or model of the same architecture.
        what: str. Name used in error messages.

    Raises:
        ConfigError: the two do not have the same weights, or share variables.
    """
    ow, tw = online.weights, target.weights
    if len(ow) != len(tw) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(ow, tw)):
        raise ConfigError(f"the momentum copy of the {what} does not have the same weights as the "
                          "original; make sure the model's get_config rebuilds the same architecture")
    if {id(v) for v in ow} & {id(v) for v in tw}:
        raise ConfigError(f"the momentum copy of the {what} shares variables with the original "
                          "(a nested model was not copied); build the backbone as one functional model")
    target.set_weights(online.get_weights())
    trainable = {id(v) for v in online.trainable_weights}
    index = [i for i, v in enumerate(ow) if id(v) in trainable]
    for i in index:
        tw[i].trainable = False  # layer stays trainable (BatchNorm batch statistics), variable does not
    return index


def ema_update(pairs, m):
    """θ_target ← m·θ_target + (1 − m)·θ_online for every ``(online, target)`` variable pair."""
    m = ops.cast(m, "float32")
    for o, t in pairs:
        t.assign(m * ops.cast(t, "float32") + (1.0 - m) * ops.cast(o, "float32"))


class MomentumTeacher:
    """EMA twins of a list of online networks (the state lives in the twins' variables).

    Not a Keras layer: the method that owns it tracks ``online`` and ``targets`` as its
    own attributes (so they are saved), and this object only remembers which variables
    pair up.

    Args:
        online: list of built layers/models (e.g. encoder, projector).
        targets: list of their twins (built, same architecture), or None to clone them
            here with :func:`clone_fresh` (then build each clone before use).
        names: list of str. Names used in error messages.

    Example:
        >>> twins = [clone_fresh(encoder, "encoder")]
        >>> teacher = MomentumTeacher([encoder], twins, ["encoder"])
        >>> teacher.update(0.99)
    """

    def __init__(self, online, targets, names=None):
        self.online = list(online)
        self.targets = list(targets)
        names = list(names or [getattr(o, "name", f"network {i}") for i, o in enumerate(self.online)])
        if len(self.online) != len(self.targets):
            raise ConfigError("a momentum teacher needs one target per online network")
        self._index = [pair_and_freeze(o, t, n) for o, t, n in zip(self.online, self.targets, names)]

    def pairs(self):
        """``[(online_variable, target_variable), ...]`` updated by :meth:`update`."""
        out = []
        for o, t, index in zip(self.online, self.targets, self._index):
            ow, tw = o.weights, t.weights
            out.extend((ow[i], tw[i]) for i in index)
        return out

    def update(self, m):
        """One EMA step with momentum ``m`` (float or scalar tensor)."""
        ema_update(self.pairs(), m)


__all__ = ["MomentumTeacher", "clone_fresh", "ema_update", "momentum_schedule", "pair_and_freeze"]
