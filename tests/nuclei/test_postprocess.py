"""HoVer-Net post-processing (spec §1.2) and training targets (spec §1.3)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from histokd.errors import DataError
from histokd.nuclei.postprocess import (instance_info, instances_from_maps, postprocess,
                                        scale_constants)
from histokd.nuclei.targets import hv_map, make_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nuclei_helpers import touching_discs  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hovernet"


def match_ids(pred, ref):
    """Map each predicted id to the reference id it overlaps most."""
    lut = np.zeros(int(pred.max()) + 1, np.int64)
    for i in np.unique(pred)[1:]:
        ids, counts = np.unique(ref[pred == i], return_counts=True)
        lut[i] = ids[counts.argmax()]
    return lut


def test_matches_tiatoolbox_oracle():
    d = np.load(FIXTURES / "postproc_oracle.npz")
    res = postprocess(d["np_prob"], d["hv"], d["true_type_map"])
    ref = d["pred_inst"]
    assert len(np.unique(res.inst_map)) == len(np.unique(ref))
    lut = match_ids(res.inst_map, ref)
    assert len(set(lut[np.unique(res.inst_map)[1:]])) == len(np.unique(ref)) - 1  # one-to-one
    agreement = (lut[res.inst_map] == ref).mean()
    assert agreement >= 0.999, agreement
    ref_types = d["pred_inst_type"]
    assert res.nuclei, "no nuclei"
    for nid, nuc in res.nuclei.items():
        assert nuc.type == ref_types[lut[nid]], (nid, nuc.type, ref_types[lut[nid]])
        assert 0 < nuc.type_prob <= 1


def test_touching_discs_are_all_recovered():
    inst = touching_discs()
    t = make_targets(inst)
    res = postprocess(t["np"].astype(np.float32), t["hv"])
    n_true = inst.max()
    assert n_true >= 12
    for i in range(1, n_true + 1):
        true = inst == i
        ids, counts = np.unique(res.inst_map[true], return_counts=True)
        best = ids[counts.argmax()]
        assert best > 0, f"disc {i} lost"
        pred = res.inst_map == best
        iou = (true & pred).sum() / (true | pred).sum()
        assert iou >= 0.9, f"disc {i}: IoU {iou:.3f}"
    assert len(np.unique(res.inst_map)) - 1 == n_true


def test_instance_info_geometry_and_type_vote():
    inst = np.zeros((20, 30), np.int32)
    inst[2:8, 3:13] = 4          # 6 × 10 rectangle
    inst[10:18, 20:28] = 7
    types = np.zeros_like(inst)
    types[2:8, 3:13] = 0
    types[2:4, 3:13] = 2         # 20 px type 2, 40 px background → runner-up 2 wins
    types[10:18, 20:28] = 3
    types[10:12, 20:28] = 5      # 48 px type 3, 16 px type 5
    info = instance_info(inst, types)
    assert sorted(info) == [4, 7]
    a = info[4]
    assert a.bbox == (3, 2, 13, 8) and a.area == 60
    np.testing.assert_allclose(a.centroid, [7.5, 4.5])
    assert a.contour.shape[1] == 2 and a.contour[:, 0].min() == 3 and a.contour[:, 1].max() == 7
    assert a.type == 2 and a.type_prob == pytest.approx(20 / 60)
    assert info[7].type == 3 and info[7].type_prob == pytest.approx(48 / 64)
    assert instance_info(inst)[4].type == 0  # no type map


def test_tiny_fragments_and_empty_maps():
    assert instances_from_maps(np.zeros((16, 16)), np.zeros((16, 16, 2))).max() == 0
    np_prob = np.zeros((32, 32), np.float32)
    np_prob[5:8, 5:8] = 1  # 9 px < 10: removed from the foreground
    assert instances_from_maps(np_prob, np.zeros((32, 32, 2))).max() == 0
    res = postprocess(np.zeros((8, 8)), np.zeros((8, 8, 2)), np.zeros((8, 8, 6)))
    assert res.nuclei == {} and res.counts(6).tolist() == [0] * 6


def test_scale_constants():
    assert scale_constants() == {"scale": 1.0, "ksize": 21, "marker_min_size": 10, "fg_min_size": 10}
    half = scale_constants(0.5)  # nuclei half as large in pixels
    assert half["ksize"] == 11 and half["marker_min_size"] == 3
    assert scale_constants(0.125)["ksize"] == 31  # OpenCV's limit
    assert scale_constants(0.125)["marker_min_size"] == 40
    assert scale_constants(0.25 / 0.36)["ksize"] == 9  # int(8.2) = 8, made odd
    with pytest.raises(DataError, match="mpp"):
        scale_constants(0)


def test_bad_shapes():
    with pytest.raises(DataError, match=r"hv \[H, W, 2\]"):
        instances_from_maps(np.zeros((8, 8)), np.zeros((8, 9, 2)))


def test_hv_targets_definition():
    inst = np.zeros((12, 12), np.int32)
    inst[2:9, 3:8] = 1            # 7 rows × 5 cols, centre (row 5, col 5)
    hv = hv_map(inst, min_size=1)
    assert hv[5, 3:8, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    np.testing.assert_allclose(hv[2:9, 5, 1], [-1, -2 / 3, -1 / 3, 0, 1 / 3, 2 / 3, 1], atol=1e-6)
    assert hv[inst == 0].max() == 0
    shifted = hv_map(inst, min_size=1, official_shift=True)  # hover_net's arange(1, …) quirk
    assert shifted[5, 3:8, 0].tolist() == pytest.approx([-1.0, 0.0, 1 / 3, 2 / 3, 1.0])
    assert hv_map(inst, min_size=36).max() == 0   # 35 px < 36: dropped
    # the fixture's HV maps are these targets plus noise
    d = np.load(FIXTURES / "postproc_oracle.npz")
    resid = hv_map(d["true_inst"], min_size=1) - d["hv"]
    assert np.abs(resid).mean() < 0.02


def test_make_targets_crop_and_types():
    inst = np.zeros((20, 20), np.int32)
    inst[4:16, 4:16] = 3
    types = (inst > 0).astype(np.int32) * 2
    t = make_targets(inst, types, crop=10)
    assert t["np"].shape == (10, 10) and t["np"].all()
    assert t["tp"].shape == (10, 10) and (t["tp"] == 2).all()
    assert t["hv"].shape == (10, 10, 2)
    with pytest.raises(DataError, match="differ in shape"):
        make_targets(inst, types[:5])
