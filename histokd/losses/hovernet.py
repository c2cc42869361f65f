"""HoVer-Net training losses (Graham et al., HoVer-Net, MedIA 2019, §3.4, Eq. 1–4).

* NP and TP branches: cross-entropy (the official code calls it "bce") + soft Dice.
* HV branch: MSE of the maps + MSGE, the mean squared error of their gradients,
  restricted to nucleus pixels.

Numbers follow the official PyTorch code (vqdang/hover_net
``models/hovernet/utils.py``): CE renormalises the softmax and clamps it to
[1e-7, 1 − 1e-7]; Dice per class is ``1 − (2Σpt + 1e-3)/(Σp + Σt + 1e-3)`` summed
over classes (batch and space pooled); MSGE = Σ mask·(∇pred − ∇true)² /
(Σ mask + 1e-8) with 5×5 "Sobel-like" kernels ``x/(x² + y² + 1e-15)``.

**Gradient axis.** The paper differentiates the horizontal map along x and the
vertical map along y. Both official releases do the opposite (PyTorch builds the
kernels with ``torch.meshgrid``'s 'ij' indexing; the TF release swaps the
channels), i.e. they take d/dy of the horizontal map and d/dx of the vertical map.
``msge_axes="paper"`` (default) follows the paper; ``msge_axes="official"``
reproduces the released training. Inference is not affected.

**Term weights.** The PyTorch release weights every term 1 (default here); the
original TF release used mse 2, msge 1, ce 1, dice 1.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import keras
from keras import ops

from histokd.errors import ConfigError
from histokd.registry import LOSSES

DEFAULT_WEIGHTS = {"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 1.0, "hv_msge": 1.0, "tp_ce": 1.0, "tp_dice": 1.0}
TF_RELEASE_WEIGHTS = {"np_ce": 1.0, "np_dice": 1.0, "hv_mse": 2.0, "hv_msge": 1.0, "tp_ce": 1.0, "tp_dice": 1.0}


def xentropy_loss(true, prob, epsilon: float = 1e-7):
    """Categorical cross-entropy of one-hot ``true`` and probabilities ``prob`` [..., C], mean.

    Example:
        >>> float(xentropy_loss(np.eye(2)[None], np.full((1, 2, 2), 0.5, "float32")))  # doctest: +ELLIPSIS
        0.693...
    """
    prob = ops.convert_to_tensor(prob, "float32")
    true = ops.cast(true, prob.dtype)
    prob = prob / ops.sum(prob, axis=-1, keepdims=True)
    prob = ops.clip(prob, epsilon, 1.0 - epsilon)
    return ops.mean(-ops.sum(true * ops.log(prob), axis=-1))


def dice_loss(true, prob, smooth: float = 1e-3):
    """Soft Dice loss summed over classes, batch and space pooled per class ([B, H, W, C] inputs).

    Example:
        >>> t = np.eye(2, dtype="float32")[None, None]
        >>> float(dice_loss(t, t))
        0.0
    """
    prob = ops.convert_to_tensor(prob, "float32")
    true = ops.cast(true, prob.dtype)
    axes = tuple(range(len(prob.shape) - 1))
    inter = ops.sum(prob * true, axis=axes)
    denom = ops.sum(prob, axis=axes) + ops.sum(true, axis=axes)
    return ops.sum(1.0 - (2.0 * inter + smooth) / (denom + smooth))


def mse_loss(true, pred):
    """Mean squared error over every element."""
    pred = ops.convert_to_tensor(pred, "float32")
    return ops.mean(ops.square(pred - ops.cast(true, pred.dtype)))


def sobel_kernels(size: int = 5) -> Dict[str, np.ndarray]:
    """The official 5×5 "Sobel-like" kernels: d/dx = x/(x²+y²+1e-15), d/dy = y/(…).

    Returns:
        dict ``dx`` and ``dy`` [size, size] float32, indexed [row (y), column (x)],
        to be used as cross-correlation kernels.

    Example:
        >>> sobel_kernels()["dx"][2].tolist()
        [-0.5, -1.0, 0.0, 1.0, 0.5]
    """
    if size % 2 != 1:
        raise ConfigError(f"Sobel kernel size must be odd; got {size}")
    r = np.arange(-(size // 2), size // 2 + 1, dtype=np.float32)
    y, x = np.meshgrid(r, r, indexing="ij")
    denom = x * x + y * y + 1.0e-15
    return {"dx": (x / denom).astype(np.float32), "dy": (y / denom).astype(np.float32)}


def hv_gradients(hv, axes: str = "paper"):
    """Gradients of the two HV channels with the 5×5 kernels ([B, H, W, 2] → [B, H, W, 2]).

    Args:
        hv: [B, H, W, 2] horizontal (0) and vertical (1) maps.
        axes: ``"paper"`` (d/dx of channel 0, d/dy of channel 1) or ``"official"``
            (d/dy of channel 0, d/dx of channel 1, as both releases compute).
    """
    if axes not in ("paper", "official"):
        raise ConfigError(f"msge_axes={axes!r}; use 'paper' or 'official'")
    k = sobel_kernels(5)
    kh, kv = (k["dx"], k["dy"]) if axes == "paper" else (k["dy"], k["dx"])
    hv = ops.convert_to_tensor(hv, "float32")
    gh = ops.conv(hv[..., 0:1], ops.convert_to_tensor(kh[:, :, None, None]), padding="same")
    gv = ops.conv(hv[..., 1:2], ops.convert_to_tensor(kv[:, :, None, None]), padding="same")
    return ops.concatenate([gh, gv], axis=-1)


def msge_loss(true, pred, focus, axes: str = "paper"):
    """Mean squared gradient error of the HV maps over nucleus pixels.

    Args:
        true: [B, H, W, 2] target HV maps.
        pred: [B, H, W, 2] predicted HV maps.
        focus: [B, H, W] nucleus mask (1 inside nuclei).
        axes: gradient axes, see :func:`hv_gradients`.

    Example:
        >>> z = np.zeros((1, 8, 8, 2), "float32")
        >>> float(msge_loss(z, z, np.ones((1, 8, 8), "float32")))
        0.0
    """
    focus = ops.cast(ops.convert_to_tensor(focus), "float32")[..., None]
    focus = ops.concatenate([focus, focus], axis=-1)
    diff = hv_gradients(pred, axes) - hv_gradients(true, axes)
    return ops.sum(focus * ops.square(diff)) / (ops.sum(focus) + 1.0e-8)


def _check(name, true_shape, pred_shape):
    if tuple(true_shape[:3]) != tuple(pred_shape[:3]) and None not in tuple(true_shape[:3]) + tuple(pred_shape[:3]):
        raise ConfigError(f"HoVer-Net {name} target {tuple(true_shape)} does not match the output "
                          f"{tuple(pred_shape)}; crop targets to the model's output size "
                          "(164 fast, 80 original)")


def hovernet_loss_terms(targets, outputs, weights: Optional[Dict[str, float]] = None,
                        msge_axes: str = "paper") -> Dict[str, object]:
    """All HoVer-Net loss terms and their weighted sum.

    Args:
        targets: dict ``np`` [B, H, W] int (0/1), ``hv`` [B, H, W, 2], optional
            ``tp`` [B, H, W] int type ids (see :mod:`histokd.nuclei.targets`).
        outputs: dict of the model's **logits** ``np`` [B, H, W, 2], ``hv``
            [B, H, W, 2], optional ``tp`` [B, H, W, T].
        weights: dict of term weights (keys of :data:`DEFAULT_WEIGHTS`).
        msge_axes: ``"paper"`` or ``"official"`` (module docstring).

    Returns:
        dict with ``loss`` and every unweighted term (``np_ce``, ``np_dice``,
        ``hv_mse``, ``hv_msge`` and, with a TP branch, ``tp_ce``, ``tp_dice``).

    Example:
        >>> t = {"np": np.zeros((1, 8, 8), "int32"), "hv": np.zeros((1, 8, 8, 2), "float32")}
        >>> o = {"np": np.zeros((1, 8, 8, 2), "float32"), "hv": np.zeros((1, 8, 8, 2), "float32")}
        >>> sorted(hovernet_loss_terms(t, o))
        ['hv_msge', 'hv_mse', 'loss', 'np_ce', 'np_dice']
    """
    w = dict(DEFAULT_WEIGHTS)
    if weights:
        unknown = set(weights) - set(DEFAULT_WEIGHTS)
        if unknown:
            raise ConfigError(f"unknown HoVer-Net loss weight(s) {sorted(unknown)}; valid: {sorted(DEFAULT_WEIGHTS)}")
        w.update(weights)
    terms = {}
    true_np = ops.cast(ops.convert_to_tensor(targets["np"]), "int32")
    _check("np", true_np.shape, outputs["np"].shape)
    np_1h = ops.one_hot(true_np, 2)
    np_prob = ops.softmax(ops.cast(outputs["np"], "float32"), axis=-1)
    terms["np_ce"] = xentropy_loss(np_1h, np_prob)
    terms["np_dice"] = dice_loss(np_1h, np_prob)
    true_hv = ops.convert_to_tensor(targets["hv"], "float32")
    pred_hv = ops.cast(outputs["hv"], "float32")
    _check("hv", true_hv.shape, pred_hv.shape)
    terms["hv_mse"] = mse_loss(true_hv, pred_hv)
    terms["hv_msge"] = msge_loss(true_hv, pred_hv, np_1h[..., 1], axes=msge_axes)
    if "tp" in outputs and outputs["tp"] is not None:
        if "tp" not in targets:
            raise ConfigError("the model has a type branch but the targets have no 'tp' map; "
                              "give type maps or build the model with num_types=0")
        logits = ops.cast(outputs["tp"], "float32")
        true_tp = ops.cast(ops.convert_to_tensor(targets["tp"]), "int32")
        _check("tp", true_tp.shape, logits.shape)
        tp_1h = ops.one_hot(true_tp, int(logits.shape[-1]))
        tp_prob = ops.softmax(logits, axis=-1)
        terms["tp_ce"] = xentropy_loss(tp_1h, tp_prob)
        terms["tp_dice"] = dice_loss(tp_1h, tp_prob)
    total = 0.0
    for key, value in terms.items():
        total = total + w[key] * value
    terms["loss"] = total
    return terms


@keras.saving.register_keras_serializable(package="histokd")
class HoVerNetLoss(keras.losses.Loss):
    """The HoVer-Net loss as one Keras loss on dict targets/outputs.

    ``y_true`` and ``y_pred`` are the dicts of :func:`hovernet_loss_terms`; use it
    in a custom ``train_step`` / ``compute_loss`` (Keras' per-output losses cannot
    see the NP mask the MSGE needs).

    Args:
        weights: dict of term weights (default: all 1 as the PyTorch release).
        msge_axes: ``"paper"`` or ``"official"``.

    Example:
        >>> loss = HoVerNetLoss(msge_axes="official")
    """

    def __init__(self, weights: Optional[Dict[str, float]] = None, msge_axes: str = "paper",
                 name: str = "hovernet_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if msge_axes not in ("paper", "official"):
            raise ConfigError(f"msge_axes={msge_axes!r}; use 'paper' or 'official'")
        self.weights = dict(weights) if weights else None
        self.msge_axes = msge_axes

    def call(self, y_true, y_pred):
        return hovernet_loss_terms(y_true, y_pred, self.weights, self.msge_axes)["loss"]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(weights=self.weights, msge_axes=self.msge_axes)
        return cfg


def _example():
    """Targets and logits of a 2-image 16 × 16 batch with 3 nuclear types (registry tests)."""
    import numpy as np

    rng = np.random.default_rng(0)
    targets = {"np": (rng.random((2, 16, 16)) > 0.5).astype("int32"),
               "hv": rng.uniform(-1, 1, (2, 16, 16, 2)).astype("float32"),
               "tp": rng.integers(0, 3, (2, 16, 16)).astype("int32")}
    outputs = {"np": rng.standard_normal((2, 16, 16, 2)).astype("float32"),
               "hv": rng.standard_normal((2, 16, 16, 2)).astype("float32"),
               "tp": rng.standard_normal((2, 16, 16, 3)).astype("float32")}
    return (targets, outputs), {}


LOSSES.register("hovernet", hovernet_loss_terms, example=_example)
