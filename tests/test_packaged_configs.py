"""Every packaged config builds its model and runs 2 training steps on tiny data."""

import cv2
import numpy as np
import pytest
import keras

import histokd  # noqa: F401
from histokd.config import list_configs, load_config
from histokd import train as T


@pytest.fixture(scope="module")
def tiny_mask_pairs(tmp_path_factory):
    """A 3-tissue, 18-tile `histokd masks --method classical` dataset (Table 2 configs read pairs)."""
    from histokd.nuclei.masks import build_mask_dataset
    from histokd.nuclei.synthetic import synthetic_he_tile

    root = tmp_path_factory.mktemp("mask_pairs")
    for c, k in (("ADI", 0), ("LYM", 2), ("TUM", 1)):
        for i in range(6):
            img = (synthetic_he_tile(10 * k + i, size=40, n_nuclei=2 * k)[0] if k
                   else np.full((40, 40, 3), 240, np.uint8))
            path = root / "tiles" / c / f"{c}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    build_mask_dataset(root / "tiles", root / "masks", method="classical", shard_size=8, progress=False)
    return root / "masks"


def _params():
    # Table 2 pairs of configs differ only in the task label: the nucleus-counting twin gets the
    # cheap check below, the tissue one the full two steps (ResNet-50 pairs: > 10 s, so "slow")
    for name in list_configs():
        if "/table2_" in name:
            if not name.endswith("_nuclei"):
                yield pytest.param(name, marks=pytest.mark.slow)
        else:
            yield name


@pytest.mark.slow
def test_table2_nuclei_configs_are_their_tissue_twins_with_nucleus_labels(tiny_mask_pairs):
    names = [n for n in list_configs() if "/table2_" in n]
    assert len(names) == 12
    for name in names:
        if not name.endswith("_nuclei"):
            continue
        nuc, tis = load_config(name), load_config(name.replace("_nuclei", "_tissue"))
        assert (nuc.data.label, tis.data.label) == ("nucleus_type", "tissue")
        a, b = nuc.to_dict(), tis.to_dict()
        for d in (a, b):
            d.pop("name"), d.pop("description"), d["data"].pop("label")
        assert a == b, name
        cfg = load_config(name, [f"data.path={tiny_mask_pairs}", "data.test_path=null", "data.image_size=32",
                                 "data.val_fraction=0.2", "data.test_fraction=0.2", "train.batch_size=4"])
        source = T.build_data(cfg)
        assert source.class_names == ["Background", "Unknown"]  # classical masks: no nuclear types
        ds = T.train_dataset(cfg, source, 4, T.make_views(cfg, training=True), T.stain_fn(cfg))
        x, y = next(iter(ds))
        key = "image" if cfg.model.method == "supervised" else "view_a"
        assert x[key].shape == (4, 32, 32, 3) and set(np.asarray(y)) <= {0, 1}


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A finished-looking 3-class supervised run at 32 px (Swin V2 distillation configs need a teacher)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = load_config("swinv2/finetune_swinv2_base", [
        "data.source=synthetic", "data.path=null", "data.test_path=null", "data.image_size=32",
        "data.synthetic_classes=3", "model.backbone=resnet18", "model.weights=null",
        "model.backbone_kwargs={width: 0.125, small_input: true}", f"output_dir={out}", "name=teacher"])
    run_dir = T.prepare_run_dir(cfg)
    T.build_method(cfg, 3).save_weights(run_dir / "checkpoints" / "last.weights.h5")
    return run_dir


@pytest.mark.parametrize("name", _params())
def test_config_builds_and_trains_two_steps(name, request):
    base = load_config(name)
    size = 72 if base.model.backbone == "xception" else 32
    if base.data.source == "mask_pairs":  # Table 2: tiny image/mask pairs instead of synthetic tiles
        data = [f"data.path={request.getfixturevalue('tiny_mask_pairs')}"]
    else:
        data = ["data.source=synthetic", "data.path=null", "data.synthetic_per_class=8",
                "data.synthetic_classes=3"]
    if base.model.method == "moby":  # small projector/predictor; the queue stays the paper's 4096
        data += ["moby.hidden_dim=32", "moby.out_dim=16"]
    if base.model.method == "distill":
        data += [f"distill.teacher={request.getfixturevalue('tiny_teacher')}"]
    if base.model.weights:  # pre-trained encoders of earlier runs in the pipeline
        data += ["model.weights=null"]
    cfg = load_config(name, data + [
        "data.test_path=null", f"data.image_size={size}", "data.val_fraction=0.2",
        "data.test_fraction=0.2", "train.batch_size=4", "model.expander_dims=[16,16,16]",
    ])
    # the paper-scale choices survive the shrinking
    assert cfg.model.backbone == base.model.backbone and cfg.views == base.views
    assert cfg.model.method == base.model.method and cfg.model.shared == base.model.shared
    assert cfg.data.label == base.data.label and cfg.data.input == base.data.input
    keras.utils.set_random_seed(0)
    source = T.build_data(cfg)
    model = T.build_method(cfg, len(source.class_names), total_steps=2)
    views = T.make_views(cfg, training=True)
    ds = T.train_dataset(cfg, source, cfg.train.batch_size, views, T.stain_fn(cfg))
    if cfg.model.method == "supervised":
        model.compile(optimizer=T.make_optimizer(cfg, 2), loss="sparse_categorical_crossentropy",
                      run_eagerly=True)
    elif cfg.model.method == "distill":
        model.compile(optimizer=T.make_optimizer(cfg, 2), metrics=["accuracy"], run_eagerly=True)
    else:
        model.compile(optimizer=T.make_optimizer(cfg, 2), run_eagerly=True)
    hist = model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert np.isfinite(hist.history["loss"][-1])
