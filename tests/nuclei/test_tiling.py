"""Tiled HoVer-Net inference (spec §1.6): geometry, seams, mpp handling."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import keras

from histokd.errors import BadImageError, DataError
from histokd.nuclei.tiling import pad_for_tiling, predict_tiled, segment_nuclei, window_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nuclei_helpers import conv_model, decoder_model, encode, touching_discs  # noqa: E402


def test_window_grid_and_padding():
    rows, cols, corners = window_grid(400, 300, 256, 164)
    assert (rows, cols) == (3, 2) and corners[1] == (0, 164) and corners[-1] == (328, 164)
    padded = pad_for_tiling(np.zeros((400, 300, 3), np.uint8), 256, 164)
    assert padded.shape == (3 * 164 + 92, 2 * 164 + 92, 3)
    small = pad_for_tiling(np.arange(100 * 90 * 3, dtype=np.int64).reshape(100, 90, 3) % 251, 256, 164)
    assert small.shape == (256, 256, 3)  # one window; reflect padding larger than the image works


def test_tiled_equals_untiled_pass():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 300, 3)).astype(np.uint8)
    tiled = predict_tiled(conv_model(256), image, batch_size=4, progress=False)
    whole = conv_model(None)  # same weights (same seeds), one pass over the padded image
    padded = pad_for_tiling(image, 256, 164)
    raw = whole(padded[None], training=False)
    assert tiled["np"].shape == (400, 300) and tiled["tp"].shape == (400, 300, 4)
    ref_hv = np.asarray(raw["hv"])[0, :400, :300]
    np.testing.assert_allclose(tiled["hv"], ref_hv, atol=1e-4)
    ref_np = np.asarray(keras.ops.softmax(raw["np"], -1))[0, :400, :300, 1]
    np.testing.assert_allclose(tiled["np"], ref_np, atol=1e-5)


def test_no_nucleus_lost_at_window_seams():
    inst = np.zeros((420, 400), np.int32)
    yy, xx = np.mgrid[:420, :400]
    nid = 0
    for cy in (164, 328, 90):          # window seams at 164 and 328 (fast step)
        for cx in (164, 328, 60):
            for dx, r in ((-9, 10), (9, 9)):  # a touching pair straddling the seam
                nid += 1
                inst[((yy - cy) ** 2 + (xx - cx - dx) ** 2 <= r * r) & (inst == 0)] = nid
    res = segment_nuclei(decoder_model(), encode(inst), batch_size=3, progress=False)
    assert len(res.nuclei) == nid
    for i in range(1, nid + 1):
        true = inst == i
        ids, counts = np.unique(res.inst_map[true], return_counts=True)
        pred = res.inst_map == ids[counts.argmax()]
        assert (true & pred).sum() / (true | pred).sum() >= 0.9, i
    assert {n.type for n in res.nuclei.values()} == {2}


def test_mpp_resampling_keeps_alignment():
    inst = touching_discs(seed=1, size=160)
    # the same scene at 0.5 µm/px: half the pixels
    small = np.asarray(keras.ops.image.resize(inst[None, ..., None].astype("float32"), (80, 80),
                                              interpolation="nearest"))[0, ..., 0].astype(np.int32)
    res = segment_nuclei(decoder_model(), encode(inst)[::2, ::2], mpp=0.5, progress=False)
    assert res.inst_map.shape == (80, 80)
    matched = 0
    for i in np.unique(small)[1:]:
        true = small == i
        ids, counts = np.unique(res.inst_map[true], return_counts=True)
        pred = res.inst_map == ids[counts.argmax()]
        matched += (true & pred).sum() / (true | pred).sum() >= 0.7
    assert matched >= 0.9 * (len(np.unique(small)) - 1)
    scaled = segment_nuclei(decoder_model(), encode(inst)[::2, ::2], mpp=0.5, resample=False,
                            progress=False)
    # processed natively with TIAToolbox's scaled constants (ksize 11): pairs of ~4.5 px discs
    # may merge, but every pair is found
    assert scaled.inst_map.shape == (80, 80) and len(scaled.nuclei) >= (len(np.unique(small)) - 1) // 2


def test_input_errors():
    with pytest.raises(BadImageError, match="RGB"):
        segment_nuclei(decoder_model(), np.zeros((10, 10, 5), np.uint8), progress=False)
    with pytest.raises(DataError, match="mpp"):
        segment_nuclei(decoder_model(), np.zeros((10, 10, 3), np.uint8), mpp=-1, progress=False)
