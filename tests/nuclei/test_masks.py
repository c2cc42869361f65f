"""Nuclear-type masks, labels and the resumable paired image/mask dataset (More From Less §2.1)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from histokd.errors import BadImageError, ConfigError, WeightsError
from histokd.nuclei import masks as M
from histokd.nuclei.postprocess import NucleiResult, instance_info
from histokd.nuclei.synthetic import synthetic_he_tile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nuclei_helpers import decoder_model, encode  # noqa: E402


def test_type_mask_colours_and_labels():
    tm = np.array([[0, 1, 5], [2, 3, 4]])
    m = M.type_mask(tm)
    assert m.shape == (2, 3, 3) and m.dtype == np.uint8
    assert (m[..., 0] == tm).all() and (m[..., 1] == m[..., 2]).all()
    assert M.type_mask(tm, scale=51)[0, 2].tolist() == [255] * 3
    col = M.colour_mask(tm)
    assert col[0, 1].tolist() == [255, 0, 0] and col[0, 2].tolist() == [255, 165, 0]
    assert col[1, 2].tolist() == [255, 255, 0] and col[0, 0].tolist() == [0, 0, 0]
    assert M.most_present_type([0, 0, 0, 0, 0, 0]) == 0       # Background only without nuclei
    assert M.most_present_type([0, 1, 0, 0, 0, 0]) == 1
    assert M.most_present_type([0, 2, 7, 7, 0, 1]) == 2       # tie → lower id
    inst = np.zeros((8, 8), np.int32)
    inst[1:4, 1:4], inst[5:8, 5:8] = 1, 2
    res = NucleiResult(inst, instance_info(inst, np.where(inst == 1, 3, 2)))
    assert M.nucleus_counts(res, 6).tolist() == [0, 0, 1, 1, 0, 0]
    assert (M.type_mask(res.type_map())[2, 2] == 3).all()
    with pytest.raises(Exception, match="palette"):
        M.colour_mask(np.array([[9]]))


def _write(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        _write(src / "TUM" / f"t{i}.png", synthetic_he_tile(i, size=96, n_nuclei=6)[0])
    for i in range(2):
        _write(src / "ADI" / f"a{i}.png", np.full((96, 96, 3), 250, np.uint8))  # no nuclei
    return src


def _read_all(dst):
    return [{k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in ex.items()} for ex in M.mask_dataset(dst)]


def test_build_classical_dataset(folder, tmp_path):
    dst = tmp_path / "out"
    (folder / "ADI" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(BadImageError, match="broken.png"):
        M.build_mask_dataset(folder, tmp_path / "err", method="classical", progress=False)
    summary = M.build_mask_dataset(folder, dst, method="classical", shard_size=2, progress=False,
                                   on_bad_image="skip")
    assert summary["written"] == 5 and summary["bad_images"] == ["ADI/broken.png"]
    assert summary["shards"] == 3 and summary["type_names"] == ["Background", "Unknown"]
    info = json.loads((dst / "dataset.json").read_text())
    assert info["method"] == "classical" and info["tissue_names"] == ["ADI", "TUM"]
    rows = list(csv.DictReader(open(dst / "counts.csv")))
    assert [r["path"] for r in rows] == ["ADI/a0.png", "ADI/a1.png", "TUM/t0.png", "TUM/t1.png", "TUM/t2.png"]
    exs = {ex["path"].decode(): ex for ex in _read_all(dst)}
    assert set(exs) == {r["path"] for r in rows}
    for r in rows:
        ex = exs[r["path"]]
        assert ex["image"].shape == (96, 96, 3) and ex["mask"].shape == (96, 96, 3)
        assert ex["tissue"].decode() == r["tissue"] and ex["tissue_label"] == int(r["tissue_label"])
        assert ex["num_nuclei"] == int(r["num_nuclei"]) == ex["counts"].sum()
        assert ex["label"] == int(r["label"])
        if r["tissue"] == "ADI":
            assert ex["label"] == 0 and r["label_name"] == "Background" and ex["mask"].max() == 0
        else:
            assert ex["label"] == 1 and r["label_name"] == "Unknown" and ex["num_nuclei"] >= 3
            assert set(np.unique(ex["mask"])) == {0, 1}
            img = cv2.cvtColor(cv2.imread(str(folder / r["path"])), cv2.COLOR_BGR2RGB)
            assert (ex["image"] == img).all()  # lossless


def test_resume_after_interruption(folder, tmp_path, monkeypatch):
    from histokd.nuclei import classical

    calls = []
    real = classical.segment_classical

    def flaky(image, mpp=None):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while segmenting the 4th image (shard 1)
        return real(image, mpp=mpp)

    monkeypatch.setattr(classical, "segment_classical", flaky)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        M.build_mask_dataset(folder, dst, method="classical", shard_size=2, batch_size=1, progress=False)
    committed = sorted(p.name for p in dst.glob("masks-*") if p.suffix != ".tmp")
    assert committed == ["masks-00000.csv", "masks-00000.tfrecord"]
    assert (dst / "masks-00001.tfrecord.tmp").exists()  # the shard being written when killed
    counter = []
    monkeypatch.setattr(classical, "segment_classical", lambda im, mpp=None: (counter.append(1), real(im, mpp=mpp))[1])
    summary = M.build_mask_dataset(folder, dst, method="classical", shard_size=2, batch_size=1, progress=False)
    assert summary["skipped_existing"] == 2 and summary["written"] == 3 and len(counter) == 3
    assert not list(dst.glob("*.tmp"))
    paths = [ex["path"].decode() for ex in _read_all(dst)]
    assert sorted(paths) == sorted(set(paths)) and len(paths) == 5
    with pytest.raises(ConfigError, match="already holds"):
        M.build_mask_dataset(folder, dst, method="classical", mask_scale=51, progress=False)


def test_hovernet_method_with_a_model(tmp_path):
    src = tmp_path / "src"
    inst = np.zeros((120, 120), np.int32)
    yy, xx = np.mgrid[:120, :120]
    for i, (cy, cx) in enumerate([(30, 30), (30, 80), (90, 60)], 1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = i
    _write(src / "a.png", encode(inst))
    model = decoder_model()
    model.num_types = 3  # the stand-in's TP head: every nucleus pixel is type 2
    summary = M.build_mask_dataset(src, tmp_path / "out", weights=model, progress=False)
    assert summary["type_names"] == ["Background", "Type 1", "Type 2"]
    (ex,) = _read_all(tmp_path / "out")
    assert ex["counts"].tolist() == [0, 0, 3] and ex["label"] == 2 and ex["tissue_label"] == -1
    assert set(np.unique(ex["mask"])) == {0, 2}


def test_builder_errors(folder, tmp_path):
    with pytest.raises(WeightsError, match="--weights"):
        M.build_mask_dataset(folder, tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="method 'x'"):
        M.build_mask_dataset(folder, tmp_path / "o2", method="x", progress=False)
    with pytest.raises(Exception, match="does not exist"):
        M.build_mask_dataset(tmp_path / "missing", tmp_path / "o3", method="classical", progress=False)
