"""Backbone families as plugins: preset factory, tiny kwargs, spatial rank, checkpoint-layout registry."""

from __future__ import annotations

import ast
import inspect
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import histokd  # noqa: F401
from histokd.backbones import (
    CHECKPOINT_LAYOUTS,
    HF_MODEL_TYPES,
    Backbone,
    make_backbone,
    register_presets,
    tiny_kwargs,
)
from histokd.backbones.base import parse_input_size, spatial_size
from histokd.backbones.convert import LAYOUTS, convert_state_dict, detect_layout
from histokd.backbones.layouts import CheckpointLayout, register_layout
from histokd.backbones.vit import ViTBackbone, vit_base
from histokd.errors import ConfigError, RegistryError
from histokd.registry import BACKBONES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import run_backbone_test  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_every_registered_backbone_has_fast_tiny_kwargs():
    slow = {}
    for name in BACKBONES.names():
        kw = tiny_kwargs(name)
        size = kw.pop("input_size")
        start = time.perf_counter()
        model = make_backbone(name, size, **kw)
        took = time.perf_counter() - start
        assert isinstance(model, Backbone) and model.spatial_rank == 2
        if took > 10.0:  # ~1-3 s on an idle 2-core CPU; generous for a shared machine
            slow[name] = round(took, 1)
    assert not slow, f"tiny kwargs build too slowly: {slow}"


def test_tiny_kwargs_errors_and_copies():
    with pytest.raises(RegistryError, match="resnet18"):
        tiny_kwargs("resnet_nope")
    kw = tiny_kwargs("swinv2_tiny")
    kw["depths"].append(9)
    assert tiny_kwargs("swinv2_tiny")["depths"] == [1, 1, 1, 1]
    BACKBONES.register("no_tiny_test", lambda input_size=32, weights=None: None)
    try:
        with pytest.raises(ConfigError, match="register_tiny_kwargs"):
            tiny_kwargs("no_tiny_test")
    finally:
        BACKBONES.unregister("no_tiny_test")


@pytest.mark.parametrize("name", ["vit_small", "swinv2_base", "resnet18"])
def test_harness_runs_on_registered_backbones(name, tmp_path):
    run_backbone_test(name, tmp_path=tmp_path)


def test_harness_accepts_explicit_kwargs_and_size(tmp_path):
    model = run_backbone_test("vit_tiny", dict(patch_size=8, embed_dim=16, depth=1, num_heads=2), (32, 48),
                              tmp_path=tmp_path)
    assert model.input_size == (32, 48)


def test_preset_factories_keep_their_signatures_and_document_args():
    for name, size in (("vit_tiny", 224), ("vit_large", 224), ("swinv2_tiny", 256), ("swinv2_base", 256)):
        factory = BACKBONES.get(name)
        params = inspect.signature(factory).parameters
        assert list(params) == ["input_size", "weights", "kwargs"], name
        assert params["input_size"].default == size and params["weights"].default is None
        assert factory.__name__ == name
        doc = factory.__doc__
        assert doc.splitlines()[0].endswith(").") and "Args:" in doc and "Example:" in doc, doc
    assert "width 768, depth 12, 12 heads" in vit_base.__doc__
    assert "hf_vit" in vit_base.__doc__ and "timm_vit" in vit_base.__doc__


def test_register_presets_for_a_new_family():
    made = register_presets(ViTBackbone, {"vit_test_micro": dict(embed_dim=16, depth=1, num_heads=2)},
                            default_size=32, base=dict(patch_size=8), summary="Micro ViT {key!r} ({embed_dim}).",
                            tiny=dict(input_size=16))
    try:
        enc = make_backbone("vit_test_micro", 16)
        assert enc.embed_dim == 16 and enc.patch_size == 8 and enc.arch == "vit_test_micro"
        assert made["vit_test_micro"].__doc__.startswith("Micro ViT 'vit_test_micro' (16).")
        assert tiny_kwargs("vit_test_micro") == {"input_size": 16}
        with pytest.raises(ConfigError, match="unknown option"):
            make_backbone("vit_test_micro", 16, depthh=2)
    finally:
        BACKBONES.unregister("vit_test_micro")


# ----------------------------------------------------------------------------- spatial rank
def test_spatial_size_accepts_ints_pairs_and_reserves_triples_for_3d():
    assert spatial_size(64) == (64, 64)
    assert spatial_size((32, 48)) == (32, 48)
    assert spatial_size((32, 48, 3)) == (32, 48)  # Keras-style (H, W, channels)
    assert spatial_size(16, rank=3) == (16, 16, 16)
    assert spatial_size((8, 16, 32), rank=3) == (8, 16, 32)
    with pytest.raises(ConfigError, match="3-D size"):
        spatial_size((8, 16, 32))
    with pytest.raises(ConfigError, match=r"\(depth, height, width\)"):
        spatial_size((8, 16), rank=3)
    with pytest.raises(ConfigError, match="input_size"):
        spatial_size(True)
    assert parse_input_size(None, "x", 32, rank=3) == (None, None, None)
    with pytest.raises(ConfigError, match="at least 32x32"):
        parse_input_size((64, 16), "x", 32)


def test_backbones_report_rank_two_and_their_input_size():
    enc = make_backbone("vit_tiny", (32, 48), patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert Backbone.spatial_rank == 2 and enc.spatial_rank == 2
    assert enc.input_size == (32, 48)
    small = make_backbone("resnet18", 40, **{k: v for k, v in tiny_kwargs("resnet18").items() if k != "input_size"})
    assert small.input_size == (40, 40)


# ----------------------------------------------------------------------------- layouts
def test_each_family_registers_its_layouts():
    assert {("vit", "hf_vit"), ("vit", "timm_vit"), ("swinv2", "hf_swinv2"), ("swinv2", "ms_swinv2"),
            ("swinv2", "timm_swinv2")} <= set(CHECKPOINT_LAYOUTS)
    assert {"vit", "swinv2"} <= set(HF_MODEL_TYPES)
    assert sorted(LAYOUTS) == sorted(name for _f, name in CHECKPOINT_LAYOUTS)
    assert LAYOUTS["hf_vit"][0] == "vit"


def test_a_new_layout_joins_without_editing_convert():
    layout = CheckpointLayout(
        family="vit", name="toy_vit", anchor="toy.cls",
        rules=[(r"toy\.cls", "cls_token", "copy"), (r"toy\.lin\.weight", "blocks.0.mlp.fc1.kernel", "linear")],
        detect=lambda keys: any(k.endswith("toy.cls") for k in keys), priority=99)
    register_layout(layout)
    try:
        sd = {"model.toy.cls": np.ones((1, 1, 4), "float32"), "model.toy.lin.weight": np.zeros((3, 4), "float32")}
        assert detect_layout(sd) == "toy_vit"
        out, origin, _ignored, unexpected = convert_state_dict(sd)
        assert out["blocks.0.mlp.fc1.kernel"].shape == (4, 3) and origin["cls_token"] == "model.toy.cls"
        assert not unexpected
    finally:
        CHECKPOINT_LAYOUTS.pop(("vit", "toy_vit"))
    with pytest.raises(ConfigError, match="registered twice"):
        register_layout(CheckpointLayout(family="swinv2", name="hf_vit", rules=[], anchor="x",
                                         detect=lambda keys: False))
    with pytest.raises(ConfigError, match="unknown transform"):
        CheckpointLayout(family="vit", name="bad", rules=[("a", "b", "flip")], anchor="a", detect=bool)


def _imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "histokd":
                names.update(f"histokd.{a.name}" for a in node.names)
    return names


def test_generic_modules_import_no_family_and_io_stands_alone():
    families = {"histokd.backbones.vit", "histokd.backbones.swin_v2", "histokd.backbones.resnet"}
    for mod in ("convert", "layouts", "pretrained", "base"):
        found = _imports(REPO / "histokd" / "backbones" / f"{mod}.py") & families
        assert not found, f"backbones/{mod}.py imports families {found}"
    forbidden = ("histokd.methods", "histokd.train", "histokd.evaluation", "histokd.tasks", "histokd.cli",
                 "histokd.nuclei")
    for path in list((REPO / "histokd" / "backbones").glob("*.py")) + list((REPO / "histokd" / "io").glob("*.py")):
        for name in _imports(path):
            assert name != "histokd" and not name.startswith(forbidden), f"{path.name} imports {name}"
    for path in (REPO / "histokd" / "io").glob("*.py"):
        for name in _imports(path):
            if name.startswith("histokd"):
                assert name == "histokd.errors" or name.startswith("histokd.io"), f"io/{path.name} imports {name}"
