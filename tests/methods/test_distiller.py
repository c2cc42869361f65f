"""Distiller: teacher untouched, KD loss = hand computation, stage alignment, learnable α, progressive schedule."""

import math

import numpy as np
import pytest
import keras
import tensorflow as tf

import histokd  # noqa: F401
from histokd.backbones.base import Backbone
from histokd.errors import ConfigError
from histokd.methods.distiller import Distiller, StageAligner
from histokd.methods.supervised import Supervised
from histokd.registry import METHODS
from harness import assert_config_roundtrip, assert_saved_model_roundtrip

SIZE = 16
CLASSES = 3


def cnn_classifier(widths, name, softmax=False, strides=(1, 2, 2)):
    """Functional classifier whose conv layers s1, s2, s3 are the stages."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    for i, (w, s) in enumerate(zip(widths, strides)):
        x = keras.layers.Conv2D(w, 3, strides=s, padding="same", activation="relu", name=f"s{i + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(CLASSES, activation="softmax" if softmax else None, name="logits")(x)
    return keras.Model(inp, x, name=name)


def backbone(widths, name, strides=(1, 2, 2)):
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    for i, (w, s) in enumerate(zip(widths, strides)):
        x = keras.layers.Conv2D(w, 3, strides=s, padding="same", activation="relu", name=f"stage{i + 1}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return Backbone(inp, x, stage_names=[f"stage{i + 1}" for i in range(len(widths))], name=name)


def data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, SIZE, SIZE, 3), dtype="float32"), rng.integers(0, CLASSES, n)


STAGES = ["s1", "s2", "s3"]


def make(**kw):
    t = cnn_classifier((8, 16, 32), "teacher")
    s = cnn_classifier((4, 8, 8), "student", strides=(1, 1, 2))
    kw.setdefault("student_stages", STAGES)
    kw.setdefault("teacher_stages", STAGES)
    return Distiller(t, s, **kw)


def test_teacher_frozen_and_unchanged_after_fit():
    d = make()
    assert not {id(v) for v in d.trainable_variables} & {id(v) for v in d.teacher.weights}
    before = [w.copy() for w in d.teacher.get_weights()]
    s_before = [w.copy() for w in d.student.get_weights()]
    d.compile(optimizer=keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    x, y = data()
    h = d.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert {"loss", "kd", "ce", "feature", "accuracy"} <= set(h.history)
    assert np.all(np.isfinite(h.history["loss"]))
    for a, b in zip(before, d.teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert all(not np.array_equal(a, b) for a, b in zip(s_before, d.student.get_weights()))


def test_loss_equals_hand_computation():
    d = make(stage_alphas=[0.2, 0.15, 0.1], temperature=2.0, ce_weight=0.7, feature_loss="cosine")
    for model, scale in ((d.teacher, 30.0), (d.student, 10.0)):  # spread the logits: a KL well above rounding
        head = model.get_layer("logits")
        head.kernel.assign(head.kernel * scale)
    x, y = data(4)
    out = d.forward(x)
    terms = d.compute_terms(x, y, training=False)
    zs, zt = out["logits"].numpy(), out["teacher_logits"].numpy()
    np.testing.assert_allclose(zs, d.student(x).numpy(), rtol=1e-6)
    np.testing.assert_allclose(zt, d.teacher(x).numpy(), rtol=1e-6)
    # KD by hand, written per sample and class
    kd = 0.0
    for b in range(4):
        pt = np.exp(zt[b] / 2) / np.exp(zt[b] / 2).sum()
        ps = np.exp(zs[b] / 2) / np.exp(zs[b] / 2).sum()
        kd += sum(pt[j] * math.log(pt[j] / ps[j]) for j in range(CLASSES))
    kd = 4.0 * kd / 4  # τ² · batch mean
    ce = -np.mean([zs[b, y[b]] - math.log(np.exp(zs[b]).sum()) for b in range(4)])
    feat = 0.0
    for a, fs, ft in zip([0.2, 0.15, 0.1], out["student_features"], out["teacher_features"]):
        fs, ft = fs.numpy(), ft.numpy()
        norms = np.maximum(np.linalg.norm(fs, axis=-1), 1e-12) * np.maximum(np.linalg.norm(ft, axis=-1), 1e-12)
        cos = np.sum(fs * ft, -1) / norms  # an all-zero (dead ReLU) vector has cosine 0
        feat += a * np.mean(1 - cos)
    assert kd > 1e-2
    assert float(terms["kd"]) == pytest.approx(kd, rel=1e-5)
    assert float(terms["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["feature"]) == pytest.approx(feat, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(kd + 0.7 * ce + feat, rel=1e-5)


def test_softmax_heads_give_the_same_loss_as_logit_heads():
    t = cnn_classifier((8, 16, 32), "teacher")
    s = cnn_classifier((4, 8, 8), "student")
    t_soft = cnn_classifier((8, 16, 32), "teacher_soft", softmax=True)
    s_soft = cnn_classifier((4, 8, 8), "student_soft", softmax=True)
    t_soft.set_weights(t.get_weights())
    s_soft.set_weights(s.get_weights())
    a = Distiller(t, s, student_stages=STAGES, teacher_stages=STAGES)
    b = Distiller(t_soft, s_soft, student_stages=STAGES, teacher_stages=STAGES)
    assert (a.teacher_outputs, a.student_outputs) == ("logits", "logits")
    assert (b.teacher_outputs, b.student_outputs) == ("probabilities", "probabilities")
    for pa, pb in zip(a.aligners, b.aligners):
        pb.set_weights(pa.get_weights())
    x, y = data(4)
    ta = a.compute_terms(x, y, training=False)
    tb = b.compute_terms(x, y, training=False)
    for k in ("kd", "ce", "feature", "loss"):
        assert float(ta[k]) == pytest.approx(float(tb[k]), rel=1e-4, abs=1e-6)


def test_every_trainable_weight_gets_a_gradient():
    d = make(learnable_alphas=True, project="always")
    x, y = data(4)
    with tf.GradientTape() as tape:
        loss = d.compute_terms(x, y, training=True)["loss"]
    grads = tape.gradient(loss, d.trainable_variables)
    bad = [v.path for v, g in zip(d.trainable_variables, grads) if g is None or not np.any(g.numpy())]
    assert not bad
    n_student = len(d.student.trainable_variables)
    assert len(d.trainable_variables) == n_student + 2 * 3 + 1  # + 3 projections (kernel, bias) + α logits


def test_mismatched_stages_get_projections():
    # student stages: 16x16x4, 16x16x8, 8x8x8 ; teacher: 16x16x8, 8x8x16, 4x4x32
    d = make()
    kinds = [(a.needs_projection, a.pool) for a in d.aligners]
    assert kinds[0] == (True, None)
    assert kinds[1] == (True, ("avg", (2, 2)))
    assert kinds[2] == (True, ("avg", (2, 2)))
    x, _ = data(2)
    out = d.forward(x)
    for fs, ft in zip(out["student_features"], out["teacher_features"]):
        assert fs.shape == ft.shape
    same = Distiller(cnn_classifier((4, 8, 8), "t2"), cnn_classifier((4, 8, 8), "s2"),
                     student_stages=STAGES, teacher_stages=STAGES)
    assert not any(a.needs_projection for a in same.aligners) and not same.aligners[0].weights


def test_stage_aligner_layouts():
    a = StageAligner((6, 6, 4), (4, 4, 10))  # not an integer factor → bilinear resize
    assert a.pool == ("resize", (4, 4))
    a.build()
    assert a(np.ones((2, 6, 6, 4), "float32")).shape == (2, 4, 4, 10)
    tokens = StageAligner((17, 8), (2, 2, 12))  # ViT tokens: class token + 4x4 grid → pooled to 2x2
    tokens.build()
    x = np.random.default_rng(0).random((2, 17, 8)).astype("float32")
    y = tokens(x)
    assert y.shape == (2, 2, 2, 12)
    grid = x[:, 1:].reshape(2, 4, 4, 8)
    pooled = grid.reshape(2, 2, 2, 2, 2, 8).mean(axis=(2, 4))
    k, bias = tokens.proj.get_weights()
    np.testing.assert_allclose(y, pooled @ k + bias, rtol=1e-5, atol=1e-6)
    vec = StageAligner((4, 4, 8), (16,))
    vec.build()
    assert vec(np.ones((2, 4, 4, 8), "float32")).shape == (2, 16)
    assert_config_roundtrip(a)
    with pytest.raises(ConfigError, match="no spatial layout"):
        StageAligner((8,), (4, 4, 8))
    with pytest.raises(ConfigError, match="same length"):
        StageAligner((10, 8), (12, 8))


def test_clear_errors():
    with pytest.raises(ConfigError, match="stage_pairs"):
        make(student_stages=["s1", "s2"])
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        make(student_stages=["s1", "s2", "nope"])
    with pytest.raises(ConfigError, match="stage_alphas"):
        make(stage_alphas=[0.2, 0.1])
    with pytest.raises(ConfigError, match="stage_interval"):
        make(schedule="progressive")
    with pytest.raises(ConfigError, match="stage_names"):
        Distiller(cnn_classifier((8, 16, 32), "t"), cnn_classifier((4, 8, 8), "s"))  # "auto", no backbone
    with pytest.raises(ConfigError, match="classes"):
        inp = keras.Input((SIZE, SIZE, 3))
        five = keras.Model(inp, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(inp)))
        Distiller(cnn_classifier((8, 16, 32), "t"), five, student_stages=None, teacher_stages=None)
    t = cnn_classifier((8, 16, 32), "t")
    with pytest.raises(ConfigError, match="same model"):
        Distiller(t, t)
    # explicit pairs make a different number of stages work
    d = make(student_stages=["s2", "s3"], stage_pairs=[(0, 1), (1, 2)], stage_alphas=[0.15, 0.1])
    assert d.stage_pairs == [(0, 1), (1, 2)]
    # logit-only distillation
    d = make(student_stages=None, teacher_stages=None)
    x, y = data(4)
    terms = d.compute_terms(x, y, training=False)
    assert float(terms["feature"]) == 0.0


def test_learnable_alphas_stay_in_range():
    d = make(learnable_alphas=True, alpha_bounds=(0.05, 0.4))
    np.testing.assert_allclose(d.alphas().numpy(), [0.2, 0.15, 0.1], rtol=1e-5)  # paper's defaults
    d.compile(optimizer=keras.optimizers.Adam(0.5))  # large steps on θ
    x, y = data(8)
    d.fit(x, y, batch_size=8, epochs=6, verbose=0)
    a = d.alphas().numpy()
    assert np.all(np.isfinite(a)) and np.all(a >= 0.05) and np.all(a <= 0.4)
    assert not np.allclose(a, [0.2, 0.15, 0.1])  # they were trained
    d.alpha_logits.assign([-1e4, 0.0, 1e4])  # whatever θ becomes, α stays in range
    np.testing.assert_allclose(d.alphas().numpy(), [0.05, 0.225, 0.4], rtol=1e-6)
    with pytest.raises(ConfigError, match="inside"):
        make(learnable_alphas=True, alpha_bounds=(0.15, 0.3))


def test_progressive_schedule_deep_to_shallow():
    d = make(schedule="progressive", stage_interval=2)
    masks = [d.stage_mask(k).numpy().tolist() for k in range(7)]
    assert masks[0] == masks[1] == [0, 0, 1]
    assert masks[2] == masks[3] == [0, 1, 1]
    assert masks[4] == masks[6] == [1, 1, 1]
    np.testing.assert_allclose(d.stage_weights(2).numpy(), [0.0, 0.15, 0.1], rtol=1e-6)
    # in training the mask follows optimizer.iterations: at step 0 only the deepest stage counts
    d.compile(optimizer=keras.optimizers.SGD(0.0))
    x, y = data(4)
    terms = d.compute_terms(x, y, training=False)
    stage = terms["stage_losses"].numpy()
    assert float(terms["feature"]) == pytest.approx(0.1 * stage[2], rel=1e-5)


def test_auto_stages_from_backbones_and_student_export(tmp_path):
    teacher = Supervised(backbone((8, 16, 32), "tb"), CLASSES)
    student = Supervised(backbone((4, 8, 8), "sb"), CLASSES)
    x, y = data(8)
    teacher(x), student(x)
    d = Distiller(teacher, student, temperature=4.0)
    assert d.student_stages == ["stage1", "stage2", "stage3"]
    assert d.student_outputs == "probabilities"  # Supervised's LinearHead ends in a softmax
    assert d.branch_encoders()["student"] is student.encoder
    d.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    h = d.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(h.history["loss"][0])
    np.testing.assert_allclose(d.predict(x, verbose=0), student.predict(x, verbose=0), rtol=1e-6)
    assert_saved_model_roundtrip(d.student, x, tmp_path)
    assert METHODS.get("distill") is Distiller
    # the method's config rebuilds an equivalent distiller
    clone = Distiller.from_config(d.get_config())
    assert clone.stage_pairs == d.stage_pairs and clone.student_outputs == "probabilities"


from histokd.runtime import mirrored_strategy as fresh_mirrored  # noqa: E402


def bn_classifier(widths, name, strides):
    inp = keras.Input((SIZE, SIZE, 3))
    x = inp
    for i, (w, s) in enumerate(zip(widths, strides)):
        x = keras.layers.Conv2D(w, 3, strides=s, padding="same", name=f"s{i + 1}")(x)
        x = keras.layers.BatchNormalization(synchronized=True, name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="logits")(x), name=name)


@pytest.mark.slow
def test_mirrored_equals_one_device():
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < 2:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    x, y = data(8, seed=4)
    ref = Distiller(bn_classifier((8, 16, 32), "t", (1, 2, 2)), bn_classifier((4, 8, 8), "s", (1, 1, 2)),
                    student_stages=STAGES, teacher_stages=STAGES)
    init = {k: [w.get_weights() for w in ws] for k, ws in
            (("t", [ref.teacher]), ("s", [ref.student]), ("a", ref.aligners))}

    def run(strategy):
        with strategy.scope():
            d = Distiller(bn_classifier((8, 16, 32), "t", (1, 2, 2)), bn_classifier((4, 8, 8), "s", (1, 1, 2)),
                          student_stages=STAGES, teacher_stages=STAGES)
            for k, ws in (("t", [d.teacher]), ("s", [d.student]), ("a", d.aligners)):
                for w, v in zip(ws, init[k]):
                    w.set_weights(v)
            d.compile(optimizer=keras.optimizers.SGD(0.1))
        h = d.fit(tf.data.Dataset.from_tensors((x, y)).repeat(2), verbose=0).history
        return h, d.student.get_weights() + [w for a in d.aligners for w in a.get_weights()]

    h1, w1 = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    # sync BN in the student makes replicas switch threads mid-forward: the stage taps must cope
    h2, w2 = run(fresh_mirrored([c.name for c in cpus[:2]]))
    for k in ("loss", "kd", "ce", "feature"):
        assert h1[k][0] == pytest.approx(h2[k][0], rel=1e-5, abs=1e-6), k
    for a, b in zip(w1, w2):
        np.testing.assert_allclose(a, b, atol=1e-5)
