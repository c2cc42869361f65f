"""`histokd analyze cka|gradcam` back ends on one tiny run directory (shared by the module)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import histokd  # noqa: F401
from histokd.analysis import cli_support
from histokd.cli import main
from histokd.config import load_config
from histokd.errors import ConfigError, DataError

SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory laid out exactly as ``histokd train`` writes it (config.yaml, export/
    with encoders, uint8 classifiers and metadata.json) from an untrained asymmetric VICReg
    model: CKA and GradCAM need the files, not trained weights, and this skips the training
    and evaluation of a real run (the notebooks' smoke runs cover that path end to end)."""
    import keras

    from histokd.export import export_run
    from histokd.layers.heads import LinearHead
    from histokd.data.datasets import branch_input_kinds, build_data
    from histokd.train import build_method, prepare_run_dir

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("default", [
        "name=asym", f"output_dir={out}", f"data.image_size={SIZE}", "data.synthetic_per_class=16",
        "data.synthetic_classes=3", "views.downsample=8",
        "model.backbone_kwargs={width: 0.25, small_input: true}", "model.expander_dims=[32,32,32]"])
    run_dir = prepare_run_dir(cfg)
    source = build_data(cfg)
    model = build_method(cfg, num_classes=len(source.class_names))
    heads = {}
    for branch, kind in branch_input_kinds(cfg).items():
        enc = model.branch_encoders()[branch]
        inp = keras.Input((enc.output_shape[-1],))
        heads[branch] = {"head": keras.Model(inp, LinearHead(3)(inp)), "kind": kind, "encoder": enc}
    export_run(cfg, model, heads, source, run_dir)
    return run_dir


def _png_ok(path):
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(img[..., :3].std()) > 0.01  # not blank


def test_cka_runs_compares_the_branches_of_one_run(run_dir, tmp_path):
    files = cli_support.cka_runs([run_dir], out_dir=tmp_path / "cka", layers=r"_out$", max_batches=2,
                                 batch_size=16, progress=False)
    assert sorted(map(str, (tmp_path / "cka").iterdir())) == sorted(files)
    csv = [f for f in files if f.endswith(".csv")]
    assert [p.rsplit("/", 1)[1] for p in csv] == ["asym_a__asym_b.csv"]
    df = pd.read_csv(csv[0], index_col=0)
    assert df.shape == (8, 8)  # ResNet-18's eight block outputs on each side
    assert list(df.index) == list(df.columns)
    v = df.to_numpy()
    # the unbiased HSIC estimator may dip slightly below 0 on a few small batches
    assert np.isfinite(v).all() and (v > -0.2).all() and (v < 1 + 1e-6).all()
    assert df.index.name == "asym_a (8 px)"
    _png_ok([f for f in files if f.endswith(".png")][0])
    info = json.loads((tmp_path / "cka" / "cka_runs.json").read_text())
    assert info["split"] == "test" and len(info["pairs"]) == 1
    pair = info["pairs"][0]  # each branch read its own input
    assert (pair["a"], pair["a_input"], pair["b"], pair["b_input"]) == ("asym_a", "8 px", "asym_b", "full")


def test_cka_between_a_run_and_its_copy_is_one_on_the_diagonal(run_dir, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)
    files = cli_support.cka_runs([run_dir, twin], out_dir=tmp_path / "cka", layers=r"_out$", max_batches=2,
                                 branches=["a"], batch_size=16, progress=False)
    csv = [f for f in files if f.endswith(".csv")]
    assert len(csv) == 1 and csv[0].endswith("asym_a__twin_a.csv")
    df = pd.read_csv(csv[0], index_col=0)
    np.testing.assert_allclose(np.diag(df.to_numpy()), 1.0, atol=1e-6)
    assert (df.to_numpy() <= 1 + 1e-6).all()


def test_cka_runs_on_other_data_and_errors(run_dir, tmp_path):
    files = cli_support.cka_runs([run_dir], data="synthetic", out_dir=tmp_path / "c", layers=["conv1_conv"],
                                 max_batches=1, progress=False)
    df = pd.read_csv([f for f in files if f.endswith(".csv")][0], index_col=0)
    assert df.shape == (1, 1) and -0.2 <= df.iloc[0, 0] <= 1.0 + 1e-6
    with pytest.raises(DataError, match="config.yaml"):
        cli_support.cka_runs([tmp_path], out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="nothing to compare"):
        cli_support.cka_runs([run_dir], branches=["a"], out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="no layer"):
        cli_support.cka_runs([run_dir], layers=["no_such_layer"], out_dir=tmp_path / "x", progress=False)


def test_cli_analyze_cka(run_dir, tmp_path, capsys):
    assert main(["--quiet", "analyze", "cka", str(run_dir), "--out", str(tmp_path / "o"),
                 "--layers", "block2_out$", "--max-batches", "1"]) == 0
    assert (tmp_path / "o" / "asym_a__asym_b.csv").exists()
    assert main(["analyze", "cka", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "config.yaml" in capsys.readouterr().err


def _write_tiles(tmp_path, n=3, size=SIZE):
    import cv2

    from histokd.data.synthetic import make_synthetic_he

    x, _, _ = make_synthetic_he(1, size, seed=3, num_classes=n)
    d = tmp_path / "tiles"
    d.mkdir()
    for i, img in enumerate(x):
        cv2.imwrite(str(d / f"tile{i}.png"), img[..., ::-1])
    return d, x


@pytest.mark.slow
def test_gradcam_images_from_files(run_dir, tmp_path):
    import keras

    tiles, _ = _write_tiles(tmp_path, size=48)  # other size: resized to the model's 32 px
    out = cli_support.gradcam_images(run_dir / "export" / "classifier_a.keras", [tiles],
                                     ["conv1_conv", "conv5_block2_2_conv"], tmp_path / "g" / "gc.png")
    assert out == str(tmp_path / "g" / "gc.png")
    _png_ok(out)
    # GradCAM feeds a uint8-input classifier raw 0..255 values: the same predictions as uint8
    from histokd.analysis.gradcam import _model_images
    from histokd.backbones import make_backbone
    from histokd.export import build_classifier

    enc = make_backbone("resnet18", SIZE, width=0.25, small_input=True)
    inp = keras.Input((enc.output_shape[-1],))
    clf = build_classifier(enc, keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp)), SIZE, 8)
    imgs, files = cli_support.read_images([tiles], SIZE)
    assert imgs.shape == (3, SIZE, SIZE, 3) and imgs.dtype == np.uint8 and len(files) == 3
    fed = _model_images(clf, imgs)
    assert fed.dtype == np.float32 and fed.max() > 1.0
    np.testing.assert_allclose(clf(fed).numpy(), clf.predict(imgs, verbose=0), atol=1e-5)
    assert _model_images(enc, imgs).max() <= 1.0  # float models get [0, 1] images
    # default layer (the last convolution), an export folder, and the CLI
    _png_ok(cli_support.gradcam_images(run_dir / "export", [tiles / "tile0.png"], None, tmp_path / "d.png"))
    assert main(["analyze", "gradcam", str(run_dir / "export" / "classifier_b.keras"), str(tiles),
                 "--layer", "conv1_conv", "--out", str(tmp_path / "cli.png")]) == 0
    _png_ok(tmp_path / "cli.png")
    with pytest.raises(DataError, match="does not exist"):
        cli_support.gradcam_images(run_dir / "export", [tmp_path / "nope.png"], None, tmp_path / "e.png")
    with pytest.raises(ConfigError, match="no layer"):
        cli_support.gradcam_images(run_dir / "export", [tiles], ["nope"], tmp_path / "e.png")
