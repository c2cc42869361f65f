"""Decoding rules, in-graph decoder parity, and TFRecord preparation."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).parent))
from _imgs import class_tree, rgb, write  # noqa: E402

from histokd.data import records as rec_mod  # noqa: E402
from histokd.data.decode import check_image_header, decode_image_bytes, decode_image_file, to_rgb_uint8  # noqa: E402
from histokd.data.pipeline import decode_image_tf  # noqa: E402
from histokd.data.records import prepare, prepare_cli  # noqa: E402
from histokd.data.sources import FolderSource, MedMNISTSource, SyntheticSource, TFRecordSource  # noqa: E402
from histokd.errors import BadImageError, DataError  # noqa: E402


def _expected_rgba(img):
    c, a = img[..., :3].astype(int), img[..., 3:].astype(int)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Files of many kinds and the RGB uint8 each must decode to."""
    d = tmp_path_factory.mktemp("variants")
    rng = np.random.default_rng(0)
    c8 = rgb(1, 12)
    g8 = rng.integers(0, 256, (12, 12), dtype=np.uint8)
    c16 = rng.integers(0, 65536, (12, 12, 3), dtype=np.uint16)
    g16 = rng.integers(0, 65536, (12, 12), dtype=np.uint16)
    rgba = np.concatenate([c8, rng.integers(0, 256, (12, 12, 1), dtype=np.uint8)], -1)
    ga = np.stack([g8, rng.integers(0, 256, (12, 12), dtype=np.uint8)], -1)
    to8 = lambda x: ((x.astype(np.uint32) + 128) // 257).astype(np.uint8)  # noqa: E731
    cases = {
        "rgb8.png": (c8, c8),
        "gray8.png": (g8, np.repeat(g8[..., None], 3, -1)),
        "rgb16.png": (c16, to8(c16)),
        "gray16.png": (g16, np.repeat(to8(g16)[..., None], 3, -1)),
        "rgba.png": (rgba, _expected_rgba(rgba)),
        "rgb8.tif": (c8, c8),
        "rgb16.tif": (c16, to8(c16)),
        "gray16.tiff": (g16, np.repeat(to8(g16)[..., None], 3, -1)),
        "rgba.tif": (rgba, _expected_rgba(rgba)),
        "rgb.bmp": (c8, c8),
        "gray.bmp": (g8, np.repeat(g8[..., None], 3, -1)),
    }
    out = {}
    for name, (img, expected) in cases.items():
        out[name] = (write(d / name, img), expected)
    gray_alpha = np.stack([g8, ga[..., 1]], -1)
    exp_ga = np.repeat(_expected_rgba(np.concatenate([np.repeat(g8[..., None], 3, -1), ga[..., 1:]], -1)), 1, -1)
    import tifffile

    tifffile.imwrite(d / "ga.tif", gray_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    out["ga.tif"] = (d / "ga.tif", exp_ga)
    return out


def test_numpy_decoder_rules(variants):
    for name, (path, expected) in variants.items():
        got = decode_image_file(str(path))
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_jpeg_and_gif(tmp_path):
    img = np.full((16, 16, 3), (200, 120, 180), np.uint8)
    j = decode_image_file(str(write(tmp_path / "a.jpg", img)))
    assert j.shape == (16, 16, 3) and np.abs(j.astype(int) - img).max() <= 3
    g = decode_image_file(str(write(tmp_path / "a.gif", img)))
    assert g.shape == (16, 16, 3) and np.abs(g.astype(int) - img).max() <= 8


def test_graph_decoder_matches_numpy(variants, tmp_path):
    """PNG (8/16-bit, grey, RGBA) and BMP decode identically in graph and in numpy."""
    for name, (path, expected) in variants.items():
        if not name.endswith((".png", ".bmp")):
            continue
        data = Path(path).read_bytes()
        got = decode_image_tf(tf.constant(data)).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=name)
    jpg = write(tmp_path / "b.jpg", rgb(3, 16))
    a = decode_image_tf(tf.constant(jpg.read_bytes())).numpy().astype(int)
    b = decode_image_file(str(jpg)).astype(int)
    np.testing.assert_array_equal(a, b)


def test_float_and_wide_int_arrays():
    assert to_rgb_uint8(np.full((2, 2), 1.0)).max() == 255
    assert to_rgb_uint8(np.full((2, 2), 0.5, np.float32))[0, 0, 0] == 128
    assert to_rgb_uint8(np.full((2, 2), 2**31 - 1, np.int32))[0, 0, 0] == 255
    assert to_rgb_uint8(np.ones((2, 2), bool))[0, 0, 0] == 255
    with pytest.raises(BadImageError):
        to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


def test_bad_images_are_named(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(BadImageError, match="broken.tif") as e:
        decode_image_file(str(bad))
    assert "on_bad_image=skip" in str(e.value)
    with pytest.raises(BadImageError, match="empty"):
        decode_image_bytes(b"", "x.png")
    with pytest.raises(BadImageError, match="cannot read"):
        decode_image_file(str(tmp_path / "missing.png"))
    good = write(tmp_path / "ok.png", rgb(0, 32))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(BadImageError, match="truncated"):
        check_image_header(str(trunc))
    txt = tmp_path / "fake.png"
    txt.write_text("hello, I am not a picture at all, really not")
    with pytest.raises(BadImageError, match="not a PNG/JPEG"):
        check_image_header(str(txt))
    assert check_image_header(str(good)) == "png"


# --------------------------------------------------------------------------- prepare
def _read_all(directory, split):
    src = TFRecordSource(directory)
    out = []
    for raw in tf.data.TFRecordDataset(src.shards(split)):
        ex = rec_mod.parse_example(raw)
        out.append((ex["source_path"].numpy().decode(), ex["image"].numpy(), int(ex["label"])))
    return out


def test_prepare_folder_roundtrip_and_sharding(tmp_path):
    root = tmp_path / "src"
    class_tree(root, ("A", "B"), per_class=4, ext="tif")
    write(root / "A" / "wide16.tif", np.random.default_rng(0).integers(0, 65535, (16, 16, 3), dtype=np.uint16))
    src = FolderSource(root, val_fraction=0.25, test_fraction=0.0, seed=0)
    out = tmp_path / "rec"
    summary = prepare(src, out, shard_size=2, progress=False, num_workers=2)
    assert summary["counts"] == {"train": src.num_examples("train"), "val": src.num_examples("val"), "test": 0}
    assert summary["num_skipped"] == 0 and summary["image_size"] == [16, 16]
    names = sorted(p.name for p in out.glob("*.tfrecord"))
    n_train = -(-src.num_examples("train") // 2)
    assert names[-1] == f"val-00000-of-00001.tfrecord" or names[-1].startswith("val-")
    assert f"train-{n_train - 1:05d}-of-{n_train:05d}.tfrecord" in names
    assert not list(out.glob(".*partial"))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["class_names"] == ["A", "B"] and meta["source"]["type"] == "folder"
    assert meta["histokd_version"] and meta["counts"]["train"] == src.num_examples("train")
    got = _read_all(out, "train")
    assert len(got) == src.num_examples("train")
    for path, img, label in got:
        np.testing.assert_array_equal(img, decode_image_file(path))  # lossless
        assert label == src.class_names.index(Path(path).parent.name)
    tsrc = TFRecordSource(out)
    assert tsrc.class_names == ["A", "B"] and tsrc.num_examples("val") == src.num_examples("val")
    assert [r.label for r in tsrc.records("train")] == [r.label for r in src.records("train")]
    # re-running replaces the old shards
    prepare(src, out, shard_size=100, progress=False)
    assert sorted(p.name for p in out.glob("*.tfrecord")) == ["train-00000-of-00001.tfrecord",
                                                               "val-00000-of-00001.tfrecord"]


def test_prepare_bad_image_error_and_skip(tmp_path):
    root = tmp_path / "src"
    class_tree(root, ("A", "B"), per_class=3)
    (root / "B" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    src = FolderSource(root, val_fraction=0.0)
    out = tmp_path / "rec"
    with pytest.raises(BadImageError) as e:
        prepare(src, out, progress=False)
    assert "corrupt.png" in str(e.value) and "on_bad_image=skip" in str(e.value)
    assert not (out / "dataset.json").exists() and not list(out.glob(".*partial"))
    with pytest.raises(DataError, match="not a prepared"):
        TFRecordSource(out)
    summary = prepare(src, out, on_bad_image="skip", progress=False)
    assert summary["num_skipped"] == 1 and summary["skipped"][0]["path"].endswith("corrupt.png")
    assert summary["counts"]["train"] == 6
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_skipped"] == 1 and meta["skipped"][0]["split"] == "train"


def test_prepare_interrupted_leaves_no_complete_looking_dir(tmp_path, monkeypatch):
    src = SyntheticSource(6, 16, num_classes=2, val_fraction=0.0, test_fraction=0.0)
    out = tmp_path / "rec"
    prepare(src, out, progress=False)  # a previous complete run
    calls = {"n": 0}
    real = rec_mod.encode_png

    def flaky(img, *args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(img, *args)

    monkeypatch.setattr(rec_mod, "encode_png", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, shard_size=4, progress=False, num_workers=1)
    assert not (out / "dataset.json").exists()
    assert not list(out.glob(".*partial"))
    with pytest.raises(DataError):
        TFRecordSource(out)


def test_prepare_resize_arrays_and_cli(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "m.npz", train_images=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [0], [1], [1]]),
             test_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), test_labels=np.array([[1], [0]]))
    summary = prepare(MedMNISTSource(tmp_path / "m.npz"), tmp_path / "r", image_size=14, progress=False)
    assert summary["image_size"] == [14, 14] and summary["counts"] == {"train": 5, "val": 0, "test": 2}
    got = _read_all(tmp_path / "r", "test")
    assert [g[2] for g in got] == [1, 0] and got[0][1].shape == (14, 14, 3)
    s2 = prepare_cli("synthetic", str(tmp_path / "syn"), image_size=16, progress=False)
    assert s2["counts"]["test"] > 0 and s2["image_size"] == [16, 16]
    with pytest.raises(DataError, match="already a prepared"):
        prepare(TFRecordSource(tmp_path / "syn"), tmp_path / "again", progress=False)
