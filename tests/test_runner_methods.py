"""The runner builds MoBY and Distiller runs from configs (Swin V2 paper pipeline) and rejects
the mistakes a user can make wiring them together."""

import json

import numpy as np
import pytest
import keras

import histokd  # noqa: F401
from histokd.config import load_config
from histokd.errors import ConfigError, HistokdError
from histokd import train as T

TINY = ["data.source=synthetic", "data.path=null", "data.test_path=null", "data.image_size=32",
        "data.synthetic_per_class=8", "data.synthetic_classes=3", "train.batch_size=4",
        "model.backbone=resnet18", "model.backbone_kwargs={width: 0.125, small_input: true}",
        "model.weights=null"]


def _teacher_run(tmp_path, method="supervised", classes=3):
    """A finished-looking run directory (config + last weights), without training."""
    over = TINY + [f"output_dir={tmp_path}", "name=teacher", f"data.synthetic_classes={classes}"]
    if method == "supervised":
        cfg = load_config("swinv2/finetune_swinv2_base", over)
    else:
        cfg = load_config("swinv2/moby_swinv2_tiny", over + ["moby.hidden_dim=16", "moby.out_dim=8"])
    run_dir = T.prepare_run_dir(cfg)
    model = T.build_method(cfg, classes)
    model.save_weights(run_dir / "checkpoints" / "last.weights.h5")
    return run_dir, model


def test_config_rejects_incomplete_moby_and_distill_setups():
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config("swinv2/distill_swinv2_base_to_tiny", TINY + ["distill.teacher=null"])
    with pytest.raises(ConfigError, match="queue_size"):
        load_config("swinv2/moby_swinv2_tiny", TINY + ["moby.queue_size=2"])
    with pytest.raises(ConfigError, match="augment_on=device"):
        load_config("swinv2/moby_swinv2_tiny", TINY + ["views.augment_on=device"])
    with pytest.raises(ConfigError, match="views.kind=identity"):
        load_config("swinv2/distill_swinv2_base_to_tiny", TINY + ["views.kind=asymmetric"])


def test_moby_from_config_follows_the_paper_recipe():
    cfg = load_config("swinv2/moby_swinv2_tiny", TINY + ["moby.hidden_dim=16", "moby.out_dim=8"])
    base = load_config("swinv2/moby_swinv2_tiny")
    assert (base.moby.temperature, base.moby.queue_size, base.moby.base_momentum) == (0.2, 4096, 0.99)
    assert base.views.kind == "multiscale" and base.views.magnification == 2.0
    model = T.build_method(cfg, 3, total_steps=10)
    assert model.total_steps == 10 and model.queue_size == 4096
    assert set(T.branch_input_kinds(cfg)) == set(model.branch_encoders()) == {"online"}
    views = T.make_views(cfg)
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    v, y = views(x, np.zeros(4))
    assert set(v) == {"view_a", "view_b"} and tuple(v["view_a"].shape) == (4, 32, 32, 3)
    assert not np.allclose(v["view_a"], v["view_b"])


def test_distiller_from_config_pairs_the_three_deepest_stages(tmp_path):
    teacher_dir, teacher = _teacher_run(tmp_path)
    cfg = load_config("swinv2/distill_swinv2_base_to_tiny", TINY + [f"distill.teacher={teacher_dir}"])
    d = T.build_method(cfg, 3, total_steps=20)
    assert d.stage_alphas == [0.2, 0.15, 0.1] and d.schedule == "progressive"
    n = len(d.student_stages)  # resnet18: stem + four stages
    assert n >= 4 and d.stage_pairs == [(n - 3, n - 3), (n - 2, n - 2), (n - 1, n - 1)]
    # the teacher's weights are the saved ones
    for a, b in zip(d.teacher.weights, teacher.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert not d.teacher.trainable
    assert T.branch_input_kinds(cfg) == {"image": "full"}


def test_distiller_rejects_wrong_teachers(tmp_path):
    moby_dir, _ = _teacher_run(tmp_path / "m", method="moby")
    cfg = load_config("swinv2/distill_swinv2_base_to_tiny", TINY + [f"distill.teacher={moby_dir}"])
    with pytest.raises(ConfigError, match="must be a trained classifier"):
        T.build_method(cfg, 3, total_steps=20)
    four_dir, _ = _teacher_run(tmp_path / "f", classes=4)
    cfg = load_config("swinv2/distill_swinv2_base_to_tiny", TINY + [f"distill.teacher={four_dir}"])
    with pytest.raises(ConfigError, match="predicts 4 classes"):
        T.build_method(cfg, 3, total_steps=20)
    cfg = load_config("swinv2/distill_swinv2_base_to_tiny", TINY + [f"distill.teacher={tmp_path / 'nowhere'}"])
    with pytest.raises(HistokdError, match="not a histokd run directory"):
        T.build_method(cfg, 3, total_steps=20)
    deep = load_config("swinv2/distill_swinv2_base_to_tiny", TINY + [f"distill.teacher={four_dir}",
                                                                     "distill.stages=9"])
    with pytest.raises(ConfigError):
        T.build_method(deep, 4, total_steps=20)


def test_load_trained_model_reads_class_count_from_export_metadata(tmp_path):
    run_dir, model = _teacher_run(tmp_path)
    (run_dir / "export" / "metadata.json").write_text(json.dumps({"class_names": ["a", "b", "c"]}))
    again, cfg = T.load_trained_model(run_dir)
    assert again.num_classes == 3 and cfg.name == "teacher"
    x = np.random.default_rng(1).random((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(again(x), model(x), atol=1e-6)
    (run_dir / "checkpoints" / "last.weights.h5").unlink()
    with pytest.raises(HistokdError, match="has not finished an epoch"):
        T.load_trained_model(run_dir)
