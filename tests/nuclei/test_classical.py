"""The weight-free classical segmenter and the AJI / Dice metrics."""

from __future__ import annotations

import numpy as np
import pytest

from histokd.errors import DataError
from histokd.nuclei.classical import segment_classical
from histokd.nuclei.metrics import aggregated_jaccard_index, dice
from histokd.nuclei.synthetic import synthetic_he_tile


def test_aji_and_dice_known_values():
    t = np.zeros((10, 10), int)
    t[0:4, 0:4] = 1
    t[6:10, 6:10] = 2
    assert aggregated_jaccard_index(t, t) == 1.0 and dice(t, t) == 1.0
    split = t.copy()
    split[0:4, 2:4] = 3                      # nucleus 1 split in two halves
    # pairs: 1↔(8 px of 16) and 2↔2; the unpaired half (8 px) joins the union
    assert aggregated_jaccard_index(t, split) == pytest.approx((8 + 16) / (16 + 16 + 8))
    fp = t.copy()
    fp[5, 0] = 9                             # one false-positive pixel
    assert aggregated_jaccard_index(t, fp) == pytest.approx(32 / 33)
    assert dice(t, np.zeros_like(t)) == 0.0
    assert aggregated_jaccard_index(np.zeros_like(t), np.zeros_like(t)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        aggregated_jaccard_index(t, t[:5])


def test_synthetic_nuclei_scores():
    ajis, dices = [], []
    for seed in (0, 1):
        img, inst = synthetic_he_tile(seed)
        res = segment_classical(img)
        assert {n.type for n in res.nuclei.values()} == {1}  # no types: all "Unknown"
        ajis.append(aggregated_jaccard_index(inst, res.inst_map))
        dices.append(dice(inst, res.inst_map))
    assert np.mean(dices) >= 0.9, dices
    assert np.mean(ajis) >= 0.7, ajis


def test_blank_tissue_has_no_nuclei():
    rng = np.random.default_rng(0)
    pink = np.clip(np.array([235, 170, 215]) + rng.normal(0, 3, (128, 128, 3)), 0, 255).astype(np.uint8)
    assert segment_classical(pink).inst_map.max() == 0
    assert segment_classical(np.full((64, 64, 3), 255, np.uint8)).nuclei == {}


def test_mpp_scales_sizes_and_validates():
    img, inst = synthetic_he_tile(2, size=128, n_nuclei=10)
    half = segment_classical(img[::2, ::2], mpp=0.5)
    assert 0.5 * inst.max() <= len(half.nuclei) <= 1.5 * inst.max()
    with pytest.raises(DataError, match="mpp"):
        segment_classical(img, mpp=0)
    with pytest.raises(DataError, match="RGB"):
        segment_classical(img[..., 0])


def test_real_kather_tiles(shared_data):
    import cv2

    root = shared_data / "kather2016_ishil100"
    def count(cls):
        f = sorted((root / cls).glob("*.png"))[0]
        img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        return len(segment_classical(img, mpp=0.495 * 150 / 224).nuclei)
    assert count("04_LYMPHO") > 20 > count("07_ADIPOSE")
