"""histokd.io: safetensors (package numpy API) and torch.save readers, HF folders, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histokd.errors import WeightsError
from histokd.io import read_checkpoint, read_safetensors, read_torch_file, write_safetensors


def test_safetensors_roundtrip_matches_the_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {"w": np.arange(6, dtype="float32").reshape(2, 3), "i": np.array([1, -2], "int32"),
              "s": np.array(2.5, "float64"), "b": np.array([True, False]), "h": np.ones(4, "float16")}
    path = tmp_path / "a.safetensors"
    write_safetensors(path, arrays, metadata={"format": "np", "step": 3})
    back = read_safetensors(path)
    assert sorted(back) == sorted(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    for k, v in st.load_file(str(path)).items():
        np.testing.assert_array_equal(v, arrays[k])
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "np", "step": "3"}


def test_bf16_tensors_are_widened_to_float32(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"bf": t, "f": torch.ones(2)}, str(tmp_path / "bf.safetensors"))
    got = read_checkpoint(tmp_path / "bf.safetensors")
    assert got["bf"].dtype == np.float32
    np.testing.assert_array_equal(got["bf"], t.float().numpy())
    np.testing.assert_array_equal(got["f"], np.ones(2, "float32"))


@pytest.mark.parametrize("content,reason", [
    (b"\xff" * 8 + b"{}", "header length exceeds the file size"),
    (b"abc", "shorter than a safetensors header"),
    ((10).to_bytes(8, "little") + b"not json!!", "not valid JSON"),
])
def test_corrupt_safetensors_name_the_file_and_the_fix(tmp_path, content, reason):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match=reason) as info:
        read_safetensors(bad)
    assert str(bad) in str(info.value) and "re-download" in str(info.value)


def test_truncated_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    write_safetensors(good, {"a": np.zeros((64,), "float32")})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_checkpoint(cut)
    with pytest.raises(WeightsError, match="does not exist"):
        read_safetensors(tmp_path / "missing.safetensors")


def test_folders_and_shards(tmp_path):
    a, b = np.ones((2, 2), "float32"), np.zeros(3, "float32")
    write_safetensors(tmp_path / "model-00001.safetensors", {"a": a})
    write_safetensors(tmp_path / "model-00002.safetensors", {"b": b})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}}))
    got = read_checkpoint(tmp_path)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], b)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="holds no model.safetensors"):
        read_checkpoint(empty)


def test_torch_reader_rejects_non_checkpoints(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        read_torch_file(junk)
    with pytest.raises(WeightsError, match="does not exist"):
        read_torch_file(tmp_path / "none.pth")


def test_old_import_paths_still_work():
    from histokd.backbones import read_safetensors as a
    from histokd.backbones.convert import read_checkpoint as b, write_safetensors as c
    from histokd.nuclei.checkpoint import _LEGACY_MAGIC, read_torch_file as d

    assert a is read_safetensors and b is read_checkpoint and c is write_safetensors and d is read_torch_file
    assert _LEGACY_MAGIC == 0x1950A86A20F9469CFC6C
