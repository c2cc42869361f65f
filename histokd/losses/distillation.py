"""Teacher → student distillation losses: softened-logit KL, cross-entropy, per-stage feature terms.

Meng Li, "Transformer-Based Self-Supervised Learning and Distillation for Medical
Image Classification", §III-B–C. Eq. (1) and (2) of the paper:

    Loss_Distillation = Σ_j KL(z_T^j ‖ z_S^j) = Σ_j z_T^j · log(z_T^j / z_S^j)        (1)
    Total Loss        = Loss_Distillation + α · Loss_CE                               (2)

where z^j are the *softened* class probabilities (softmax of the logits divided by a
temperature T) of teacher and student, and α weights the cross-entropy with the
labels. §III-B adds layer-wise distillation over three stages, each with its own
α (0.2, 0.15, 0.1, optionally learnable). histokd computes, for a batch of B images,

    L = Σ_i α_i · D(P_i(F_S^i), F_T^i)                                   (stage terms)
      + τ² · (1/B) Σ_b Σ_j p_T^{bj} · (log p_T^{bj} − log p_S^{bj})       (Eq. 1)
      + α_CE · (1/B) Σ_b −log softmax(z_S^b)[y_b]                         (Eq. 2)

with p_T = softmax(z_T/τ), p_S = softmax(z_S/τ), F^i the stage-i feature maps, P_i
the student's learned projection to the teacher's width (spatially aligned), and D
the mean squared error or the mean (1 − cosine similarity) over positions. The τ²
factor is Hinton et al.'s convention ("Distilling the Knowledge in a Neural
Network", 2015) that keeps the KL gradients' scale independent of τ; it is not
written in Eq. (1) and can be switched off (``scale_by_t2=False``); at τ = 1 both
agree. The cross-entropy uses the student's unsoftened logits.
"""

from __future__ import annotations

from keras import ops

from histokd.errors import ConfigError
from histokd.registry import LOSSES

FEATURE_LOSSES = ("mse", "cosine")


def _check_logits(teacher_logits, student_logits):
    st, ss = tuple(teacher_logits.shape), tuple(student_logits.shape)
    if len(st) != 2 or len(ss) != 2:
        raise ConfigError(f"distillation expects logits of shape [batch, classes]; got teacher {st}, "
                          f"student {ss}")
    if st[1] is not None and ss[1] is not None and st[1] != ss[1]:
        raise ConfigError(f"teacher and student predict different numbers of classes ({st[1]} vs {ss[1]}); "
                          "give both heads the same num_classes")


def kd_kl(teacher_logits, student_logits, temperature=4.0, scale_by_t2=True):
    """KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), summed over classes, averaged over the batch (Eq. 1).

    Args:
        teacher_logits: tensor [B, C]. Teacher logits z_T (treated as constants).
        student_logits: tensor [B, C]. Student logits z_S.
        temperature: float. τ > 0.
        scale_by_t2: bool. Multiply by τ² (Hinton et al. 2015).

    Returns:
        float32 scalar tensor.

    Example:
        >>> kd_kl(keras.ops.array([[2.0, 0.0]]), keras.ops.array([[0.0, 0.0]]), temperature=1.0)
    """
    _check_logits(teacher_logits, student_logits)
    if temperature <= 0:
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    t = float(temperature)
    zt = ops.stop_gradient(ops.cast(teacher_logits, "float32")) / t
    zs = ops.cast(student_logits, "float32") / t
    log_pt = ops.log_softmax(zt, axis=-1)
    log_ps = ops.log_softmax(zs, axis=-1)
    kl = ops.mean(ops.sum(ops.exp(log_pt) * (log_pt - log_ps), axis=-1))
    return kl * (t * t) if scale_by_t2 else kl


def cross_entropy(labels, logits):
    """Mean cross-entropy of logits against integer labels [B] / [B, 1] or one-hot / soft labels [B, C].

    Args:
        labels: tensor. Class indices or per-class targets.
        logits: tensor [B, C].

    Returns:
        float32 scalar tensor.

    Example:
        >>> cross_entropy(keras.ops.array([1]), keras.ops.array([[0.0, 2.0]]))
    """
    logits = ops.cast(logits, "float32")
    logp = ops.log_softmax(logits, axis=-1)
    labels = ops.convert_to_tensor(labels)
    shape = tuple(labels.shape)
    if len(shape) == 2 and shape[1] not in (1, None) and shape[1] == logits.shape[-1]:
        return -ops.mean(ops.sum(ops.cast(labels, "float32") * logp, axis=-1))
    if len(shape) == 2 and shape[1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    elif len(shape) != 1:
        raise ConfigError(f"labels must be class indices [B] or one-hot [B, {logits.shape[-1]}]; got shape {shape}")
    onehot = ops.one_hot(ops.cast(labels, "int32"), ops.shape(logits)[-1], dtype="float32")
    return -ops.mean(ops.sum(onehot * logp, axis=-1))


def feature_alignment(student, teacher, kind="mse"):
    """Distance between an aligned student stage output and the teacher's (teacher is a constant).

    Args:
        student: tensor [B, ..., C]. Projected and spatially aligned student features.
        teacher: tensor [B, ..., C]. Teacher features, same shape.
        kind: str. ``mse`` (mean of squared differences over every element) or ``cosine``
            (mean over batch and positions of 1 − cosine similarity along channels).

    Returns:
        float32 scalar tensor.

    Example:
        >>> feature_alignment(keras.ops.ones((2, 4, 4, 8)), keras.ops.zeros((2, 4, 4, 8)))  # 1.0
    """
    if kind not in FEATURE_LOSSES:
        raise ConfigError(f"feature loss must be one of {FEATURE_LOSSES}, got {kind!r}")
    ss, st = tuple(student.shape), tuple(teacher.shape)
    if len(ss) != len(st) or any(a is not None and b is not None and a != b for a, b in zip(ss[1:], st[1:])):
        raise ConfigError(f"stage features must be aligned before comparing; got student {ss}, teacher {st}")
    s = ops.cast(student, "float32")
    t = ops.stop_gradient(ops.cast(teacher, "float32"))
    if kind == "mse":
        return ops.mean(ops.square(s - t))
    sn = s / ops.maximum(ops.norm(s, axis=-1, keepdims=True), 1e-12)
    tn = t / ops.maximum(ops.norm(t, axis=-1, keepdims=True), 1e-12)
    return ops.mean(1.0 - ops.sum(sn * tn, axis=-1))


def distillation_loss(student_logits, teacher_logits, labels=None, student_features=(), teacher_features=(),
                      stage_weights=None, temperature=4.0, ce_weight=1.0, feature_loss="mse", scale_by_t2=True):
    """The full distillation objective (see the module docstring for the exact formula).

    Args:
        student_logits: tensor [B, C]. z_S.
        teacher_logits: tensor [B, C]. z_T (constant).
        labels: tensor or None. Class indices [B] or one-hot [B, C]; None only when
            ``ce_weight`` is 0.
        student_features: list of tensors. Aligned student stage outputs P_i(F_S^i).
        teacher_features: list of tensors. Teacher stage outputs F_T^i (same shapes).
        stage_weights: tensor/list [n] or None. α_i per stage (0 disables a stage).
        temperature: float. τ.
        ce_weight: float. α_CE, the α of Eq. (2).
        feature_loss: str. ``mse`` or ``cosine``.
        scale_by_t2: bool. Multiply the KL by τ².

    Returns:
        dict with ``loss`` (total), ``kd``, ``ce``, ``feature`` (Σ α_i·D_i) and
        ``stage_losses`` (tensor [n] of the unweighted D_i, zeros when n = 0).

    Example:
        >>> terms = distillation_loss(zs, zt, y, [fs1, fs2, fs3], [ft1, ft2, ft3], [0.2, 0.15, 0.1])
    """
    if len(student_features) != len(teacher_features):
        raise ConfigError(f"{len(student_features)} student stages but {len(teacher_features)} teacher stages")
    kd = kd_kl(teacher_logits, student_logits, temperature, scale_by_t2)
    if labels is None:
        if ce_weight:
            raise ConfigError("the distillation loss weights cross-entropy with labels (ce_weight="
                              f"{ce_weight}) but the batch has no labels; yield (images, labels) or set ce_weight=0")
        ce = ops.zeros((), "float32")
    else:
        ce = cross_entropy(labels, student_logits)
    total = kd + float(ce_weight) * ce
    n = len(student_features)
    if n:
        stage = ops.stack([feature_alignment(s, t, feature_loss) for s, t in zip(student_features, teacher_features)])
        if stage_weights is None:
            raise ConfigError("stage features given without stage_weights (the α_i)")
        w = ops.cast(ops.convert_to_tensor(stage_weights), "float32")
        if tuple(w.shape) != (n,):
            raise ConfigError(f"need one α per stage ({n}); got stage_weights of shape {tuple(w.shape)}")
        feature = ops.sum(w * stage)
        total = total + feature
    else:
        stage = ops.zeros((0,), "float32")
        feature = ops.zeros((), "float32")
    return {"loss": total, "kd": kd, "ce": ce, "feature": feature, "stage_losses": stage}


def _logits():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 5)).astype("float32"), rng.standard_normal((8, 5)).astype("float32")


def _example_kd():
    t, s = _logits()
    return (t, s), {}


def _example_distillation():
    import numpy as np

    s, t = _logits()
    rng = np.random.default_rng(1)
    feats = [rng.standard_normal((8, 4, 4, 6)).astype("float32") for _ in range(2)]
    return (s, t, np.arange(8) % 5, [feats[0]], [feats[1]]), {"stage_weights": [0.2]}


def _example_features():
    import numpy as np

    rng = np.random.default_rng(2)
    return (rng.standard_normal((8, 4, 4, 6)).astype("float32"), rng.standard_normal((8, 4, 4, 6)).astype("float32")), {}


LOSSES.register("kd_kl", kd_kl, example=_example_kd)
LOSSES.register("distillation", distillation_loss, example=_example_distillation)
LOSSES.register("feature_alignment", feature_alignment, example=_example_features)
