"""HoVer-Net losses (spec §1.3) and a training step of the Keras model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import keras
import tensorflow as tf

from histokd.errors import ConfigError
from histokd.losses.hovernet import (HoVerNetLoss, dice_loss, hovernet_loss_terms, msge_loss,
                                     sobel_kernels, xentropy_loss)
from histokd.nuclei.targets import make_targets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import assert_config_roundtrip, assert_trains_only_trainable  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nuclei_helpers import touching_discs  # noqa: E402


def test_known_values():
    assert float(xentropy_loss(np.eye(2)[None], np.full((1, 2, 2), 0.5, "float32"))) == pytest.approx(np.log(2))
    p = np.array([[0.0, 1.0]], "float32")  # clamped at 1e-7 → −log(1e-7)
    assert float(xentropy_loss(np.array([[1.0, 0.0]]), p)) == pytest.approx(-np.log(1e-7), rel=1e-4)
    t = np.zeros((1, 2, 2, 2), "float32")
    t[..., 0] = 1
    assert float(dice_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
    # class 1 absent from both: (0 + 1e-3) / (0 + 1e-3) → 0; class 0 half-predicted
    half = np.full_like(t, 0.5)
    want = (1 - (2 * 2 + 1e-3) / (2 + 4 + 1e-3)) + (1 - 1e-3 / (2 + 1e-3))
    assert float(dice_loss(t, half)) == pytest.approx(want, rel=1e-5)
    assert sobel_kernels()["dy"][:, 2].tolist() == [-0.5, -1.0, 0.0, 1.0, 0.5]


def test_msge_gradient_axes():
    yy, xx = np.mgrid[:16, :16].astype("float32")
    true = np.zeros((1, 16, 16, 2), "float32")
    pred = true.copy()
    pred[..., 0] = xx / 8.0           # horizontal map changes along x only
    pred[..., 1] = yy / 8.0           # vertical map changes along y only
    focus = np.zeros((1, 16, 16), "float32")
    focus[:, 4:12, 4:12] = 1          # away from the zero-padded border
    paper = float(msge_loss(true, pred, focus, axes="paper"))
    official = float(msge_loss(true, pred, focus, axes="official"))
    assert official == pytest.approx(0.0, abs=1e-10)   # releases differentiate across the ramp
    k = sobel_kernels()["dx"]
    slope = float(np.sum(k * np.arange(-2, 3)[None, :])) / 8.0
    assert paper == pytest.approx(slope ** 2, rel=1e-5)
    with pytest.raises(ConfigError, match="msge_axes"):
        msge_loss(true, pred, focus, axes="xy")


def test_official_msge_matches_torch_meshgrid_definition():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    true = rng.standard_normal((2, 12, 12, 2)).astype("float32")
    pred = rng.standard_normal((2, 12, 12, 2)).astype("float32")
    focus = (rng.random((2, 12, 12)) > 0.5).astype("float32")
    r = torch.arange(-2, 3, dtype=torch.float32)
    h, v = torch.meshgrid(r, r, indexing="ij")       # as in hover_net's msge_loss
    kh, kv = (h / (h * h + v * v + 1e-15)).view(1, 1, 5, 5), (v / (h * h + v * v + 1e-15)).view(1, 1, 5, 5)

    def grad(x):
        x = torch.from_numpy(x)
        return torch.cat([F.conv2d(x[..., 0][:, None], kh, padding=2),
                          F.conv2d(x[..., 1][:, None], kv, padding=2)], 1).permute(0, 2, 3, 1)

    f = torch.from_numpy(focus)[..., None].repeat(1, 1, 1, 2)
    ref = float((f * (grad(pred) - grad(true)) ** 2).sum() / (f.sum() + 1e-8))
    assert float(msge_loss(true, pred, focus, axes="official")) == pytest.approx(ref, rel=1e-5)
    assert float(msge_loss(true, pred, focus, axes="paper")) != pytest.approx(ref, rel=1e-3)


def _targets(n_types=3):
    inst = touching_discs(size=96)
    types = np.where(inst > 0, inst % (n_types - 1) + 1, 0)
    t = make_targets(inst, types)
    return {k: v[None] for k, v in t.items()}


def test_terms_total_and_decrease():
    t = _targets()
    rng = np.random.default_rng(0)
    logits = {k: tf.Variable(rng.standard_normal((1, 96, 96, c)).astype("float32") * 0.1)
              for k, c in (("np", 2), ("hv", 2), ("tp", 3))}
    terms = hovernet_loss_terms(t, logits, weights={"hv_mse": 2.0})
    assert set(terms) == {"loss", "np_ce", "np_dice", "hv_mse", "hv_msge", "tp_ce", "tp_dice"}
    total = sum(float(v) for k, v in terms.items() if k != "loss") + float(terms["hv_mse"])
    assert float(terms["loss"]) == pytest.approx(total, rel=1e-5)
    opt = keras.optimizers.Adam(0.05)
    first = None
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = HoVerNetLoss()(t, logits)
        first = float(loss) if first is None else first
        grads = tape.gradient(loss, list(logits.values()))
        assert all(g is not None for g in grads)
        opt.apply(grads, list(logits.values()))
    assert float(HoVerNetLoss()(t, logits)) < 0.8 * first
    with pytest.raises(ConfigError, match="unknown HoVer-Net loss weight"):
        hovernet_loss_terms(t, logits, weights={"bce": 1.0})
    with pytest.raises(ConfigError, match="does not match the output"):
        hovernet_loss_terms({k: v[:, :90] for k, v in t.items()}, logits)
    with pytest.raises(ConfigError, match="no 'tp' map"):
        hovernet_loss_terms({k: v for k, v in t.items() if k != "tp"}, logits)


def test_loss_config_roundtrip():
    clone = assert_config_roundtrip(HoVerNetLoss(weights={"hv_mse": 2.0}, msge_axes="official"))
    assert clone.msge_axes == "official" and clone.weights == {"hv_mse": 2.0}
    with pytest.raises(ConfigError, match="msge_axes"):
        HoVerNetLoss(msge_axes="x")


@pytest.mark.slow
def test_hovernet_training_step_updates_only_trainable():
    from histokd.nuclei import HoVerNet

    model = HoVerNet("fast", 3, input_size=104)
    inst = touching_discs(size=104)
    t = make_targets(inst, np.where(inst > 0, 1 + inst % 2, 0), crop=model.output_size)
    targets = {k: v[None] for k, v in t.items()}
    x = np.random.default_rng(0).integers(0, 256, (1, 104, 104, 3)).astype("uint8")
    assert_trains_only_trainable(model, x, targets, loss_fn=HoVerNetLoss(), lr=1e-3)


def _write_pairs(folder, n=2, size=120, with_types=True):
    import cv2

    from histokd.nuclei.synthetic import synthetic_he_tile

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, inst = synthetic_he_tile(i, size=size, n_nuclei=8)
        cv2.imwrite(str(folder / f"s{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        np.save(folder / f"s{i}_inst.npy", inst)
        if with_types:
            np.save(folder / f"s{i}_type.npy", np.where(inst > 0, 1 + inst % 2, 0))


def test_training_dataset_windows_targets_and_flips(tmp_path):
    from histokd.errors import DataError
    from histokd.nuclei.training import hovernet_dataset, load_training_pairs

    _write_pairs(tmp_path / "pairs")
    samples = load_training_pairs(tmp_path / "pairs")
    assert len(samples) == 2 and samples[0][2] is not None
    ds = hovernet_dataset(samples, 104, 12, num_types=3, batch_size=2, seed=1)
    x, t = next(iter(ds))
    assert x.shape == (2, 104, 104, 3) and x.dtype == tf.uint8
    assert t["np"].shape == (2, 12, 12) and t["hv"].shape == (2, 12, 12, 2) and t["tp"].shape == (2, 12, 12)
    # un-augmented centre window: targets are the centre crop of the full-image targets
    ds0 = hovernet_dataset(samples[:1], 104, 12, num_types=3, batch_size=1, shuffle=False,
                           augment=False, repeat=False)
    x0, t0 = next(iter(ds0))
    full = make_targets(samples[0][1], samples[0][2])
    np.testing.assert_array_equal(np.asarray(x0[0]), samples[0][0][8:112, 8:112])
    np.testing.assert_allclose(np.asarray(t0["hv"][0]), full["hv"][54:66, 54:66])
    # a left-right flip negates the horizontal map and keeps it consistent with the flipped instances
    flipped = make_targets(samples[0][1][:, ::-1].copy())
    np.testing.assert_allclose(flipped["hv"][..., 0], -full["hv"][:, ::-1, 0], atol=1e-6)
    with pytest.raises(DataError, match="type map"):
        hovernet_dataset([(samples[0][0], samples[0][1], None)], 104, 12, num_types=3)
    with pytest.raises(DataError, match="no instance map"):
        (tmp_path / "pairs" / "s0_inst.npy").unlink()
        load_training_pairs(tmp_path / "pairs")


@pytest.mark.slow
def test_fine_tune_frozen_phase_trains_decoders_only(tmp_path):
    from histokd.nuclei.training import fine_tune_hovernet

    _write_pairs(tmp_path / "pairs", with_types=False)
    seen = {}
    import histokd.nuclei.hovernet as hn

    orig_init = hn.HoVerNet.__init__

    def spy(self, *a, **k):  # keep a handle on the model built inside fine_tune_hovernet
        orig_init(self, *a, **k)
        seen["model"] = self
        seen["before"] = {w.path: np.asarray(w).copy() for w in self.weights}

    hn.HoVerNet.__init__ = spy
    try:
        model, hist = fine_tune_hovernet(tmp_path / "pairs", tmp_path / "run", mode="fast", num_types=0,
                                         frozen_epochs=1, epochs=0, steps_per_epoch=1, batch_size=1,
                                         input_size=104, verbose=0)
    finally:
        hn.HoVerNet.__init__ = orig_init
    assert model is seen["model"]
    assert np.isfinite(hist["frozen_loss"][0]) and "full_loss" not in hist
    before = seen["before"]
    moved = {w.path for w in model.weights if not np.array_equal(before[w.path], np.asarray(w))}
    encoder = {w.path for l in model.encoder_layers() for w in l.weights}
    assert moved and not (moved & encoder), sorted(moved & encoder)[:5]
    assert any("decoder_np_u0_conv" in p for p in moved) and any("conv0_conv" in p for p in moved)
    assert (tmp_path / "run" / "hovernet.keras").exists() and (tmp_path / "run" / "history.json").exists()
    assert all(l.trainable for l in model.encoder_layers())
