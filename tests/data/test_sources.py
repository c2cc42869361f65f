"""Sources: folder, manifest, MedMNIST, synthetic, combined; build_source and detection."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imgs import class_tree, rgb, write  # noqa: E402

from histokd.data.sources import (  # noqa: E402
    CombinedSource,
    FolderSource,
    ManifestSource,
    MedMNISTSource,
    SyntheticSource,
    TFRecordSource,
    build_source,
    source_from_path,
    stratified_split,
)
from histokd.errors import ConfigError, DataError, RegistryError  # noqa: E402
from histokd.registry import DATASETS  # noqa: E402


# --------------------------------------------------------------------------- folder
def test_folder_stratified_seeded_split(tmp_path):
    class_tree(tmp_path, ("TUM", "ADI", "STR"), per_class=10)
    write(tmp_path / "ADI" / "nested" / "deep" / "x.JPG", rgb(1))  # recursive, any case
    (tmp_path / "ADI" / ".hidden.png").write_bytes(b"junk")  # hidden files ignored
    (tmp_path / "ADI" / "notes.txt").write_text("not an image")
    src = FolderSource(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert src.class_names == ["ADI", "STR", "TUM"]  # sorted folder names
    counts = {s: src.num_examples(s) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 31
    assert src.class_counts("val") == [2, 2, 2] and src.class_counts("test") == [1, 1, 1]
    assert all(Path(r.path).is_file() and r.split == "train" for r in src.records("train"))
    again = FolderSource(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert again.records("val") == src.records("val")
    other = FolderSource(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert {r.path for r in other.records("val")} != {r.path for r in src.records("val")}
    # the splits partition the files
    paths = [r.path for s in ("train", "val", "test") for r in src.records(s)]
    assert len(paths) == len(set(paths)) == 31


def test_folder_with_split_subfolders(tmp_path):
    class_tree(tmp_path / "train", ("a", "b"), per_class=3)
    class_tree(tmp_path / "validation", ("a", "b"), per_class=1)
    class_tree(tmp_path / "test", ("a", "b", "c"), per_class=2)
    src = FolderSource(tmp_path)
    assert src.has_split_folders and src.class_names == ["a", "b", "c"]
    assert [src.num_examples(s) for s in ("train", "val", "test")] == [6, 2, 6]
    assert src.class_counts("test") == [2, 2, 2]


def test_folder_errors_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderSource(tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="one sub-folder per class"):
        FolderSource(tmp_path)
    loose = tmp_path / "loose"
    write(loose / "a.png", rgb(0))
    with pytest.raises(DataError, match="class sub-folders"):
        FolderSource(loose)
    with pytest.raises(ConfigError):
        FolderSource(tmp_path, val_fraction=0.6, test_fraction=0.5)


def test_stratified_split_groups_never_leak():
    labels = np.repeat([0, 1], 20)
    groups = [f"p{i // 4}" for i in range(40)]  # 10 patients of 4 tiles
    split = stratified_split(labels, 0.2, 0.2, seed=0, groups=groups)
    for g in set(groups):
        assert len({s for s, gg in zip(split, groups) if gg == g}) == 1
    assert set(split) == {"train", "val", "test"}
    # at least one training example per class even for tiny classes
    tiny = stratified_split([0, 0, 1], 0.5, 0.4)
    assert {0, 1} <= {lab for lab, s in zip([0, 0, 1], tiny) if s == "train"}


# --------------------------------------------------------------------------- manifest
def _manifest(tmp_path, rows, header="path,label,split,slide_id,patient_id,mpp"):
    p = tmp_path / "m.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_manifest_loads_relative_paths_and_metadata(tmp_path):
    for i in range(4):
        write(tmp_path / "img" / f"{i}.png", rgb(i))
    m = _manifest(tmp_path, ["img/0.png,TUM,train,s1,p1,0.5", "img/1.png,STR,train,s1,p1,",
                             "img/2.png,TUM,val,s2,p2,0.5", f"{tmp_path}/img/3.png,STR,test,s3,p3,1.0"])
    src = ManifestSource(m)
    assert src.class_names == ["STR", "TUM"]
    tr = src.records("train")
    assert [r.label for r in tr] == [1, 0] and tr[0].slide_id == "s1" and tr[0].patient_id == "p1"
    assert tr[0].mpp == 0.5 and tr[1].mpp is None
    assert Path(tr[0].path) == tmp_path / "img" / "0.png"
    assert src.num_examples("val") == 1 and src.records("test")[0].mpp == 1.0
    src2 = ManifestSource(m, classes=["TUM", "STR", "NORM"])
    assert src2.class_names == ["TUM", "STR", "NORM"] and src2.records("train")[0].label == 0


def test_manifest_problems_are_reported_together(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.png", rgb(i))
    m = _manifest(tmp_path, [
        "0.png,TUM,train,,p1,",     # line 2 ok
        "1.png,XXX,train,,p2,",     # line 3 unknown label
        "missing.png,TUM,train,,p3,",  # line 4 missing file
        "0.png,TUM,val,,p4,",       # line 5 duplicate path
        "2.png,TUM,val,,p1,",       # line 6 patient p1 in train and val
        "2.png,TUM,holdout,,p9,",   # line 7 invalid split (and duplicate)
        "1.png,STR,test,,p8,abc",   # line 8 invalid mpp
    ])
    with pytest.raises(DataError) as e:
        ManifestSource(m, classes=["TUM", "STR"])
    msg = str(e.value)
    for needle in ["unknown label", "line 3", "'XXX'", "missing file", "line 4", "duplicate path", "line 5",
                   "patient in two splits", "line 6", "'p1'", "invalid split", "'holdout'", "line 7",
                   "invalid mpp", "line 8", "fix:"]:
        assert needle in msg, (needle, msg)


def test_manifest_lists_at_most_ten_rows_per_problem(tmp_path):
    m = _manifest(tmp_path, [f"nope{i}.png,A,train,,," for i in range(25)])
    with pytest.raises(DataError) as e:
        ManifestSource(m)
    assert "25 row(s)" in str(e.value) and "and 15 more" in str(e.value)


def test_manifest_missing_columns_and_integer_labels(tmp_path):
    with pytest.raises(DataError, match="lacks column"):
        ManifestSource(_manifest(tmp_path, ["a.png"], header="file"))
    for i in range(12):
        write(tmp_path / f"{i}.png", rgb(i))
    # no split column: seeded split grouped by patient
    rows = [f"{i}.png,{i % 2},,,pat{i // 2}," for i in range(12)]
    src = ManifestSource(_manifest(tmp_path, rows, "path,label,split,slide_id,patient_id,mpp"), val_fraction=0.3)
    assert src.class_names == ["0", "1"] and not src.has_split_column
    where = {r.patient_id: s for s in ("train", "val", "test") for r in src.records(s)}
    for s in ("train", "val", "test"):
        for r in src.records(s):
            assert where[r.patient_id] == s
    assert src.num_examples("val") > 0


# --------------------------------------------------------------------------- arrays
def _npz(path, n=(6, 3, 3), shape=(8, 8), k=2, **extra):
    rng = np.random.default_rng(0)
    arrs = {}
    for s, c in zip(("train", "val", "test"), n):
        arrs[f"{s}_images"] = rng.integers(0, 256, (c,) + shape, dtype=np.uint8)
        arrs[f"{s}_labels"] = (np.arange(c) % k).reshape(-1, 1).astype(np.uint8)
    arrs.update(extra)
    np.savez(path, **arrs)
    return arrs


def test_medmnist_gray_to_rgb_and_names(tmp_path):
    arrs = _npz(tmp_path / "foo.npz")
    src = MedMNISTSource(tmp_path / "foo.npz")
    x, y = src.arrays("train")
    assert x.shape == (6, 8, 8, 3) and x.dtype == np.uint8 and y.tolist() == [0, 1, 0, 1, 0, 1]
    np.testing.assert_array_equal(x[..., 1], arrs["train_images"])
    assert src.class_names == ["0", "1"] and src.num_examples("test") == 3
    assert src.records("val")[2].index == 2 and src.records("val")[2].path is None
    _npz(tmp_path / "pneumoniamnist_64.npz")
    assert MedMNISTSource(tmp_path / "pneumoniamnist_64.npz").class_names == ["normal", "pneumonia"]
    info = {"label": {"0": "no", "1": "yes"}}
    assert MedMNISTSource(tmp_path / "foo.npz", info=info).class_names == ["no", "yes"]
    _npz(tmp_path / "rgb.npz", shape=(8, 8, 3))
    assert MedMNISTSource(tmp_path / "rgb.npz").arrays("val")[0].shape == (3, 8, 8, 3)


def test_medmnist_rejections(tmp_path):
    _npz(tmp_path / "vol.npz", shape=(6, 8, 8))
    with pytest.raises(DataError, match="3-D"):
        MedMNISTSource(tmp_path / "vol.npz")
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 14)))
    with pytest.raises(DataError, match="multi-label"):
        MedMNISTSource(tmp_path / "multi.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(DataError, match="train_images"):
        MedMNISTSource(tmp_path / "other.npz")
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(DataError):
        MedMNISTSource(tmp_path / "bad.npz")


def test_medmnist_real_pneumonia(shared_data):
    src = MedMNISTSource(shared_data / "pneumoniamnist" / "pneumoniamnist_aksufatih_balanced.npz")
    assert [src.num_examples(s) for s in ("train", "val", "test")] == [2428, 270, 468]
    assert src.class_names == ["normal", "pneumonia"] and src.class_counts("train") == [1214, 1214]
    assert src.arrays("test")[0].shape == (468, 28, 28, 3)


def test_medmnist_real_3d_is_refused(shared_data):
    with pytest.raises(DataError, match="3-D"):
        MedMNISTSource(shared_data / "adrenalmnist3d" / "adrenalmnist3d_28.npz")


def test_synthetic_source_counts_without_rendering():
    src = SyntheticSource(n_per_class=10, image_size=16, seed=1, num_classes=3, val_fraction=0.2, test_fraction=0.2)
    before = [src.num_examples(s) for s in ("train", "val", "test")]
    assert not src._loaded and before == [18, 6, 6]
    x, y = src.arrays("val")
    assert x.shape == (6, 16, 16, 3) and np.bincount(y).tolist() == [2, 2, 2]
    assert [src.num_examples(s) for s in ("train", "val", "test")] == before
    with pytest.raises(ConfigError):
        SyntheticSource(num_classes=9)


# --------------------------------------------------------------------------- factories
def test_build_source_all_kinds(tmp_path):
    class_tree(tmp_path / "folder", ("a", "b"), per_class=5)
    _npz(tmp_path / "x.npz")
    m = tmp_path / "m.csv"
    m.write_text("path,label\n" + "".join(f"folder/a/a_{i}.png,a\n" for i in range(5)))
    cfgs = {
        "synthetic": SimpleNamespace(source="synthetic", synthetic_per_class=5, synthetic_classes=2, image_size=16),
        "folder": SimpleNamespace(source="folder", path=str(tmp_path / "folder"), val_fraction=0.2,
                                  test_fraction=0.2, seed=0),
        "manifest": {"source": "manifest", "path": str(m)},
        "medmnist": SimpleNamespace(source="medmnist", path=str(tmp_path / "x.npz")),
        "auto": SimpleNamespace(source="auto", path=str(tmp_path / "x.npz")),
    }
    kinds = {"synthetic": SyntheticSource, "folder": FolderSource, "manifest": ManifestSource,
             "medmnist": MedMNISTSource, "auto": MedMNISTSource}
    for name, cfg in cfgs.items():
        assert isinstance(build_source(cfg), kinds[name]), name
    assert build_source(cfgs["folder"]).num_examples("test") == 2
    for name in ("synthetic", "folder", "manifest", "medmnist", "tfrecord"):
        assert name in DATASETS
    with pytest.raises(RegistryError, match="valid names"):
        build_source(SimpleNamespace(source="nope"))
    with pytest.raises(ConfigError, match="data.path"):
        build_source(SimpleNamespace(source="folder", path=None))


def test_build_source_with_external_test_path(tmp_path):
    class_tree(tmp_path / "train", ("ADI", "STR", "TUM"), per_class=5)
    class_tree(tmp_path / "ext", ("TUM", "ADI"), per_class=2, seed=9)  # subset of classes
    cfg = SimpleNamespace(source="folder", path=str(tmp_path / "train"), test_path=str(tmp_path / "ext"),
                          val_fraction=0.2, test_fraction=0.2, seed=0)
    src = build_source(cfg)
    assert isinstance(src, CombinedSource)
    assert src.main.num_examples("test") == 0  # main built with test_fraction=0
    assert [src.num_examples(s) for s in ("train", "val", "test")] == [12, 3, 4]
    test = src.records("test")
    assert all(r.split == "test" and "/ext/" in r.path for r in test)
    names = [src.class_names[r.label] for r in test]
    assert names == [Path(r.path).parent.name for r in test]  # labels mapped by name
    class_tree(tmp_path / "ext2", ("NORM",), per_class=1)
    cfg.test_path = str(tmp_path / "ext2")
    with pytest.raises(DataError, match="NORM"):
        build_source(cfg)


def test_source_from_path_detection(tmp_path):
    class_tree(tmp_path / "f", ("a", "b"), per_class=2)
    _npz(tmp_path / "x.npz")
    (tmp_path / "m.csv").write_text("path,label\nf/a/a_0.png,a\n")
    assert isinstance(source_from_path(tmp_path / "f"), FolderSource)
    assert isinstance(source_from_path(tmp_path / "x.npz"), MedMNISTSource)
    assert isinstance(source_from_path(tmp_path / "m.csv"), ManifestSource)
    syn = source_from_path("synthetic", image_size=16, synthetic_per_class=5)
    assert isinstance(syn, SyntheticSource) and syn.num_examples("test") == 4
    with pytest.raises(DataError, match="does not exist"):
        source_from_path(tmp_path / "nothing.csv.gz")
    (tmp_path / "weird.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="cannot tell"):
        source_from_path(tmp_path / "weird.bin")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-00000-of-00001.tfrecord").write_bytes(b"")
    with pytest.raises(DataError, match="interrupted"):
        TFRecordSource(tmp_path / "half")
