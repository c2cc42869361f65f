"""Progressive layer-wise teacher → student distillation.

Meng Li, "Transformer-Based Self-Supervised Learning and Distillation for Medical
Image Classification", §III-B (Fig. 1) and §III-C, Eq. (1)–(2): a frozen teacher
(e.g. a fine-tuned Swin V2-B) guides a student (Swin V2-T) through the softened
class probabilities (KL, Eq. 1), the labels (α·CE, Eq. 2) and, layer by layer, the
stage outputs, each stage with its own weight α_i (paper: 0.2, 0.15, 0.1 across three
stages; "the α parameter also can be a learnable parameter"). The exact objective is
written in :mod:`histokd.losses.distillation`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import List, Optional

import keras
import numpy as np
from keras import ops

from histokd.errors import ConfigError
from histokd.losses.distillation import FEATURE_LOSSES, distillation_loss
from histokd.methods.base import Method, build_encoder, image_shape, unpack
from histokd.registry import METHODS

PAPER_ALPHAS = (0.2, 0.15, 0.1)


@dataclasses.dataclass
class DistillConfig:
    """Teacher → student distillation (Swin V2 paper, §III-B, Eq. 1–2); YAML section ``distill``.

    The student is ``model.backbone`` with a softmax head; the teacher is the trained
    classifier of another histokd run (``teacher``: its run directory, e.g. a fine-tuned
    Swin-B), frozen.

    Args:
        teacher: str. Run directory of the teacher (a finished ``supervised`` run, e.g. fine-tuning).
        stage_alphas: list. α_i per distilled stage, shallow → deep (paper: 0.2, 0.15, 0.1
            over three stages); null = evenly spaced 0.2 → 0.1 over the paired stages.
        stages: int. Number of deepest stages to distil (paper: 3); null = every stage.
        learnable_alphas: bool. α_i as constrained learnable parameters (the paper's variant).
        temperature: float. τ of the KL term, Eq. (1).
        ce_weight: float. α of Eq. (2), weight of the cross-entropy on labels.
        feature_loss: str. ``mse`` or ``cosine`` feature alignment after projection.
        schedule: str. ``fixed`` or ``progressive`` (stages switched on deep → shallow).
        stage_interval_epochs: float. Epochs between switching on successive stages (progressive).
    """

    teacher: Optional[str] = None
    stage_alphas: Optional[List[float]] = dataclasses.field(default_factory=lambda: [0.2, 0.15, 0.1])
    stages: Optional[int] = 3
    learnable_alphas: bool = False
    temperature: float = 4.0
    ce_weight: float = 1.0
    feature_loss: str = "mse"
    schedule: str = "fixed"
    stage_interval_epochs: float = 1.0

    #: allowed values, checked with the other sections' choices
    CHOICES = {"feature_loss": ["mse", "cosine"], "schedule": ["fixed", "progressive"]}


# ------------------------------------------------------------------ layer look-up and taps
def _children(layer):
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is None:
        return []
    return list(flatten(include_self=False, recursive=False))


def _walk(model):
    """``(path, layer)`` for every sub-layer of ``model``, depth first, each layer once."""
    out, seen = [], set()

    def rec(layer, prefix):
        for child in _children(layer):
            if id(child) in seen or type(child).__name__ == "InputLayer":
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            out.append((path, child))
            rec(child, path + "/")

    rec(model, "")
    return out


def find_backbone(model):
    """The first layer of ``model`` (itself included) exposing a non-empty ``stage_names``."""
    if getattr(model, "stage_names", None):
        return model
    for _, layer in _walk(model):
        if getattr(layer, "stage_names", None):
            return layer
    return None


def resolve_layers(model, names, role):
    """Layers of ``model`` called ``names`` (layer names or ``a/b`` paths), in order."""
    layers = _walk(model)
    by_path = {p: l for p, l in layers}
    by_name = {}
    for p, l in layers:
        by_name.setdefault(l.name, []).append(p)
    out = []
    for n in names:
        if n in by_path:
            out.append((n, by_path[n]))
        elif n in by_name and len(by_name[n]) == 1:
            out.append((by_name[n][0], by_path[by_name[n][0]]))
        elif n in by_name:
            raise ConfigError(f"{role} layer name {n!r} is ambiguous (paths {by_name[n]}); give the path")
        else:
            sample = ", ".join(p for p, _ in layers[:40])
            raise ConfigError(f"the {role} model {model.name!r} has no layer {n!r}; its layers are: {sample}"
                              + (" ..." if len(layers) > 40 else ""))
    return out


class _Untracked:
    """A plain attribute bag that Keras' layer tracking does not look into."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


_TAP_LOCK = threading.Lock()
_TAP_LOCAL = threading.local()   # the recorder active in this thread (one per replica thread)
_TAP_PATCHED = {}                # id(layer) -> [users, layer]


def _tap_wrapper(layer, original):
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        rec = getattr(_TAP_LOCAL, "active", None)
        if rec is not None:
            key = rec.keys.get(id(layer))
            if key is not None and key not in rec.outputs:
                rec.outputs[key] = out[0] if isinstance(out, (tuple, list)) else out
        return out

    return wrapper


class _Taps:
    """Records the first output of chosen layers during one forward pass.

    Wrapping the layer instances' ``call`` works for flat and nested functional,
    Sequential and subclassed models alike, in eager mode and while tracing, and the
    recorded tensors are part of the differentiable computation. MirroredStrategy
    traces each replica in its own thread and may switch threads in the middle of a
    forward pass (at a cross-replica BatchNorm reduction), so the wrapper is installed
    once for all threads (reference counted) and records into the calling thread's
    active recorder.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        self.keys = {id(layer): key for key, layer in self.layers}
        self.outputs = {}

    def __enter__(self):
        with _TAP_LOCK:
            for _, layer in self.layers:
                entry = _TAP_PATCHED.get(id(layer))
                if entry is None:
                    if "call" in vars(layer):
                        raise ConfigError(f"layer {layer.name!r} is already being recorded by another "
                                          "analysis; finish it before distilling")
                    object.__setattr__(layer, "call", _tap_wrapper(layer, layer.call))
                    _TAP_PATCHED[id(layer)] = [1, layer]
                else:
                    entry[0] += 1
        self._previous = getattr(_TAP_LOCAL, "active", None)
        _TAP_LOCAL.active = self
        return self

    def __exit__(self, *exc):
        _TAP_LOCAL.active = self._previous
        with _TAP_LOCK:
            for _, layer in self.layers:
                entry = _TAP_PATCHED.get(id(layer))
                if entry is None:
                    continue
                entry[0] -= 1
                if entry[0] == 0:
                    del _TAP_PATCHED[id(layer)]
                    if "call" in vars(layer):
                        object.__delattr__(layer, "call")
        return False


# ------------------------------------------------------------------ stage alignment
def _layout(shape, role):
    """How a stage output of ``shape`` (batch excluded) is compared.

    Returns ``("grid", h, w, c, drop)`` for feature maps and square token grids (``drop``
    leading class tokens removed), ``("seq", n, c)`` for other token sequences, or
    ``("vec", c)`` for vectors.
    """
    shape = tuple(shape)
    if len(shape) == 3:
        return ("grid", shape[0], shape[1], shape[2], 0)
    if len(shape) == 2:
        n, c = shape
        if n is not None:
            for drop in (0, 1):
                side = math.isqrt(n - drop) if n - drop > 0 else 0
                if side * side == n - drop and side > 0:
                    return ("grid", side, side, c, drop)
        return ("seq", n, c)
    if len(shape) == 1:
        return ("vec", shape[0])
    raise ConfigError(f"{role} stage output of shape {shape} is not a feature map [H, W, C], a token "
                      "sequence [N, C] or a vector [C]; choose other stage layers")


def _canonical(x, layout):
    if layout[0] == "grid" and len(x.shape) == 3:
        _, h, w, c, drop = layout
        x = x[:, drop:, :]
        return ops.reshape(x, (-1, h, w, c))
    return x


@keras.saving.register_keras_serializable(package="histokd")
class StageAligner(keras.layers.Layer):
    """Maps a student stage output onto the layout of the teacher's stage output.

    Token sequences with a square number of tokens (after an optional class token)
    become feature maps; the spatial size is matched by average pooling (integer
    factor) or bilinear resizing; the width is matched by a learned 1×1 projection
    (a dense layer on the channel axis) when widths differ (``project="auto"``) or
    always (``project="always"``). A student map compared with a teacher vector is
    globally averaged first.

    Args:
        student_shape: tuple. Student stage output shape without the batch axis.
        teacher_shape: tuple. Teacher stage output shape without the batch axis.
        project: str. ``auto`` or ``always``.

    Example:
        >>> a = StageAligner((16, 16, 32), (8, 8, 96))
        >>> a(keras.random.normal((2, 16, 16, 32))).shape  # (2, 8, 8, 96)
    """

    def __init__(self, student_shape, teacher_shape, project="auto", **kwargs):
        super().__init__(**kwargs)
        if project not in ("auto", "always"):
            raise ConfigError(f"stage projection must be 'auto' or 'always', got {project!r}")
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.project = project
        self.s_layout = _layout(self.student_shape, "student")
        self.t_layout = _layout(self.teacher_shape, "teacher")
        s, t = self.s_layout, self.t_layout
        self.pool = None      # ("avg", (fh, fw)) | ("resize", (H, W)) | ("global",) | ("tokens",)
        if t[0] == "grid":
            if s[0] != "grid":
                raise ConfigError(
                    f"cannot align a student stage of shape {self.student_shape} with a teacher feature map "
                    f"{self.teacher_shape}: the student stage has no spatial layout. Pick matching stages "
                    "(stage_pairs) or other stage layers"
                )
            (h, w), (H, W) = s[1:3], t[1:3]
            if None not in (h, w, H, W) and (h, w) != (H, W):
                if h % H == 0 and w % W == 0:
                    self.pool = ("avg", (h // H, w // W))
                else:
                    self.pool = ("resize", (H, W))
        elif t[0] == "vec":
            if s[0] == "grid":
                self.pool = ("global",)
            elif s[0] == "seq":
                self.pool = ("tokens",)
        else:  # teacher token sequence that is not a square grid
            if s[0] != "seq" or (s[1] is not None and t[1] is not None and s[1] != t[1]):
                raise ConfigError(
                    f"cannot align student stage {self.student_shape} with teacher stage {self.teacher_shape}: "
                    "token sequences must have the same length unless they form square grids"
                )
        c_s, c_t = self.s_layout[-2] if s[0] == "grid" else s[-1], t[-2] if t[0] == "grid" else t[-1]
        self.student_width, self.teacher_width = c_s, c_t
        self.needs_projection = project == "always" or c_s != c_t
        self.proj = keras.layers.Dense(c_t, name="proj") if self.needs_projection else None

    def build(self, input_shape=None):
        if self.proj is not None:
            self.proj.build((None, self.student_width))
        self.built = True

    def call(self, x):
        x = _canonical(x, self.s_layout)
        if self.pool is not None:
            kind = self.pool[0]
            if kind == "avg":
                f = self.pool[1]
                x = ops.average_pool(x, f, strides=f, padding="valid", data_format="channels_last")
            elif kind == "resize":
                x = ops.image.resize(x, self.pool[1], interpolation="bilinear", data_format="channels_last")
            elif kind == "global":
                x = ops.mean(x, axis=(1, 2))
            else:
                x = ops.mean(x, axis=1)
        return self.proj(x) if self.proj is not None else x

    def get_config(self):
        cfg = super().get_config()
        cfg.update(student_shape=list(self.student_shape), teacher_shape=list(self.teacher_shape),
                   project=self.project)
        return cfg


# ------------------------------------------------------------------ the method
def _logit(p):
    return math.log(p / (1.0 - p))


@keras.saving.register_keras_serializable(package="histokd")
class Distiller(Method):
    """Teacher → student distillation with per-stage feature terms (Swin V2 paper, Eq. 1–2).

    ``fit`` trains the student (and the stage projections, and the α_i when learnable)
    on a dataset yielding ``(images, labels)`` or ``({"image": images}, labels)``;
    the teacher is frozen (``trainable=False``, run in inference mode, outputs under
    ``stop_gradient``). ``distiller.student`` is the exportable classifier;
    ``distiller(images)`` returns the student's output.

    Loss (see :mod:`histokd.losses.distillation`)::

        L = Σ_i w_i · D(P_i(F_S^i), F_T^i) + τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ)) + α_CE · CE(y, z_S)

    with ``w_i = α_i · mask_i``. Stages are read from the layers named by each
    backbone's ``stage_names`` (the first sub-layer exposing it) or from
    ``student_stages``/``teacher_stages``; student stage i is compared with teacher
    stage ``stage_pairs[i]`` (default: i ↔ i when both have the same number of stages).
    A stage whose shape differs from its teacher's gets a :class:`StageAligner`
    (pool/resize + learned 1×1 projection); an impossible pairing raises ConfigError.

    Heads that end in a softmax are handled: their log-probabilities serve as logits
    (softmax(log p / τ) = softmax(z / τ) exactly). Sample weights reach the compiled
    metrics only; the loss is the unweighted batch mean. Constructing a Distiller sets
    ``teacher.trainable = False``.

    Args:
        teacher: keras.Model. Trained classifier, images in [0, 1] → logits or probabilities.
        student: keras.Model. Classifier to train (same classes).
        student_stages, teacher_stages: "auto", list of str, or None. Stage layer
            names/paths; "auto" reads the backbone's ``stage_names``; None or [] for
            logit-only distillation.
        stage_pairs: "auto" or list of (student_index, teacher_index).
        stage_alphas: list of float or None. α_i in stage order (shallow → deep); default:
            evenly spaced from 0.2 down to 0.1 (the paper's 0.2, 0.15, 0.1 for three stages).
        learnable_alphas: bool. α_i = lo + (hi − lo)·sigmoid(θ_i), θ_i trained, starting at
            the given α_i. Note that the gradient of the loss alone always pushes α_i
            towards ``lo``; the bounds are what keep the stage terms alive.
        alpha_bounds: (lo, hi) or None. Range of learnable α (default: half the smallest
            and twice the largest initial α).
        temperature: float. τ of Eq. (1) (the paper gives none; 4 is common).
        ce_weight: float. α of Eq. (2), the cross-entropy weight.
        feature_loss: str. ``mse`` or ``cosine``.
        scale_by_t2: bool. Multiply the KL by τ² (Hinton et al.).
        schedule: str. ``fixed`` (every stage from the start) or ``progressive``: the
            deepest stage is on from step 0 and one more, from deep to shallow, is
            switched on every ``stage_interval`` optimizer steps.
        stage_interval: int. Steps between stage activations (``progressive`` only).
        project: str. ``auto`` (project only when widths differ) or ``always``.
        teacher_outputs, student_outputs: str. ``auto`` (detected once, on a probe
            batch), ``logits`` or ``probabilities``.
        image_shape: tuple or None. (H, W, C) of the probe batch used to read stage
            shapes (default: the models' input shape).

    Example:
        >>> d = Distiller(teacher=swin_b_classifier, student=swin_t_classifier, stage_alphas=[0.2, 0.15, 0.1],
        ...               stage_pairs=[(1, 1), (2, 2), (3, 3)])
        >>> d.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"])
        >>> d.fit(train_ds, epochs=10)
        >>> d.student.save("student.keras")
    """

    Config = DistillConfig
    config_section = "distill"
    batch_inputs = ("image",)
    cross_replica = "mean"
    nested = ("teacher", "student")

    def __init__(self, teacher, student, student_stages="auto", teacher_stages="auto", stage_pairs="auto",
                 stage_alphas=None, learnable_alphas=False, alpha_bounds=None, temperature=4.0, ce_weight=1.0,
                 feature_loss="mse", scale_by_t2=True, schedule="fixed", stage_interval=None, project="auto",
                 teacher_outputs="auto", student_outputs="auto", image_shape=None, **kwargs):
        super().__init__(**kwargs)
        if teacher is student:
            raise ConfigError("the teacher and the student are the same model; distil into a separate student")
        if feature_loss not in FEATURE_LOSSES:
            raise ConfigError(f"feature_loss must be one of {FEATURE_LOSSES}, got {feature_loss!r}")
        if schedule not in ("fixed", "progressive"):
            raise ConfigError(f"schedule must be 'fixed' or 'progressive', got {schedule!r}")
        if float(temperature) <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        for which, v in (("teacher_outputs", teacher_outputs), ("student_outputs", student_outputs)):
            if v not in ("auto", "logits", "probabilities"):
                raise ConfigError(f"{which} must be 'auto', 'logits' or 'probabilities', got {v!r}")
        self.teacher = teacher
        self.student = student
        self.teacher.trainable = False
        shared = {id(v) for v in teacher.weights} & {id(v) for v in student.weights}
        if shared:
            raise ConfigError("teacher and student share weights; build the student from fresh layers")
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.feature_loss = feature_loss
        self.scale_by_t2 = bool(scale_by_t2)
        self.schedule = schedule
        self.project = project
        self.learnable_alphas = bool(learnable_alphas)

        self._stage_specs = {"student": student_stages, "teacher": teacher_stages}
        s_names, s_taps = self._stage_layers(student, student_stages, "student")
        t_names, t_taps = self._stage_layers(teacher, teacher_stages, "teacher")
        self.student_stages, self.teacher_stages = s_names, t_names
        # kept out of Keras' attribute tracking: these layers already belong to the models
        self._taps = _Untracked(student=s_taps, teacher=t_taps)
        self.stage_pairs = self._pairs(stage_pairs, len(s_names), len(t_names))
        n = len(self.stage_pairs)

        if stage_alphas is None:
            # evenly spaced 0.2 → 0.1: exactly the paper's (0.2, 0.15, 0.1) for three stages
            stage_alphas = list(np.linspace(PAPER_ALPHAS[0], PAPER_ALPHAS[-1], n)) if n > 1 else [PAPER_ALPHAS[0]] * n
        self.stage_alphas = [float(a) for a in stage_alphas]
        if len(self.stage_alphas) != n:
            raise ConfigError(f"{len(self.stage_alphas)} stage_alphas for {n} distilled stages; give one α per pair")
        if any(a < 0 for a in self.stage_alphas):
            raise ConfigError(f"stage_alphas must be >= 0, got {self.stage_alphas}")
        if schedule == "progressive":
            if stage_interval is None or int(stage_interval) < 1:
                raise ConfigError("schedule='progressive' needs stage_interval (optimizer steps between "
                                  "switching on successive stages, deep to shallow), e.g. steps_per_epoch")
        self.stage_interval = None if stage_interval is None else int(stage_interval)

        if self.learnable_alphas and n:
            if alpha_bounds is None:
                alpha_bounds = (0.5 * min(self.stage_alphas), 2.0 * max(self.stage_alphas))
            lo, hi = float(alpha_bounds[0]), float(alpha_bounds[1])
            if not (0.0 <= lo < hi):
                raise ConfigError(f"alpha_bounds must satisfy 0 <= lo < hi, got {alpha_bounds}")
            if not all(lo < a < hi for a in self.stage_alphas):
                raise ConfigError(f"initial stage_alphas {self.stage_alphas} must lie strictly inside "
                                  f"alpha_bounds ({lo}, {hi})")
            self.alpha_bounds = (lo, hi)
            theta0 = np.array([_logit((a - lo) / (hi - lo)) for a in self.stage_alphas], "float32")
            self.alpha_logits = self.add_weight(shape=(n,), initializer=keras.initializers.Constant(theta0),
                                                trainable=True, name="alpha_logits")
        else:
            self.alpha_bounds = None if alpha_bounds is None else tuple(float(b) for b in alpha_bounds)
            self.alpha_logits = None

        self.image_shape = self._image_shape(image_shape)
        probe = self._probe()
        self.teacher_outputs = teacher_outputs if teacher_outputs != "auto" else probe["teacher_kind"]
        self.student_outputs = student_outputs if student_outputs != "auto" else probe["student_kind"]
        self.aligners = []
        self._t_layouts = []
        for i, (si, ti) in enumerate(self.stage_pairs):
            s_shape, t_shape = probe["student"][si], probe["teacher"][ti]
            try:
                aligner = StageAligner(s_shape, t_shape, project=project, name=f"align_{i}")
            except ConfigError as e:
                raise ConfigError(f"stage pair {i} (student {s_names[si]!r} → teacher {t_names[ti]!r}): {e}") from None
            aligner.build()
            self.aligners.append(aligner)
            self._t_layouts.append(aligner.t_layout)
        self.track("loss", "kd", "ce", "feature")
        self.built = True

    # -- run-config hooks ------------------------------------------------------------------
    @classmethod
    def validate_run_config(cls, cfg):
        if not cls.section(cfg).teacher:
            raise ConfigError(f"model.method={cfg.model.method} needs distill.teacher: the run directory of a "
                              "trained teacher (e.g. runs/finetune_swinv2_base)")

    @classmethod
    def from_run_config(cls, cfg, num_classes, total_steps=None):
        """Frozen teacher (another run's classifier) → fresh student (Swin V2 paper §III-B, Eq. 1–2)."""
        from histokd.methods.supervised import Supervised
        from histokd.runs import load_trained_model

        d = cls.section(cfg)
        teacher, tcfg = load_trained_model(d.teacher)
        if not isinstance(teacher, Supervised):
            raise ConfigError(f"distill.teacher {d.teacher} is a {tcfg.model.method!r} run; the teacher must "
                              "be a trained classifier (a supervised / fine-tuning run)")
        if teacher.num_classes != num_classes:
            raise ConfigError(f"the teacher in {d.teacher} predicts {teacher.num_classes} classes but this "
                              f"dataset has {num_classes}; distil on the teacher's task")
        if tcfg.data.image_size != cfg.data.image_size:
            raise ConfigError(f"the teacher was trained on {tcfg.data.image_size}px images, this run uses "
                              f"{cfg.data.image_size}px; set data.image_size={tcfg.data.image_size}")
        teacher.name = "teacher"
        student = Supervised(build_encoder(cfg, "student_encoder"), num_classes=num_classes, name="student")
        student.build()
        ns = len(getattr(find_backbone(student), "stage_names", None) or [])
        nt = len(getattr(find_backbone(teacher), "stage_names", None) or [])
        k = min(ns, nt) if d.stages is None else int(d.stages)
        if k > min(ns, nt):
            raise ConfigError(f"distill.stages={k} but the student has {ns} stages and the teacher {nt}")
        # the k deepest stages of each, paired in order (paper: three stages)
        pairs = [(ns - k + i, nt - k + i) for i in range(k)]
        steps_per_epoch = max(1, (total_steps or 1) // cfg.train.epochs)
        interval = max(1, int(round(d.stage_interval_epochs * steps_per_epoch)))
        return cls(teacher, student, stage_pairs=pairs if k else None,
                   student_stages="auto" if k else None, teacher_stages="auto" if k else None,
                   stage_alphas=d.stage_alphas if k else [], learnable_alphas=d.learnable_alphas,
                   temperature=d.temperature, ce_weight=d.ce_weight, feature_loss=d.feature_loss,
                   schedule=d.schedule, stage_interval=interval if d.schedule == "progressive" else None,
                   image_shape=image_shape(cfg), name="distiller")

    @classmethod
    def compile_defaults(cls, cfg):
        return {"metrics": ["accuracy"]}

    @classmethod
    def tiny_overrides(cls, workdir):
        """A teacher run directory in ``workdir`` (an untrained supervised classifier of the
        tiny config, saved as a finished run) and the overrides that distil from it."""
        from pathlib import Path

        from histokd.methods.base import TINY_CLASSES, tiny_run_config
        from histokd.methods.supervised import Supervised

        overrides = ["views.kind=identity", "views.downsample=null", "distill.schedule=fixed"]
        cfg = tiny_run_config("supervised", workdir, ["name=tiny_teacher"])
        run_dir = Path(cfg.output_dir) / cfg.name
        weights = run_dir / "checkpoints" / "last.weights.h5"
        if not weights.exists():
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
            Supervised.from_run_config(cfg, num_classes=TINY_CLASSES).save_weights(weights)
        return overrides + [f"distill.teacher={run_dir}"]

    @classmethod
    def branch_input_kinds(cls, cfg):
        from histokd.methods.supervised import Supervised

        return Supervised.branch_input_kinds(cfg)  # the student is a supervised classifier

    # -- construction helpers ---------------------------------------------------------------
    @staticmethod
    def _stage_layers(model, spec, role):
        """(names, [(key, layer)]) of the stage layers chosen by ``spec``."""
        if spec is None or (isinstance(spec, (list, tuple)) and not spec):
            return [], []
        if isinstance(spec, str) and spec == "auto":
            bb = find_backbone(model)
            if bb is None:
                raise ConfigError(
                    f"the {role} model {model.name!r} has no backbone exposing stage_names; pass "
                    f"{role}_stages=[layer names] or student_stages=None, teacher_stages=None "
                    "for logit-only distillation"
                )
            names = [str(n) for n in bb.stage_names]
            return names, resolve_layers(bb, names, role)  # names are relative to the backbone
        if isinstance(spec, str):
            raise ConfigError(f"{role}_stages must be 'auto', None or a list of layer names, got {spec!r}")
        names = [str(n) for n in spec]
        return names, resolve_layers(model, names, role)

    @staticmethod
    def _pairs(spec, ns, nt):
        if ns == 0 and nt == 0:
            return []
        if spec == "auto" or spec is None:
            if ns != nt:
                raise ConfigError(
                    f"the student has {ns} stages and the teacher {nt}; pass stage_pairs=[(student_index, "
                    "teacher_index), ...] to say which student stage learns from which teacher stage"
                )
            return [(i, i) for i in range(ns)]
        pairs = []
        for p in spec:
            if len(p) != 2:
                raise ConfigError(f"each stage pair is (student_index, teacher_index), got {p!r}")
            si, ti = int(p[0]), int(p[1])
            if not (0 <= si < ns and 0 <= ti < nt):
                raise ConfigError(f"stage pair {p!r} out of range: student has {ns} stages, teacher {nt}")
            pairs.append((si, ti))
        return pairs

    def _image_shape(self, image_shape):
        if image_shape is not None:
            return tuple(int(d) for d in image_shape)
        for m in (self.student, self.teacher, find_backbone(self.student), find_backbone(self.teacher)):
            try:
                shape = tuple(m.input_shape[1:])
            except (AttributeError, ValueError, TypeError):
                continue
            if shape and None not in shape:
                return tuple(int(d) for d in shape)
        raise ConfigError("Distiller cannot tell the input image shape; pass image_shape=(H, W, 3)")

    def _probe(self):
        """One inference pass on a random batch: stage shapes and output kinds."""
        x = np.random.default_rng(0).uniform(size=(2,) + self.image_shape).astype("float32")
        res = {}
        for role, model, taps in (("student", self.student, self._taps.student), ("teacher", self.teacher, self._taps.teacher)):
            with _Taps(taps) as tap:
                out = model(x, training=False)
            missing = [k for k, _ in taps if k not in tap.outputs]
            if missing:
                raise ConfigError(f"the {role}'s stage layers {missing} were not called in its forward pass")
            res[role] = [tuple(tap.outputs[k].shape[1:]) for k, _ in taps]
            out = ops.convert_to_numpy(out)
            if out.ndim != 2:
                raise ConfigError(f"the {role} must output class scores [B, classes]; got shape {out.shape}")
            is_prob = bool(np.all(out >= 0) and np.all(out <= 1) and np.allclose(out.sum(-1), 1.0, atol=1e-3))
            res[f"{role}_kind"] = "probabilities" if is_prob else "logits"
            res[f"{role}_classes"] = out.shape[-1]
        if res["student_classes"] != res["teacher_classes"]:
            raise ConfigError(f"the teacher predicts {res['teacher_classes']} classes and the student "
                              f"{res['student_classes']}; they must match")
        return res

    # -- α and the progressive mask ----------------------------------------------------------
    def alphas(self):
        """Current α_i (tensor [n]); learnable ones are kept inside ``alpha_bounds``."""
        if self.alpha_logits is not None:
            lo, hi = self.alpha_bounds
            return lo + (hi - lo) * ops.sigmoid(ops.convert_to_tensor(self.alpha_logits))
        return ops.convert_to_tensor(np.array(self.stage_alphas, "float32"))

    def stage_mask(self, step):
        """1 for the stages switched on at optimizer step ``step``, else 0 (tensor [n])."""
        n = len(self.stage_pairs)
        if self.schedule != "progressive" or n == 0:
            return ops.ones((n,), "float32")
        on = ops.minimum(n, 1 + ops.floor_divide(ops.cast(step, "int32"), self.stage_interval))
        idx = ops.arange(n, dtype="int32")
        return ops.cast(idx >= n - on, "float32")

    def stage_weights(self, step=None):
        if step is None:
            opt = getattr(self, "optimizer", None)
            step = opt.iterations if opt is not None else 0
        return self.alphas() * self.stage_mask(step)

    # -- forward ---------------------------------------------------------------------------
    @staticmethod
    def _images(x):
        if isinstance(x, dict):
            if "image" not in x:
                raise ConfigError(f"Distiller expects images or a dict with 'image'; got keys {sorted(x)}")
            return x["image"]
        return x

    @staticmethod
    def _to_logits(out, kind):
        out = ops.cast(out, "float32")
        if kind == "probabilities":
            return ops.log(ops.maximum(out, 1e-30))
        return out

    def call(self, inputs, training=False):
        """The student's output (its logits or probabilities, as its head gives them)."""
        return self.student(self._images(inputs), training=training)

    def forward(self, images, training=False):
        """Student and teacher logits and the aligned stage features of both."""
        with _Taps(self._taps.student) as st:
            s_out = self.student(images, training=training)
        with _Taps(self._taps.teacher) as tt:
            t_out = self.teacher(images, training=False)
        s_feats, t_feats = [], []
        for (si, ti), aligner, layout in zip(self.stage_pairs, self.aligners, self._t_layouts):
            s_feats.append(aligner(st.outputs[self._taps.student[si][0]]))
            t_feats.append(ops.stop_gradient(_canonical(tt.outputs[self._taps.teacher[ti][0]], layout)))
        return {
            "logits": self._to_logits(s_out, self.student_outputs),
            "teacher_logits": ops.stop_gradient(self._to_logits(t_out, self.teacher_outputs)),
            "student_features": s_feats,
            "teacher_features": t_feats,
        }

    def compute_terms(self, x, y, sample_weight=None, training=False, state=None):
        out = self.forward(self._images(x), training=training)
        terms = distillation_loss(
            out["logits"], out["teacher_logits"], y, out["student_features"], out["teacher_features"],
            stage_weights=self.stage_weights() if self.stage_pairs else None,
            temperature=self.temperature, ce_weight=self.ce_weight, feature_loss=self.feature_loss,
            scale_by_t2=self.scale_by_t2,
        )
        if self.student.losses:
            terms["loss"] = terms["loss"] + ops.sum(ops.stack([ops.cast(l, "float32") for l in self.student.losses]))
        terms["y_pred"] = out["logits"]
        return terms

    def predict_step(self, data):
        x, _, _ = unpack(data)
        return self(x, training=False)

    # -- export ---------------------------------------------------------------------------
    def branch_encoders(self):
        """``{"student": backbone}`` (the student's backbone, or the student itself)."""
        return {"student": find_backbone(self.student) or self.student}

    def evaluation_model(self):
        """The student: the product of distillation, evaluated and exported as a classifier."""
        return self.student

    def _spec(self, role):
        spec = self._stage_specs[role]
        return spec if spec is None or isinstance(spec, str) else [str(n) for n in spec]

    def get_config(self):
        cfg = super().get_config()
        cfg.update(
            **self.serialize_nested(teacher=self.teacher, student=self.student),
            student_stages=self._spec("student"), teacher_stages=self._spec("teacher"),
            stage_pairs=[list(p) for p in self.stage_pairs], stage_alphas=list(self.stage_alphas),
            learnable_alphas=self.learnable_alphas,
            alpha_bounds=None if self.alpha_bounds is None else list(self.alpha_bounds),
            temperature=self.temperature, ce_weight=self.ce_weight, feature_loss=self.feature_loss,
            scale_by_t2=self.scale_by_t2, schedule=self.schedule, stage_interval=self.stage_interval,
            project=self.project, teacher_outputs=self.teacher_outputs, student_outputs=self.student_outputs,
            image_shape=list(self.image_shape),
        )
        return cfg

METHODS.register("distill", Distiller)
