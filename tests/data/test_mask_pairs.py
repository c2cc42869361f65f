"""Paired image / nuclear-type mask data (More From Less §2.1 "Tissue-Nuclei Distillation", Table 2):
MaskPairSource, the tf.data pipeline, the mask view kinds, config keys and per-branch evaluation."""

from __future__ import annotations

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401  (sets the Keras backend)
from histokd.config import config_from_dict, load_config
from histokd.data import build_source, make_dataset
from histokd.data import views as V
from histokd.data.datasets import apply_stain, branch_input, branch_input_kinds
from histokd.data.pipeline import resize_tf
from histokd.data.sources import CombinedSource, MaskPairSource, source_from_path
from histokd.errors import BadImageError, ConfigError, DataError

TISSUES = ("ADI", "LYM", "TUM")  # ADI tiles hold no nucleus: nucleus label "Background"
PER_CLASS = 6
TILE = 40


def _tiles(root, tissues=TISSUES, per_class=PER_CLASS):
    from histokd.nuclei.synthetic import synthetic_he_tile

    for k, c in enumerate(tissues):
        for i in range(per_class):
            img = (synthetic_he_tile(10 * k + i, size=TILE, n_nuclei=2 + k)[0] if k
                   else np.full((TILE, TILE, 3), 240, np.uint8))
            p = root / c / f"{c}{i}.png" if c else root / f"{k}_{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """`histokd masks --method classical` output: 18 tiles of 3 tissues in 4 shards."""
    from histokd.nuclei.masks import build_mask_dataset

    root = tmp_path_factory.mktemp("pairs")
    build_mask_dataset(_tiles(root / "tiles"), root / "masks", method="classical", shard_size=5, progress=False)
    return root / "masks"


@pytest.fixture(scope="module")
def originals(pairs):
    """path → (image, mask, tissue_label, nucleus label) straight from the shards."""
    from histokd.nuclei.masks import mask_dataset

    return {ex["path"].numpy().decode(): (ex["image"].numpy(), ex["mask"].numpy(), int(ex["tissue_label"]),
                                          int(ex["label"])) for ex in mask_dataset(pairs)}


def _split_paths(src):
    return {s: [r.path for r in src.records(s)] for s in ("train", "val", "test")}


# --------------------------------------------------------------------------- source
def test_source_splits_and_labels_for_both_tasks(pairs, originals):
    tissue = MaskPairSource(pairs, "tissue", val_fraction=0.2, test_fraction=0.2, seed=3)
    nuclei = MaskPairSource(pairs, "nucleus_type", val_fraction=0.2, test_fraction=0.2, seed=3)
    assert tissue.class_names == list(TISSUES) and tissue.num_classes == 3
    assert nuclei.class_names == ["Background", "Unknown"]
    sp = _split_paths(tissue)
    every = [p for s in sp.values() for p in s]
    assert sorted(every) == sorted(originals) and len(set(every)) == len(every)  # disjoint, complete
    assert [len(sp[s]) for s in ("train", "val", "test")] == [12, 3, 3]
    # stratified per tissue, and the same tiles per split for both tasks (no transfer leakage)
    assert tissue.class_counts("train") == [4, 4, 4]
    assert tissue.class_counts("val") == tissue.class_counts("test") == [1, 1, 1]
    assert _split_paths(nuclei) == sp
    assert _split_paths(MaskPairSource(pairs, "tissue", val_fraction=0.2, test_fraction=0.2, seed=3)) == sp
    assert _split_paths(MaskPairSource(pairs, "tissue", val_fraction=0.2, test_fraction=0.2, seed=4)) != sp
    for s in ("train", "test"):
        want_t = [originals[p][2] for p in sp[s]]
        want_n = [originals[p][3] for p in sp[s]]
        assert tissue.labels(s).tolist() == want_t and nuclei.labels(s).tolist() == want_n
        assert tissue.field_labels("nucleus_type", s).tolist() == want_n
        assert nuclei.field_labels("tissue", s).tolist() == want_t
    # the paper's rule: 'Background' only for tiles without nuclei (here: the ADI tiles)
    for p in originals:
        assert (originals[p][3] == 0) == p.startswith("ADI/")
    assert "mask_pairs" in repr(tissue.describe())
    # auto-detection and build_source
    assert isinstance(source_from_path(pairs), MaskPairSource)
    src = build_source({"source": "mask_pairs", "path": str(pairs), "label": "nucleus_type", "seed": 3,
                        "val_fraction": 0.2, "test_fraction": 0.2})
    assert isinstance(src, MaskPairSource) and _split_paths(src) == sp


def test_source_errors(pairs, tmp_path):
    from histokd.nuclei.masks import build_mask_dataset

    with pytest.raises(DataError, match="does not exist"):
        MaskPairSource(tmp_path / "missing")
    with pytest.raises(DataError, match="not a mask dataset"):
        MaskPairSource(tmp_path)
    (tmp_path / "empty").mkdir()
    shutil.copy(pairs / "dataset.json", tmp_path / "empty")
    with pytest.raises(DataError, match="no committed shards"):
        MaskPairSource(tmp_path / "empty")
    with pytest.raises(ConfigError, match="data.label"):
        MaskPairSource(pairs, label="cells")
    # images that were not in tissue folders: nucleus labels only
    loose = build_mask_dataset(_tiles(tmp_path / "loose", tissues=("", "x"), per_class=2), tmp_path / "lm",
                               method="classical", progress=False)
    assert loose["written"] == 4  # 2 tiles in the "x" folder, 2 loose in the root
    with pytest.raises(DataError, match="data.label=nucleus_type"):
        MaskPairSource(tmp_path / "lm", "tissue")
    loose_src = MaskPairSource(tmp_path / "lm", "nucleus_type", val_fraction=0.0, test_fraction=0.0)
    assert loose_src.num_examples("train") == 4
    # a `histokd data prepare` folder is not a mask dataset
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "dataset.json").write_text(json.dumps({"class_names": ["a"]}))
    (tmp_path / "prep" / "masks-00000.tfrecord").write_bytes(b"")
    with pytest.raises(DataError, match="type_names"):
        MaskPairSource(tmp_path / "prep")
    # an external test set must be a mask dataset too
    with pytest.raises(DataError, match="test_path"):
        build_source({"source": "mask_pairs", "path": str(pairs), "test_path": str(tmp_path / "loose")})


def test_config_keys_and_validation(pairs):
    base = {"data": {"source": "mask_pairs", "path": str(pairs)}, "views": {"kind": "mask", "downsample": None}}
    cfg = config_from_dict(base)
    assert (cfg.data.label, cfg.data.input) == ("tissue", "image")
    assert branch_input_kinds(cfg) == {"a": "mask", "b": "full"}
    sym = config_from_dict({"data": {"source": "mask_pairs", "path": str(pairs), "input": "mask",
                                     "label": "nucleus_type"},
                            "views": {"kind": "mask_symmetric", "downsample": None}})
    assert branch_input_kinds(sym) == {"a": "mask", "b": "mask"}
    sup = config_from_dict({"data": {"source": "mask_pairs", "path": str(pairs), "input": "mask"},
                            "views": {"kind": "identity", "downsample": None}, "model": {"method": "supervised"}})
    assert branch_input_kinds(sup) == {"image": "mask"}
    sup_img = config_from_dict({"data": {"source": "mask_pairs", "path": str(pairs)},
                                "views": {"kind": "identity", "downsample": None},
                                "model": {"method": "supervised"}})
    assert branch_input_kinds(sup_img) == {"image": "full"}
    bad = [
        ({"views": {"kind": "mask", "downsample": None}}, "data.source=mask_pairs"),
        ({"data": {"source": "mask_pairs", "path": "x"}, "views": {"kind": "mask_symmetric"}}, "downsample=null"),
        ({"data": {"label": "nucleus_type"}}, "data.label=nucleus_type"),
        ({"data": {"input": "mask"}}, "data.input=mask"),
        ({"data": {"source": "mask_pairs", "path": "x", "input": "mask"},
          "views": {"kind": "mask", "downsample": None}}, "reads H&E images"),
        ({"data": {"source": "mask_pairs", "path": "x", "input": "mask", "stain": {"method": "macenko"}},
          "views": {"kind": "mask_symmetric", "downsample": None}}, "stain"),
        ({"data": {"source": "mask_pairs", "path": "x", "label": "cells"}}, "data.label"),
    ]
    for d, match in bad:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(d)


# --------------------------------------------------------------------------- pipeline
def test_batches_structure_and_exact_masks(pairs, originals):
    src = MaskPairSource(pairs, "tissue", val_fraction=0.2, test_fraction=0.2)
    x, y = next(iter(make_dataset(src, "train", 32, 4, training=True, seed=1)))
    assert set(x) == {"image", "mask"} and y.dtype == tf.int32 and y.shape == (4,)
    for k in ("image", "mask"):
        assert x[k].dtype == tf.uint8 and x[k].shape == (4, 32, 32, 3)
    assert make_dataset(src, "train", 32, 4, training=True).element_spec[0]["mask"].shape.as_list() == [4, 32, 32, 3]
    # evaluation order = record order; images bilinear, masks nearest (type ids exact)
    paths = [r.path for r in src.records("test")]
    for size in (TILE, 32):
        xs, ys = zip(*[(xb, yb.numpy()) for xb, yb in make_dataset(src, "test", size, 3, training=False)])
        images = np.concatenate([b["image"].numpy() for b in xs])
        masks = np.concatenate([b["mask"].numpy() for b in xs])
        assert np.concatenate(ys).tolist() == src.labels("test").tolist()
        for i, p in enumerate(paths):
            img, msk = originals[p][:2]
            want_img = resize_tf(tf.constant(img), size).numpy()
            want_msk = tf.image.resize(msk, (size, size), method="nearest").numpy()
            np.testing.assert_array_equal(images[i], want_img)
            np.testing.assert_array_equal(masks[i], want_msk)
            assert set(np.unique(masks[i])) <= {0, 1}
        if size == TILE:  # lossless at the stored size
            np.testing.assert_array_equal(images[0], originals[paths[0]][0])
    # masks only: no image decoded, same masks
    only = MaskPairSource(pairs, "nucleus_type", input="mask", val_fraction=0.2, test_fraction=0.2)
    xb, yb = next(iter(make_dataset(only, "test", 32, 4, training=False)))
    assert set(xb) == {"mask"} and yb.numpy().tolist() == only.labels("test")[:4].tolist()
    np.testing.assert_array_equal(xb["mask"].numpy(), masks[:4])
    # cached + shuffled training: every training example once per epoch
    ds = make_dataset(src, "train", 32, 2, training=True, cache=True, drop_remainder=False)
    seen = np.concatenate([yb.numpy() for _, yb in ds])
    assert sorted(seen.tolist()) == sorted(src.labels("train").tolist())


def test_external_test_set_and_bad_shards(pairs, tmp_path):
    combo = build_source({"source": "mask_pairs", "path": str(pairs), "test_path": str(pairs),
                          "label": "nucleus_type", "val_fraction": 0.0})
    assert isinstance(combo, CombinedSource) and combo.num_examples("test") == len(TISSUES) * PER_CLASS
    ys = np.concatenate([yb.numpy() for _, yb in make_dataset(combo, "test", 32, 8, training=False)])
    assert ys.tolist() == combo.labels("test").tolist()
    # a truncated shard: an error naming it, or skipped and listed
    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    shard = sorted(bad.glob("masks-*.tfrecord"))[1]
    shard.write_bytes(shard.read_bytes()[:-40])
    src = MaskPairSource(bad, "tissue", val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(BadImageError, match="masks-00001"):
        make_dataset(src, "train", 32, 4, training=False)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = make_dataset(src, "train", 32, 4, training=False, on_bad_image="skip")
    assert len(src.skipped) == 1 and "truncated" in src.skipped[0]["error"]
    assert sum(int(yb.shape[0]) for _, yb in ds) == len(TISSUES) * PER_CLASS - 1
    # a shard that does not hold what its CSV lists
    rows = list(csv.reader(open(bad / "masks-00000.csv")))
    rows[1], rows[2] = rows[2], rows[1]
    with open(bad / "masks-00000.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match="was edited"):
        make_dataset(MaskPairSource(bad, "tissue", val_fraction=0.0, test_fraction=0.0), "train", 32, 4, training=False)


def test_stain_normalisation_never_touches_masks(pairs):
    from histokd.data.datasets import eval_dataset

    cfg = load_config("default", [f"data.path={pairs}", "data.source=mask_pairs", "views.kind=mask",
                                  "views.downsample=null", "data.image_size=32", "data.test_fraction=0.2"])
    src = build_source(cfg.data)
    invert = lambda im: 255 - im  # noqa: E731 - a stand-in stain normaliser that changes every pixel
    raw = next(iter(eval_dataset(cfg, src, "test")))[0]
    out = next(iter(eval_dataset(cfg, src, "test", stain=invert)))[0]
    np.testing.assert_array_equal(out["mask"].numpy(), raw["mask"].numpy())
    np.testing.assert_array_equal(out["image"].numpy(), 255 - raw["image"].numpy())
    assert apply_stain(invert, {"image": tf.zeros([1, 2, 2, 3], tf.uint8), "mask": tf.ones([1, 2, 2, 3], tf.uint8)}
                       )["mask"].numpy().max() == 1


# --------------------------------------------------------------------------- views
def test_mask_view_kinds():
    B, S = 4, 32
    rng = np.random.default_rng(0)
    mask = tf.constant(np.repeat(rng.integers(0, 6, (B, S, S, 1)), 3, -1).astype(np.uint8))
    image = tf.constant(rng.integers(0, 256, (B, S, S, 3)).astype(np.uint8))

    def only_ids(v):
        return set(np.round(np.unique(v.numpy()) * 255).astype(int).tolist()) <= set(range(6))

    sym = V.make_view_maker("mask_symmetric", S, seed=0)
    for inputs in ({"mask": mask, "image": image}, {"mask": mask}, (mask, image), mask):
        v = sym(inputs, seed=[3, 4])
        assert set(v) == {"view_a", "view_b"} and only_ids(v["view_a"]) and only_ids(v["view_b"])
        assert not np.array_equal(v["view_a"].numpy(), v["view_b"].numpy())  # independent draws
    plain = V.make_view_maker("mask_symmetric", S, augment=False)({"mask": mask})
    np.testing.assert_allclose(plain["view_a"].numpy() * 255, mask.numpy(), atol=1e-4)
    with pytest.raises(ConfigError, match="downsample"):
        V.make_view_maker("mask_symmetric", S, downsample=7)
    # asymmetric image <-> mask: a from the mask, b from the image
    v = V.make_view_maker("mask", S, seed=0)({"mask": mask, "image": image}, seed=[1, 2])
    assert only_ids(v["view_a"]) and not only_ids(v["view_b"])
    # identity: a pair dict gives the image, a mask-only dict the mask (geometric augmentation only)
    ident = V.make_view_maker("identity", S, seed=0)
    assert not only_ids(ident({"mask": mask, "image": image}, seed=[1, 2])["image"])
    assert only_ids(ident({"mask": mask}, seed=[1, 2])["image"])
    np.testing.assert_allclose(V.make_view_maker("eval", S)({"mask": mask})["image"].numpy() * 255,
                               mask.numpy(), atol=1e-4)
    a = V.make_view_maker("asymmetric", S, downsample=8, seed=0)({"mask": mask, "image": image}, seed=[1, 2])
    b = V.make_view_maker("asymmetric", S, downsample=8, seed=0)(image, seed=[1, 2])
    np.testing.assert_allclose(a["view_a"].numpy(), b["view_a"].numpy(), atol=1e-6)
    with pytest.raises(DataError, match="data.input=image"):
        V.make_view_maker("symmetric", S, downsample=8)({"mask": mask})
    # dataset mapping with labels, and the on-device layer
    ds = tf.data.Dataset.from_tensor_slices(({"mask": mask}, tf.range(B))).batch(2)
    views, labels = next(iter(sym.map(ds)))
    assert set(views) == {"view_a", "view_b"} and labels.shape == (2,)
    layer = V.ViewMakerLayer("mask_symmetric", S, seed=0)
    out = layer({"mask": mask}, training=True)
    assert only_ids(out["view_a"]) and out["view_b"].shape == (B, S, S, 3)
    assert "mask_symmetric" in V.KINDS


def test_branch_input():
    x = {"image": tf.zeros([1, 2, 2, 3]), "mask": tf.ones([1, 2, 2, 3])}
    assert float(branch_input(x, "mask").numpy().max()) == 1.0
    assert float(branch_input(x, "full").numpy().max()) == 0.0
    assert float(branch_input(x, "downsampled").numpy().max()) == 0.0
    assert branch_input(x["image"], "mask") is x["image"]
    with pytest.raises(DataError, match="data.input=image"):
        branch_input({"mask": x["mask"]}, "full")


# --------------------------------------------------------------------------- evaluation
def _spy_features(monkeypatch):
    """Record the first batch each extract_features call feeds its encoder."""
    from histokd.tasks import classification as runner

    fed, real = {}, runner.extract_features

    def spy(enc, ds, pre=None, progress=True, desc=""):
        fed[desc] = next(iter(ds))[0].numpy()
        return real(enc, ds, pre, progress, desc=desc)

    monkeypatch.setattr(runner, "extract_features", spy)
    return fed


TINY = ["data.source=mask_pairs", "data.image_size=32", "data.val_fraction=0.0", "data.test_fraction=0.25",
        "views.downsample=null", "model.backbone=resnet18", "model.backbone_kwargs={width: 0.125, small_input: true}",
        "model.expander_dims=[16,16]", "train.epochs=1", "train.batch_size=4", "train.verbose=0",
        "eval.probe_epochs=2", "eval.embedding_plot=false"]


@pytest.mark.slow
def test_train_run_evaluates_each_branch_on_its_input(pairs, tmp_path, monkeypatch):
    """histokd.train.run on image<->mask pairs: a probes masks, b probes images (< 60 s)."""
    from histokd import train as T
    from histokd.data.datasets import eval_dataset

    fed = _spy_features(monkeypatch)
    cfg = load_config("default", TINY + [f"data.path={pairs}", "views.kind=mask", "name=pairs",
                                         f"output_dir={tmp_path}"])
    metrics = T.run(cfg, progress=False)
    assert set(metrics["evaluation"]) == {"a (mask)", "b (full)"}
    for per in metrics["evaluation"].values():
        assert 0.0 <= per["1.0"]["accuracy"] <= 1.0
    first = next(iter(eval_dataset(cfg, build_source(cfg.data), "test")))[0]
    np.testing.assert_array_equal(fed["a (mask) test"], first["mask"].numpy())
    np.testing.assert_array_equal(fed["b (full) test"], first["image"].numpy())
    assert (tmp_path / "pairs" / "metrics.json").exists()


def test_evaluate_symmetric_and_supervised_mask_runs(pairs, tmp_path, monkeypatch):
    """mask<->mask: both encoders probe masks; supervised on masks: its head reads masks."""
    import keras

    from histokd import train as T
    from histokd.tasks.classification import evaluate_classification as evaluate_run

    fed = _spy_features(monkeypatch)
    keras.utils.set_random_seed(0)
    for extra, want in (
        (["views.kind=mask_symmetric", "data.input=mask", "model.shared=true"], {"a (mask)", "b (mask)"}),
        (["views.kind=identity", "data.input=mask", "model.method=supervised"], {"image (mask)"}),
        (["views.kind=identity", "model.method=supervised"], {"image (full)"}),
    ):
        fed.clear()
        cfg = load_config("default", TINY + [f"data.path={pairs}", "data.label=nucleus_type"] + extra)
        src = build_source(cfg.data)
        model = T.build_method(cfg, src.num_classes)
        out = evaluate_run(cfg, model, src, tmp_path, progress=False)
        assert set(out["evaluation"]) == want and set(out["_heads"]) == {w.split()[0] for w in want}
        masks_only = np.concatenate([x["mask"].numpy() for x, _ in make_dataset(src, "test", 32, 64, False)])
        for desc, batch in fed.items():
            if "(mask)" in desc and desc.endswith("test"):
                np.testing.assert_array_equal(batch, masks_only[:len(batch)])
                assert batch.max() <= 1
            if "(full)" in desc:
                assert batch.max() > 1  # H&E pixels, not type ids
