"""Transfer protocol of More From Less Table 2 on synthetic tiles with two label sets."""

import json
import warnings

import numpy as np
import pytest
import keras

import histokd  # noqa: F401
from histokd.backbones import make_backbone
from histokd.data.sources import ArraySource, SyntheticSource
from histokd.errors import ConfigError, DataError
from histokd.evaluation.transfer import (
    TransferEncoder,
    TransferTask,
    load_run_encoders,
    table2,
    train_supervised_encoder,
    transfer_eval,
)

SIZE = 32


def _darkness(x):
    """Mean optical density of each tile: a label a linear probe on colour means can learn."""
    return -np.log((x.astype(np.float64) + 1.0) / 256.0).mean(axis=(1, 2, 3))


@pytest.fixture(scope="module")
def source():
    # 3 tissue classes × 16 tiles, half of them in the test split
    return SyntheticSource(n_per_class=16, image_size=SIZE, seed=0, num_classes=3, val_fraction=0.0,
                           test_fraction=0.5)


@pytest.fixture(scope="module")
def second_labels(source):
    """Task B: the tile's darkness above/below the training median (a stand-in for the
    most-present nucleus type, which needs HoVer-Net)."""
    xtr, _ = source.arrays("train")
    xte, _ = source.arrays("test")
    thr = np.median(_darkness(xtr))
    return {"train": (_darkness(xtr) > thr).astype(np.int64), "test": (_darkness(xte) > thr).astype(np.int64)}


def _colour_mean_encoder(size=SIZE):
    """An encoder whose features are the per-channel means (no weights to learn)."""
    inp = keras.Input((size, size, 3))
    out = keras.layers.GlobalAveragePooling2D()(inp)
    return keras.Model(inp, keras.layers.Dense(3, kernel_initializer="identity", name="proj")(out))


def _cnn():
    """A tiny conv encoder with BatchNorm (cheap to trace; BN statistics must stay frozen too)."""
    inp = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(6, 3, strides=2, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x), name="tiny_cnn")


def test_resnet_backbone_is_a_valid_transfer_encoder(source, second_labels):
    enc = make_backbone("resnet18", SIZE, width=0.25, small_input=True)
    before = _weights(enc)
    xtr, _ = source.arrays("train")
    xte, _ = source.arrays("test")
    m = transfer_eval(enc, (xtr, second_labels["train"]), (xte, second_labels["test"]), 2, epochs=2)
    assert 0.0 <= m["accuracy"] <= 1.0
    for a, b in zip(before, _weights(enc)):
        np.testing.assert_array_equal(a, b)


def _weights(model):
    return [np.array(w) for w in model.get_weights()]


def test_transfer_eval_keeps_encoder_frozen_and_reports_metrics(source, second_labels):
    enc = _cnn()
    before = _weights(enc)
    xtr, _ = source.arrays("train")
    xte, _ = source.arrays("test")
    m, head = transfer_eval(enc, (xtr, second_labels["train"]), (xte, second_labels["test"]), 2,
                            epochs=3, return_head=True, class_names=["light", "dark"])
    after = _weights(enc)
    assert len(before) == len(after)
    for a, b in zip(before, after):  # kernels and BatchNorm moving statistics alike
        np.testing.assert_array_equal(a, b)
    assert 0.0 <= m["accuracy"] <= 1.0 and m["num_examples"] == len(xte)
    assert np.asarray(m["confusion_matrix"]).sum() == len(xte)
    assert m["class_names"] == ["light", "dark"]
    assert head.output_shape[-1] == 2


def test_transfer_eval_learns_a_task_the_features_encode(source, second_labels):
    # the colour-mean features determine task B's labels almost linearly
    enc = _colour_mean_encoder()
    xtr, _ = source.arrays("train")
    xte, _ = source.arrays("test")
    m = transfer_eval(enc, (xtr, second_labels["train"]), (xte, second_labels["test"]), 2,
                      epochs=100, lr=0.1, batch_size=64)
    assert m["accuracy"] >= 0.8
    # the head really learns from the labels it is given: flipped training labels flip it
    m_flip = transfer_eval(enc, (xtr, 1 - second_labels["train"]), (xte, second_labels["test"]), 2,
                           epochs=100, lr=0.1, batch_size=64)
    assert m_flip["accuracy"] <= 0.2


def test_transfer_eval_rejects_bad_labels(source):
    xtr, ytr = source.arrays("train")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        transfer_eval(_colour_mean_encoder(), (xtr, ytr), (xtr, ytr), 2, epochs=1)  # 3 classes in labels
    with pytest.raises(DataError, match="uint8"):
        transfer_eval(_colour_mean_encoder(), (xtr.astype("float32"), ytr), (xtr, ytr), 3, epochs=1)
    with pytest.raises(ConfigError):
        transfer_eval(_colour_mean_encoder(), (xtr, ytr), (xtr, ytr), 1, epochs=1)


def test_task_labels_are_validated(source, second_labels):
    t = TransferTask(source, labels={"train": second_labels["train"][:-1], "test": second_labels["test"]})
    with pytest.raises(DataError, match="task labels"):
        table2({"m": _colour_mean_encoder()}, {"b": t}, epochs=1, progress=False)
    with pytest.raises(ConfigError, match="field_labels"):
        TransferTask(source, labels="most_present_type").split_labels("train")
    with pytest.raises(DataError, match="1-D integer"):
        TransferTask(source, labels={"train": np.zeros(3, float)}).split_labels("train")
    with pytest.raises(ConfigError):
        TransferEncoder(_colour_mean_encoder(), input="downsampled")  # no size
    with pytest.raises(ConfigError):
        TransferEncoder(_colour_mean_encoder(), input="pixels")


@pytest.mark.slow
def test_table2_rows_encoders_columns_tasks_with_supervised_baseline(source, second_labels):
    """Table 2 layout: SSL-like encoders and a supervised encoder trained on task B, all frozen."""
    tasks = {
        "tissue": TransferTask(source),  # the source's own labels
        "darkness": (source, second_labels),  # a (source, labels) pair
    }
    sup_enc = _cnn()
    init = _weights(sup_enc)
    sup = train_supervised_encoder(sup_enc, tasks["darkness"], task_name="darkness", epochs=2, lr=1e-2,
                                   batch_size=8)
    trained = _weights(sup_enc)
    assert any(not np.array_equal(a, b) for a, b in zip(init, trained))  # the baseline did train
    rand = _cnn()
    rand_w = _weights(rand)
    encoders = {
        "random (full)": rand,
        "random (downsampled 8 px)": TransferEncoder(rand, "downsampled", 8),
        "supervised darkness": sup,
    }
    tbl, details = table2(encoders, tasks, epochs=3, progress=False, return_details=True)
    assert list(tbl.index) == list(encoders) and list(tbl.columns) == ["tissue", "darkness"]
    assert np.isfinite(tbl.to_numpy()).all()
    assert ((tbl.to_numpy() >= 0) & (tbl.to_numpy() <= 1)).all()
    # every encoder stayed frozen during the table
    for a, b in zip(rand_w, _weights(rand)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(trained, _weights(sup_enc)):
        np.testing.assert_array_equal(a, b)
    d = details.set_index(["encoder", "task"])
    assert d.loc[("supervised darkness", "darkness"), "transfer"] == False  # noqa: E712 (own task)
    assert d.loc[("supervised darkness", "tissue"), "transfer"] == True  # noqa: E712 (transfer task)
    assert d.loc[("random (full)", "tissue"), "transfer"] is None
    assert d.loc[("random (downsampled 8 px)", "tissue"), "input"] == "downsampled"
    assert (details["num_test"] == source.num_examples("test")).all()
    # downsampling changes what the encoder sees: features (and so usually results) differ
    assert set(details.columns) >= {"accuracy", "balanced_accuracy", "macro_f1", "auc_ovr"}


def test_table2_mask_encoders_read_the_task_masks(source, second_labels):
    # "masks": a binarised version of each tile, aligned record for record with the images
    def fake_masks(x):
        return np.where(x.mean(-1, keepdims=True) < 150, 255, 0).repeat(3, -1).astype(np.uint8)

    xtr, ytr = source.arrays("train")
    xte, yte = source.arrays("test")
    masks = ArraySource({"train": (fake_masks(xtr), ytr), "test": (fake_masks(xte), yte)}, source.class_names)
    enc = TransferEncoder(_colour_mean_encoder(), "mask")
    with_masks = TransferTask(source, labels=second_labels, masks=masks)
    without = TransferTask(source)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tbl = table2({"mask enc": enc}, {"with": with_masks, "without": without}, epochs=2, progress=False)
    assert np.isfinite(tbl.loc["mask enc", "with"])
    assert np.isnan(tbl.loc["mask enc", "without"])
    assert any("no masks" in str(x.message) for x in w)


def test_load_run_encoders_reads_export_metadata(tmp_path):
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    enc = _colour_mean_encoder()
    enc.save(export / "encoder_a.keras")
    meta = {"input_size": SIZE, "downsample": 8, "views": "asymmetric",
            "encoders": {"a": "encoder_a.keras", "b": "encoder_a.keras"},
            "classifiers": {"a": {"file": "classifier_a.keras", "input": "downsampled", "downsample": 8},
                            "b": {"file": "classifier_b.keras", "input": "full", "downsample": None}}}
    (export / "metadata.json").write_text(json.dumps(meta))
    found = load_run_encoders(tmp_path / "run")
    assert list(found) == ["a", "b"]
    assert (found["a"].input, found["a"].downsample) == ("downsampled", 8)
    assert (found["b"].input, found["b"].downsample) == ("full", None)
    assert found["a"].encoder is found["b"].encoder  # shared file loaded once
    x = np.random.default_rng(0).random((2, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(found["a"].encoder.predict(x, verbose=0), enc.predict(x, verbose=0), atol=1e-6)
    # a mask branch without a classifier is recognised from the views kind
    meta["views"], meta["downsample"] = "mask", None
    del meta["classifiers"]["a"]
    (export / "metadata.json").write_text(json.dumps(meta))
    assert load_run_encoders(tmp_path / "run", ["a"])["a"].input == "mask"
    with pytest.raises(ConfigError, match="no branch"):
        load_run_encoders(tmp_path / "run", ["z"])
    with pytest.raises(DataError, match="metadata.json"):
        load_run_encoders(tmp_path)


def test_mask_pair_tasks_read_histokd_masks_output(tmp_path):
    """Both Table 2 tasks from two `histokd masks --method classical` datasets."""
    import cv2

    from histokd.data.synthetic import make_synthetic_he
    from histokd.evaluation.transfer import mask_pair_tasks
    from histokd.nuclei.masks import build_mask_dataset

    x, y, names = make_synthetic_he(4, 48, seed=5, num_classes=3)
    for part, idx in (("train", range(0, 12, 2)), ("test", range(1, 12, 2))):
        for i in idx:
            d = tmp_path / "tiles" / part / names[y[i]]
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{i}.png"), x[i][..., ::-1])
        build_mask_dataset(tmp_path / "tiles" / part, tmp_path / "masks" / part, method="classical",
                           mpp=112.0 / 48, progress=False)
    tasks = mask_pair_tasks(tmp_path / "masks" / "train", tmp_path / "masks" / "test")
    tissue, nuclei = tasks["tissue"], tasks["nuclei"]
    assert tissue.names() == sorted(names) and nuclei.names() == ["Background", "Unknown"]
    xi, yi = tissue.source.arrays("test")
    xm, _ = tissue.masks.arrays("test")
    assert xi.shape == xm.shape == (6, 48, 48, 3)
    assert set(np.unique(xm)) <= {0, 1}  # type ids (classical: 1 = a nucleus), repeated to 3 channels
    np.testing.assert_array_equal(xm[..., 0], xm[..., 2])
    # tissue labels come from the class folders
    assert sorted(sorted(names)[k] for k in yi) == sorted(names[y[i]] for i in range(1, 12, 2))
    # the nucleus label is 1 ("Unknown" type) exactly when the tile's mask has a nucleus pixel
    xm_tr, _ = tissue.masks.arrays("train")
    np.testing.assert_array_equal(nuclei.split_labels("train"), (xm_tr.reshape(6, -1).max(1) > 0).astype(int))
    tbl = table2({"image enc": _colour_mean_encoder(48),
                  "mask enc": TransferEncoder(_colour_mean_encoder(48), "mask")}, tasks, epochs=2, progress=False)
    assert tbl.shape == (2, 2) and np.isfinite(tbl.to_numpy()).all()
    small = mask_pair_tasks(tmp_path / "masks" / "train", tmp_path / "masks" / "test", image_size=SIZE)
    assert small["tissue"].masks.arrays("train")[0].shape == (6, SIZE, SIZE, 3)
    with pytest.raises(DataError, match="not a mask dataset"):
        mask_pair_tasks(tmp_path, tmp_path / "masks" / "test")
