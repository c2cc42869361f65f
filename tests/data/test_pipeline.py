"""tf.data pipelines over array, file and TFRecord sources."""

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).parent))
from _imgs import class_tree, rgb, write  # noqa: E402

from histokd.data.decode import decode_image_file  # noqa: E402
from histokd.data.pipeline import dataset_info, format_dataset_info, make_dataset  # noqa: E402
from histokd.data.records import prepare  # noqa: E402
from histokd.data.sources import (  # noqa: E402
    CombinedSource,
    FolderSource,
    MedMNISTSource,
    SyntheticSource,
    TFRecordSource,
)
from histokd.errors import BadImageError, DataError  # noqa: E402


@pytest.fixture(scope="module")
def syn():
    return SyntheticSource(n_per_class=10, image_size=16, seed=0, num_classes=3, val_fraction=0.2, test_fraction=0.2)


def _collect(ds):
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def test_array_source_batches(syn):
    ds = make_dataset(syn, "train", 16, batch_size=4, training=True, seed=1)
    assert ds.element_spec[0].shape.as_list() == [4, 16, 16, 3]  # drop_remainder for training
    assert ds.element_spec[0].dtype == tf.uint8 and ds.element_spec[1].dtype == tf.int32
    x, y = _collect(ds)
    assert len(y) == 16  # 18 train examples, last partial batch dropped
    # evaluation: every example once, in order, last batch kept
    ev = make_dataset(syn, "val", 16, batch_size=4, training=False)
    xe, ye = _collect(ev)
    xa, ya = syn.arrays("val")
    np.testing.assert_array_equal(xe, xa)
    np.testing.assert_array_equal(ye, ya)


def test_shuffle_is_seeded_and_reshuffles(syn):
    a = _collect(make_dataset(syn, "train", 16, 6, True, seed=3))[1]
    b = _collect(make_dataset(syn, "train", 16, 6, True, seed=3))[1]
    c = _collect(make_dataset(syn, "train", 16, 6, True, seed=4))[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ds = make_dataset(syn, "train", 16, 18, True, seed=3, repeat=True)
    it = iter(ds)
    e1, e2 = next(it)[1].numpy(), next(it)[1].numpy()
    assert sorted(e1) == sorted(e2) and not np.array_equal(e1, e2)  # a new order every epoch


def test_resize_and_errors(syn):
    x, _ = next(iter(make_dataset(syn, "val", 24, 2, False)))
    assert x.shape == (2, 24, 24, 3) and x.dtype == tf.uint8
    with pytest.raises(DataError, match="fewer than one batch"):
        make_dataset(syn, "val", 16, 64, training=True)
    empty = SyntheticSource(4, 16, num_classes=2, val_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError, match="empty"):
        make_dataset(empty, "test", 16, 2, False)
    with pytest.raises(DataError, match="split"):
        make_dataset(syn, "holdout", 16, 2, False)


@pytest.fixture()
def mixed_folder(tmp_path):
    root = tmp_path / "tiles"
    class_tree(root, ("A", "B"), per_class=3, ext="png")
    class_tree(root, ("A", "B"), per_class=2, ext="tif", seed=5)
    write(root / "A" / "rgba.png", np.concatenate([rgb(7), np.full((16, 16, 1), 128, np.uint8)], -1))
    write(root / "B" / "deep16.tif", np.random.default_rng(1).integers(0, 65535, (16, 16), dtype=np.uint16))
    write(root / "B" / "big.jpg", rgb(9, 32))
    return root


def test_file_source_matches_numpy_decoder(mixed_folder):
    src = FolderSource(mixed_folder, val_fraction=0.0)
    x, y = _collect(make_dataset(src, "train", 16, 4, training=False, progress=False))
    recs = src.records("train")
    assert len(y) == len(recs) == 13
    for img, label, r in zip(x, y, recs):
        ref = decode_image_file(r.path)
        if ref.shape[:2] == (16, 16):
            np.testing.assert_array_equal(img, ref, err_msg=r.path)  # TF path == numpy path
        assert label == r.label
    big = [i for i, r in enumerate(recs) if r.path.endswith("big.jpg")][0]
    ref = tf.image.resize(decode_image_file(recs[big].path).astype("float32"), [16, 16], antialias=True)
    assert np.abs(x[big].astype(float) - ref.numpy()).max() <= 1.0
    # cached, shuffled training pipeline over files
    xt, yt = _collect(make_dataset(src, "train", 16, 4, training=True, cache=True, progress=False))
    assert len(yt) == 12 and sorted(yt.tolist()) != []


def test_bad_files_error_early_or_are_skipped_and_counted(mixed_folder):
    (mixed_folder / "A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 80)
    (mixed_folder / "B" / "cut.jpg").write_bytes(write(mixed_folder / "tmp.jpg", rgb(2, 32)).read_bytes()[:200])
    src = FolderSource(mixed_folder, val_fraction=0.0)
    with pytest.raises(BadImageError) as e:
        make_dataset(src, "train", 16, 4, training=False, progress=False)
    assert "broken.png" in str(e.value) or "cut.jpg" in str(e.value)
    assert "on_bad_image=skip" in str(e.value) and "1 more" in str(e.value)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = make_dataset(src, "train", 16, 4, training=False, on_bad_image="skip", progress=False)
    assert any("skipped 2" in str(m.message) for m in w)
    assert sorted(Path(d["path"]).name for d in src.skipped) == ["broken.png", "cut.jpg"]
    assert len(_collect(ds)[1]) == 13
    # the header-only check catches the truncated JPEG too
    src2 = FolderSource(mixed_folder, val_fraction=0.0)
    with pytest.raises(BadImageError):
        make_dataset(src2, "train", 16, 4, training=False, validate="header", progress=False)
    assert dataset_info(src)["skipped"]


@pytest.mark.filterwarnings("ignore:data.test_path is set")
def test_tfrecord_pipeline_and_combined_label_map(tmp_path, syn):
    prepare(syn, tmp_path / "syn", shard_size=5, progress=False)
    tsrc = TFRecordSource(tmp_path / "syn")
    x, y = _collect(make_dataset(tsrc, "test", 16, 4, training=False))
    xa, ya = syn.arrays("test")
    np.testing.assert_array_equal(x, xa)
    np.testing.assert_array_equal(y, ya)
    xt, yt = _collect(make_dataset(tsrc, "train", 8, 4, training=True, seed=0))
    assert xt.shape[1:] == (8, 8, 3) and len(yt) == 16 and sorted(set(yt.tolist())) == [0, 1, 2]
    # external test set whose class order differs: labels are mapped by name
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ext.npz", train_images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
             train_labels=np.array([0, 1, 0, 1]))
    ext = MedMNISTSource(tmp_path / "ext.npz", class_names=["lymphocytes", "tumour"])
    prepare(ext, tmp_path / "ext", progress=False)
    comb = CombinedSource(tsrc, TFRecordSource(tmp_path / "ext"))
    _, yc = _collect(make_dataset(comb, "test", 16, 4, training=False))
    assert yc.tolist() == [2, 0, 2, 0]
    comb2 = CombinedSource(syn, ext)
    xc, yc2 = _collect(make_dataset(comb2, "test", 16, 4, training=False))
    assert yc2.tolist() == [2, 0, 2, 0] and xc.shape == (4, 16, 16, 3)


def test_dataset_info(tmp_path, syn, mixed_folder):
    info = dataset_info(syn)
    assert info["splits"]["train"]["count"] == 18 and info["image_size"] == [16, 16]
    assert info["splits"]["val"]["class_counts"] == [2, 2, 2]
    text = format_dataset_info(info)
    assert "tumour" in text and "total" in text
    finfo = dataset_info(FolderSource(mixed_folder))
    assert finfo["kind"] == "files" and finfo["image_size"] is not None
    prepare(syn, tmp_path / "r", progress=False)
    assert dataset_info(TFRecordSource(tmp_path / "r"))["image_size"] == [16, 16]


def test_real_kather_tiles_folder_and_records(shared_data, tmp_path):
    """100 real Kather-2016 tiles: folder source → prepare → TFRecord pipeline, same pixels."""
    src = FolderSource(shared_data / "kather2016_ishil100", val_fraction=0.2, seed=0)
    assert len(src.class_names) == 8 and src.class_names[0] == "01_TUMOR"
    assert sum(src.num_examples(s) for s in ("train", "val", "test")) == 100
    xf, yf = _collect(make_dataset(src, "val", 64, 8, training=False, progress=False))
    prepare(src, tmp_path / "rec", image_size=224, progress=False)
    xr, yr = _collect(make_dataset(TFRecordSource(tmp_path / "rec"), "val", 64, 8, training=False))
    np.testing.assert_array_equal(yf, yr)
    np.testing.assert_array_equal(xf, xr)  # 224 px tiles stored losslessly, resized in graph alike
    # H&E: red and blue above green on average
    m = xf.reshape(-1, 3).mean(0)
    assert m[0] > m[1] and m[2] > m[1]
