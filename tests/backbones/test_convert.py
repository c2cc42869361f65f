"""Checkpoint readers and converters: safetensors / torch.save without torch, HF / timm / MS layouts."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

import histokd  # noqa: F401
from keras import ops

from histokd.backbones.convert import (
    convert_state_dict,
    detect_layout,
    load_pretrained,
    read_checkpoint,
    read_safetensors,
    read_torch_state_dict,
    write_safetensors,
)
from histokd.backbones.swin_v2 import SwinV2Backbone
from histokd.backbones.vit import ViTBackbone, vit_tiny
from histokd.errors import WeightsError

REPO = Path(__file__).resolve().parents[2]
VIT_KW = dict(input_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2,
              layer_norm_eps=1e-12, normalization="none")
SWIN_KW = dict(input_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=4,
               drop_path_rate=0.0, normalization="none")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_vit(torch, transformers):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=96, image_size=32, patch_size=8)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_swin(torch, transformers):
    torch.manual_seed(1)
    cfg = transformers.Swinv2Config(image_size=64, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4],
                                    window_size=4, drop_path_rate=0.0)
    model = transformers.Swinv2Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.uniform_(1.0, 4.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _x(size, seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3) + size).astype("float32")


def _vit_ref(torch, hf, x):
    with torch.no_grad():
        return hf(torch.from_numpy(x), interpolate_pos_encoding=True).last_hidden_state[:, 0].numpy()


def _rel_err(a, b):
    a = ops.convert_to_numpy(a)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _np_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------
def test_safetensors_roundtrip_and_interop(tmp_path):
    arrays = {
        "f32": np.arange(12, dtype="float32").reshape(3, 4),
        "f16": np.linspace(-2, 2, 6).astype("float16"),
        "i64": np.array([[1, -2], [3, 4]], dtype="int64"),
        "flag": np.array([True, False]),
        "scalar": np.array(3.5, dtype="float32"),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(path, arrays, metadata={"format": "np"})
    back = read_safetensors(path)
    assert sorted(back) == sorted(arrays)  # a state dict's order carries no meaning
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
    st = pytest.importorskip("safetensors.numpy")
    for k, v in st.load_file(str(path)).items():  # the reference reader agrees
        np.testing.assert_array_equal(v, arrays[k])
    other = tmp_path / "ref.safetensors"
    st.save_file({"a": arrays["f32"], "b": arrays["i64"]}, str(other))
    np.testing.assert_array_equal(read_checkpoint(other)["a"], arrays["f32"])


def test_corrupt_safetensors_raise_weights_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(WeightsError, match="header length"):
        read_safetensors(bad)
    good = tmp_path / "t.safetensors"
    write_safetensors(good, {"a": np.zeros((64,), "float32")})
    (tmp_path / "trunc.safetensors").write_bytes(good.read_bytes()[:-16])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_safetensors(tmp_path / "trunc.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.bin")


# ------------------------------------------------------------------------------------------
# torch.save files, read in a process where torch cannot be imported
# ------------------------------------------------------------------------------------------
_TORCH_FREE = textwrap.dedent("""
    import sys

    class _Block:  # any "import torch" now fails (safetensors is a dependency, its numpy API is used)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
    import json, numpy as np
    from pathlib import Path
    import histokd
    from histokd.backbones.convert import read_checkpoint, read_torch_state_dict
    from histokd.backbones.vit import ViTBackbone
    d = Path(sys.argv[1])
    out = {}
    for name in ("zip", "legacy", "nested"):
        sd = read_torch_state_dict(d / f"{name}.pt")
        out.update({f"{name}/{k}": v for k, v in sd.items()})
    out.update({f"bf16st/{k}": v for k, v in read_checkpoint(d / "bf16.safetensors").items()})
    kw = json.loads((d / "vit_kw.json").read_text())
    x = np.load(d / "x.npy")
    for folder in ("hf_bin", "hf_st"):
        enc = ViTBackbone(**kw)
        from histokd.backbones.convert import load_pretrained
        load_pretrained(enc, d / folder)
        out[f"{folder}/pooled"] = np.asarray(enc(x.transpose(0, 2, 3, 1)))
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
    np.savez(d / "result.npz", **out)
""")


@pytest.mark.slow  # spawns a second Python process (TensorFlow import)
def test_torch_checkpoints_load_without_torch(tmp_path, torch, hf_vit):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    shared = torch.arange(20, dtype=torch.float32)
    sd = {
        "w": base,
        "w_t": base.t(),                        # non-contiguous view
        "part": shared[5:11].view(2, 3),        # offset into a shared storage
        "whole": shared,
        "bf16": torch.randn(4, 3, generator=g).to(torch.bfloat16),
        "half": torch.randn(3, generator=g).half(),
        "long": torch.tensor([1, -5, 7]),
        "mask": torch.tensor([True, False, True]),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": sd, "epoch": 3, "best": np.float64(0.5), "opts": {"lr": 1e-3}}, tmp_path / "nested.pt")
    from safetensors.torch import load_file, save_file

    save_file({"bf16": sd["bf16"].contiguous()}, str(tmp_path / "bf16.safetensors"))
    hf_vit.save_pretrained(tmp_path / "hf_st")
    # a Hub-style pytorch_model.bin: the checkpoint names of save_pretrained, in torch.save format
    (tmp_path / "hf_bin").mkdir()
    torch.save(load_file(str(tmp_path / "hf_st" / "model.safetensors")), tmp_path / "hf_bin" / "pytorch_model.bin")
    x = _x((32, 32))
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "vit_kw.json").write_text(json.dumps(VIT_KW))
    script = tmp_path / "torch_free.py"
    script.write_text(_TORCH_FREE)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = np.load(tmp_path / "result.npz")
    expect = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy() for k, v in sd.items()}
    for fmt in ("zip", "legacy", "nested"):
        for k, v in expect.items():
            got = res[f"{fmt}/{k}"]
            assert got.shape == v.shape, (fmt, k)
            np.testing.assert_array_equal(got, v, err_msg=f"{fmt}/{k}")
    assert res["zip/half"].dtype == np.float16 and res["zip/long"].dtype == np.int64
    np.testing.assert_array_equal(res["bf16st/bf16"], expect["bf16"])
    ref = _vit_ref(torch, hf_vit, x)
    for folder in ("hf_bin", "hf_st"):
        assert _rel_err(res[f"{folder}/pooled"], ref) <= 1e-4, folder


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
    with pytest.raises(WeightsError, match="not a state_dict"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_pickled_module_gives_clear_error(tmp_path, torch):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(WeightsError, match="state_dict"):
        read_torch_state_dict(tmp_path / "module.pt")


# ------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------
def _timm_from_hf_vit(hf_state, layer_scale=None):
    """timm VisionTransformer names for the HF weights (independent hand mapping, torch layout)."""
    sd = {
        "cls_token": hf_state["embeddings.cls_token"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["layernorm.weight"], "norm.bias": hf_state["layernorm.bias"],
        "head.weight": np.zeros((10, 48), "float32"), "head.bias": np.zeros(10, "float32"),
    }
    for i in range(2):
        h, t = f"layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            sd[t + f"attn.qkv.{part}"] = np.concatenate(
                [hf_state[h + f"attention.{p}_proj.{part}"] for p in "qkv"], axis=0)
            sd[t + f"attn.proj.{part}"] = hf_state[h + f"attention.o_proj.{part}"]
            sd[t + f"norm1.{part}"] = hf_state[h + f"layernorm_before.{part}"]
            sd[t + f"norm2.{part}"] = hf_state[h + f"layernorm_after.{part}"]
            sd[t + f"mlp.fc1.{part}"] = hf_state[h + f"mlp.fc1.{part}"]
            sd[t + f"mlp.fc2.{part}"] = hf_state[h + f"mlp.fc2.{part}"]
        if layer_scale is not None:
            sd[t + "ls1.gamma"] = np.full(48, layer_scale, "float32")
            sd[t + "ls2.gamma"] = np.full(48, layer_scale, "float32")
    return sd


def test_timm_vit_layout_with_layerscale_and_resized_positions(tmp_path, torch, hf_vit):
    hf_state = _np_state(hf_vit)
    # UNI-style: LayerScale present (set to 1 so the reference without LayerScale applies)
    timm_sd = {f"module.{k}": v for k, v in _timm_from_hf_vit(hf_state, layer_scale=1.0).items()}
    assert detect_layout(timm_sd) == "timm_vit"
    path = tmp_path / "timm_vit.safetensors"
    write_safetensors(path, timm_sd)
    enc = ViTBackbone(**VIT_KW, layer_scale_init=1e-5)
    report = load_pretrained(enc, path)
    assert report["layout"] == "timm_vit" and "module.head.weight" in report["ignored"]
    np.testing.assert_array_equal(ops.convert_to_numpy(enc.get_layer("block_2").ls2.gamma), np.ones(48))
    x = _x((32, 32))
    assert _rel_err(enc(x.transpose(0, 2, 3, 1)), _vit_ref(torch, hf_vit, x)) <= 1e-4
    # a model for 48-px images gets the 4×4 position table resized to 6×6 at load time
    big = ViTBackbone(**{**VIT_KW, "input_size": 48}, layer_scale_init=1e-5)
    assert load_pretrained(big, path)["resized_pos_embed"]
    x48 = _x((48, 48), seed=3)
    assert _rel_err(big(x48.transpose(0, 2, 3, 1)), _vit_ref(torch, hf_vit, x48)) <= 1e-4


def _ms_from_hf_swin(hf_state, timm_style=False):
    """Official Swin V2 names (or timm's, with merges at the start of the next stage)."""
    sd = {
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "patch_embed.norm.weight": hf_state["embeddings.norm.weight"],
        "patch_embed.norm.bias": hf_state["embeddings.norm.bias"],
        "norm.weight": hf_state["layernorm.weight"], "norm.bias": hf_state["layernorm.bias"],
        "head.fc.weight": np.zeros((5, 64), "float32"),
    }
    for s in range(3):
        for b in range(2):
            h, t = f"encoder.layers.{s}.blocks.{b}.", f"layers.{s}.blocks.{b}."
            a = h + "attention.self."
            sd[t + "attn.qkv.weight"] = np.concatenate([hf_state[a + f"{p}.weight"] for p in ("query", "key", "value")])
            sd[t + "attn.q_bias"] = hf_state[a + "query.bias"]
            sd[t + "attn.v_bias"] = hf_state[a + "value.bias"]
            sd[t + "attn.logit_scale"] = hf_state[a + "logit_scale"]
            sd[t + "attn.cpb_mlp.0.weight"] = hf_state[a + "continuous_position_bias_mlp.0.weight"]
            sd[t + "attn.cpb_mlp.0.bias"] = hf_state[a + "continuous_position_bias_mlp.0.bias"]
            sd[t + "attn.cpb_mlp.2.weight"] = hf_state[a + "continuous_position_bias_mlp.2.weight"]
            sd[t + "attn.relative_position_index"] = np.zeros((16, 16), "int64")
            for part in ("weight", "bias"):
                sd[t + f"attn.proj.{part}"] = hf_state[h + f"attention.output.dense.{part}"]
                sd[t + f"norm1.{part}"] = hf_state[h + f"layernorm_before.{part}"]
                sd[t + f"norm2.{part}"] = hf_state[h + f"layernorm_after.{part}"]
                sd[t + f"mlp.fc1.{part}"] = hf_state[h + f"intermediate.dense.{part}"]
                sd[t + f"mlp.fc2.{part}"] = hf_state[h + f"output.dense.{part}"]
        if s < 2:
            d = f"layers.{s + 1 if timm_style else s}.downsample."
            sd[d + "reduction.weight"] = hf_state[f"encoder.layers.{s}.downsample.reduction.weight"]
            sd[d + "norm.weight"] = hf_state[f"encoder.layers.{s}.downsample.norm.weight"]
            sd[d + "norm.bias"] = hf_state[f"encoder.layers.{s}.downsample.norm.bias"]
    return sd


def test_swinv2_hf_official_and_timm_layouts_agree(tmp_path, torch, hf_swin):
    hf_state = _np_state(hf_swin)
    x = _x((64, 64))
    with torch.no_grad():
        ref = hf_swin(torch.from_numpy(x)).pooler_output.numpy()
    hf_file = tmp_path / "hf_swin"
    hf_swin.save_pretrained(hf_file)  # checkpoint names of the Hub
    sources = {"hf_swinv2": hf_file, "ms_swinv2": _ms_from_hf_swin(hf_state),
               "timm_swinv2": _ms_from_hf_swin(hf_state, timm_style=True)}
    for layout, src in sources.items():
        enc = SwinV2Backbone(**SWIN_KW)
        assert load_pretrained(enc, src)["layout"] == layout
        assert _rel_err(enc(x.transpose(0, 2, 3, 1)), ref) <= 1e-4, layout
    # the folder's config.json says window 4: a window-8 model is told to set pretrained_window_size
    with pytest.warns(UserWarning, match="pretrained_window_size=4"):
        load_pretrained(SwinV2Backbone(**{**SWIN_KW, "window_size": 8}), hf_file)


def test_registry_factory_accepts_checkpoint_paths(tmp_path, hf_vit):
    hf_vit.save_pretrained(tmp_path / "hf")
    enc = vit_tiny(weights=tmp_path / "hf", **{k: v for k, v in VIT_KW.items() if k != "input_size"},
                   input_size=32)
    np.testing.assert_allclose(ops.convert_to_numpy(enc.get_layer("embed").cls_token),
                               hf_vit.embeddings.cls_token.detach().numpy(), atol=0)
    keras_file = tmp_path / "enc.weights.h5"
    enc.save_weights(keras_file)
    again = vit_tiny(weights=keras_file, **{k: v for k, v in VIT_KW.items() if k != "input_size"}, input_size=32)
    np.testing.assert_array_equal(ops.convert_to_numpy(again.get_layer("norm").gamma),
                                  ops.convert_to_numpy(enc.get_layer("norm").gamma))
    with pytest.raises(WeightsError, match="no Keras ImageNet weights"):
        vit_tiny(weights="imagenet", input_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)


# ------------------------------------------------------------------------------------------
# checkpoints that do not fit
# ------------------------------------------------------------------------------------------
def test_mismatches_name_the_first_bad_key(hf_vit, hf_swin):
    state = _np_state(hf_vit)
    missing = {k: v for k, v in state.items() if k != "layers.1.mlp.fc2.weight"}
    with pytest.raises(WeightsError, match=r"blocks\.1\.mlp\.fc2\.kernel.*\(96, 48\)"):
        load_pretrained(ViTBackbone(**VIT_KW), missing)
    with pytest.raises(WeightsError, match=r"layers\.0\.mlp\.fc1\.weight.*\(48, 96\).*\(48, 192\)"):
        load_pretrained(ViTBackbone(**{**VIT_KW, "mlp_ratio": 4}), state)
    with pytest.raises(WeightsError, match="no place for"):
        load_pretrained(ViTBackbone(**{**VIT_KW, "depth": 1}), state)
    with pytest.warns(UserWarning, match="ignoring"):
        load_pretrained(ViTBackbone(**{**VIT_KW, "depth": 1}), state, strict=False)
    with pytest.raises(WeightsError, match="hf_swinv2 checkpoint but the model is a ViTBackbone"):
        load_pretrained(ViTBackbone(**VIT_KW), _np_state(hf_swin))
    with pytest.raises(WeightsError, match="cannot tell which layout"):
        load_pretrained(ViTBackbone(**VIT_KW), {"foo.weight": np.zeros(3, "float32")})
    with pytest.raises(WeightsError, match="unknown checkpoint layout"):
        convert_state_dict(state, "keras_vit")
    with pytest.raises(WeightsError, match="lacks the weight"):
        load_pretrained(SwinV2Backbone(**{**SWIN_KW, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
                                          "input_size": 128}), _np_state(hf_swin))
