"""``from_pretrained``: tiny random Hugging Face models → histokd backbones with the same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from keras import ops

import histokd  # noqa: F401
from histokd.backbones import SwinV2Backbone, ViTBackbone, from_pretrained
from histokd.backbones.pretrained import normalization_from_preprocessor
from histokd.errors import ConfigError, WeightsError

TOL = 1e-4  # max |ours - torch| / max |torch|, as in test_convert.py


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def _randomise_biases(torch, model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.uniform_(1.0, 4.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory, torch, transformers):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, image_size=32, patch_size=8)
    model = _randomise_biases(torch, transformers.ViTModel(cfg, add_pooling_layer=False))
    folder = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def swin_folder(tmp_path_factory, torch, transformers):
    torch.manual_seed(1)
    cfg = transformers.Swinv2Config(image_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4],
                                    window_size=4, drop_path_rate=0.0)
    model = _randomise_biases(torch, transformers.Swinv2Model(cfg))
    folder = tmp_path_factory.mktemp("hf_swinv2")
    model.save_pretrained(folder)
    return folder, model


def _images(size, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (2, size, size, 3)).astype("float32")


def _pixel_values(torch, x01, mean, std):
    x = (x01 - np.asarray(mean, "float32")) / np.asarray(std, "float32")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _rel_err(ours, ref):
    ours = ops.convert_to_numpy(ours)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_vit_folder_builds_the_same_model(torch, vit_folder):
    folder, hf = vit_folder
    enc = from_pretrained(folder)
    assert isinstance(enc, ViTBackbone)
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.patch_size, enc.image_size) == (32, 2, 2, 8, (32, 32))
    assert enc.mlp_ratio == 2.0 and enc.layer_norm_eps == 1e-12 and enc.normalization == "tf"
    x = _images(32)
    with torch.no_grad():
        ref = hf(_pixel_values(torch, x, 0.5, 0.5)).last_hidden_state[:, 0].numpy()
    assert _rel_err(enc(x), ref) <= TOL


def test_swinv2_folder_builds_the_same_model(torch, swin_folder):
    folder, hf = swin_folder
    enc = from_pretrained(folder, name="swin_from_hf")
    assert isinstance(enc, SwinV2Backbone) and enc.name == "swin_from_hf"
    assert enc.depths == [2, 2, 2] and enc.num_heads == [1, 2, 4] and enc.window_size == 4
    x = _images(64, seed=2)
    with torch.no_grad():
        ref = hf(_pixel_values(torch, x, 0.5, 0.5)).pooler_output.numpy()
    assert _rel_err(enc(x), ref) <= TOL


def test_preprocessor_mean_and_std_become_the_input_normalisation(tmp_path, torch, vit_folder):
    folder, hf = vit_folder
    mine = tmp_path / "vit"
    mine.mkdir()
    for f in folder.iterdir():
        (mine / f.name).write_bytes(f.read_bytes())
    mean, std = [0.7, 0.4, 0.2], [0.2, 0.3, 0.45]
    (mine / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
         "do_normalize": True, "image_mean": mean, "image_std": std}))
    enc = from_pretrained(mine)
    np.testing.assert_allclose(enc.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(enc.std, std, rtol=1e-6)
    x = _images(32, seed=4)
    with torch.no_grad():
        ref = hf(_pixel_values(torch, x, mean, std)).last_hidden_state[:, 0].numpy()
    assert _rel_err(enc(x), ref) <= TOL
    # overrides win over the folder: a bigger, size-agnostic model (positions resized bicubically)
    big = from_pretrained(mine, input_size=48, dynamic_size=True, normalization="none")
    assert big.mean is None and big.normalization == "none" and big.image_size == (48, 48)


def test_pytorch_model_bin_folder(tmp_path, torch, vit_folder):
    folder, hf = vit_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    enc = from_pretrained(tmp_path)
    x = _images(32, seed=5)
    with torch.no_grad():
        ref = hf(_pixel_values(torch, x, 0.5, 0.5)).last_hidden_state[:, 0].numpy()
    assert _rel_err(enc(x), ref) <= TOL


def test_normalization_from_preprocessor_arithmetic():
    assert normalization_from_preprocessor({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}) == {
        "mean": [0.5] * 3, "std": [0.5] * 3}
    assert normalization_from_preprocessor({"do_normalize": False}) == {"normalization": "none"}
    # no rescaling: the processor sees 0-255 pixels, so mean/std are divided by 255
    got = normalization_from_preprocessor({"do_rescale": False, "image_mean": 127.5, "image_std": 127.5})
    np.testing.assert_allclose(got["mean"], [0.5] * 3)
    np.testing.assert_allclose(got["std"], [0.5] * 3)
    with pytest.raises(ConfigError, match="one number per channel"):
        normalization_from_preprocessor({"image_mean": [0.5, 0.5], "image_std": [0.5] * 3})


def test_clear_errors(tmp_path, vit_folder):
    folder, _hf = vit_folder
    with pytest.raises(WeightsError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "convnext"}))
    with pytest.raises(ConfigError, match=r"'convnext' is not supported; supported model types: swinv2, vit"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="not a readable config.json"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights"):
        from_pretrained(tmp_path)
    # weights that do not fit: config.json claims a third block
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"lacks the weight for 'blocks\.2\."):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="GELU"):
        from_pretrained(tmp_path)
    with pytest.raises(WeightsError, match="is a file"):
        from_pretrained(tmp_path / "model.safetensors")
