"""Macenko core: ground-truth recovery, fits, NumPy API, robustness policy, config."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from histokd.errors import HistokdError, StainError
from histokd.stain import (
    MacenkoFit,
    MacenkoNormalizer,
    PRESETS,
    fit_macenko,
    macenko_decompose,
    resolve_target,
)
from histokd.stain.macenko import tissue_threshold

sys.path.insert(0, str(Path(__file__).parent))
from stain_synth import E_TRUE, H_TRUE, angle_deg, beer_lambert, concentrations, synth_he  # noqa: E402

PAIRS = [
    (H_TRUE, E_TRUE),
    ((0.65, 0.70, 0.29), (0.25, 0.85, 0.45)),
    ((0.60, 0.70, 0.40), (0.30, 0.75, 0.60)),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_recovers_beer_lambert_stain_vectors(pair, seed):
    h_vec, e_vec = PAIRS[pair]
    img = synth_he(96, seed, h_vec, e_vec)
    fit = fit_macenko(img)
    he = fit.he
    assert angle_deg(he[:, 0], h_vec) < 2.0, "haematoxylin vector off by > 2 degrees (or H/E swapped)"
    assert angle_deg(he[:, 1], e_vec) < 2.0, "eosin vector off by > 2 degrees (or H/E swapped)"
    # H/E order: H is the first column and has the larger red OD
    assert he[0, 0] > he[0, 1]
    np.testing.assert_allclose(np.linalg.norm(he, axis=0), 1.0, atol=1e-5)


def test_batched_decomposition_equals_per_image():
    imgs = np.stack([synth_he(64, s) for s in range(3)])
    batch = macenko_decompose(tf.constant(imgs))
    for i in range(3):
        one = macenko_decompose(tf.constant(imgs[i:i + 1]))
        np.testing.assert_allclose(batch["stain_matrix"][i], one["stain_matrix"][0], atol=1e-5)
        np.testing.assert_allclose(batch["max_c"][i], one["max_c"][0], rtol=1e-5)


def test_tissue_threshold_matches_float64_rule():
    for io, beta in [(240, 0.15), (255, 0.15), (240, 0.3)]:
        t = tissue_threshold(io, beta)
        assert -np.log((t + 1) / io) >= beta > -np.log((t + 2) / io)


def test_fit_json_roundtrip(tmp_path):
    fit = fit_macenko(synth_he(64, 0))
    again = MacenkoFit.from_json(fit.to_json())
    assert again == fit
    path = tmp_path / "fit.json"
    fit.to_json(str(path))
    assert json.loads(path.read_text())["stain_matrix"] == [list(r) for r in fit.stain_matrix]
    assert resolve_target(str(path)) == fit
    n = MacenkoNormalizer(str(path))
    np.testing.assert_allclose(n.target_fit.he, fit.he)


def test_presets_and_targets(tmp_path):
    assert resolve_target("torchstain") is PRESETS["torchstain"]
    assert resolve_target(None) is PRESETS["torchstain"]
    np.testing.assert_allclose(PRESETS["torchstain"].max_c, [1.9705, 1.0308])
    img = synth_he(64, 3)
    import cv2

    p = tmp_path / "target.png"
    cv2.imwrite(str(p), img[:, :, ::-1])
    fit = resolve_target(str(p))
    assert fit.source.startswith("image:")
    np.testing.assert_allclose(fit.he, fit_macenko(img).he, atol=1e-6)
    with pytest.raises(StainError, match="not a preset"):
        resolve_target("no_such_target")
    with pytest.raises(StainError, match="3x2"):
        MacenkoFit([[1, 2, 3]], [1, 1])
    with pytest.raises(StainError, match="positive"):
        MacenkoFit(PRESETS["torchstain"].stain_matrix, [0.0, 1.0])
    with pytest.raises(StainError, match="no usable H&E tissue"):
        fit_macenko(np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(StainError, match="unknown Macenko constant"):
        MacenkoNormalizer("torchstain", gamma=2)
    with pytest.raises(StainError, match="alpha"):
        MacenkoNormalizer("torchstain", alpha=60)
    assert issubclass(StainError, HistokdError)


def test_numpy_in_numpy_out_and_single_image():
    norm = MacenkoNormalizer("torchstain")
    batch = np.stack([synth_he(64, s) for s in range(2)])
    out, passed = norm.transform(batch, return_passthrough=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == batch.shape
    assert passed.tolist() == [False, False]
    single = norm(batch[0])
    assert single.shape == (64, 64, 3)
    np.testing.assert_array_equal(single, out[0])
    t = norm.transform(tf.constant(batch))
    assert isinstance(t, tf.Tensor)
    np.testing.assert_array_equal(t.numpy(), out)
    with pytest.raises(StainError, match="uint8"):
        norm.transform(batch.astype(np.float32) / 255.0)
    with pytest.raises(StainError, match="3 channels"):
        norm.transform(batch[..., :2])


def test_normalised_tile_moves_towards_target():
    """Tiles stained with different vectors end up with the same colours."""
    h, e = concentrations(96, 5)
    a = beer_lambert(h, e, *PAIRS[1])
    b = beer_lambert(h, e, *PAIRS[2])
    norm = MacenkoNormalizer("torchstain")
    na, nb = norm(np.stack([a, b]))
    before = np.abs(a.astype(float) - b).mean()
    after = np.abs(na.astype(float) - nb).mean()
    assert after < 0.25 * before, (before, after)


def _tiles():
    rng = np.random.default_rng(0)
    s = 64
    h, e = concentrations(s, 7)
    tiny = np.full((s, s, 3), 250, np.uint8)
    tiny[:5, :5] = beer_lambert(h, e)[:5, :5]  # 25 tissue pixels
    return {
        "background": np.full((s, s, 3), 255, np.uint8),
        "near_white": np.clip(rng.normal(228, 3, (s, s, 3)), 0, 255).astype(np.uint8),
        "black": np.zeros((s, s, 3), np.uint8),
        "noise": rng.integers(0, 256, (s, s, 3), dtype=np.uint8),
        "dark_noise": rng.integers(0, 200, (s, s, 3), dtype=np.uint8),
        "gray": np.repeat(rng.integers(0, 200, (s, s, 1), dtype=np.uint8), 3, axis=2),
        "h_only": beer_lambert(h, 0 * e, noise=1.0),
        "e_only": beer_lambert(0 * h + 1.2 * (h > 0.1), e + 0.5, H_TRUE * 0 + E_TRUE, E_TRUE),
        "tiny_tissue": tiny,
    }


@pytest.fixture(scope="module")
def edge_results():
    tiles = _tiles()
    good = synth_he(64, 1)
    batch = np.stack([good] + list(tiles.values()) + [good])
    norm = MacenkoNormalizer("torchstain")
    out, passed = norm.transform(batch, return_passthrough=True)
    dec = norm.decompose(batch)
    return tiles, batch, out, passed, dec


@pytest.mark.parametrize("kind", list(_tiles()))
def test_edge_case_tiles_pass_through_unchanged(kind, edge_results):
    tiles, batch, out, passed, dec = edge_results
    i = 1 + list(tiles).index(kind)
    assert passed[i], f"{kind} tile was not passed through"
    assert not dec["ok"][i]
    np.testing.assert_array_equal(out[i], batch[i])
    # the normal tiles around it are normalised, identically
    assert not passed[0] and not passed[-1]
    np.testing.assert_array_equal(out[0], out[-1])
    assert not np.array_equal(out[0], batch[0])


def test_stress_never_nan_and_ok_means_finite():
    """Odd tiles (gradients, saturated colours, blobs, noisy single stain) never give NaN/Inf."""
    rng = np.random.default_rng(3)
    s = 48
    yy, xx = np.mgrid[0:s, 0:s]
    tiles = []
    for i in range(24):
        kind = i % 6
        if kind == 0:
            t = np.stack([(xx * 5) % 256, (yy * 5) % 256, ((xx + yy) * 3) % 256], -1)
        elif kind == 1:
            t = np.zeros((s, s, 3)); t[..., rng.integers(3)] = 255
        elif kind == 2:
            t = rng.integers(0, 256, (1, 1, 3)) + np.zeros((s, s, 3))
        elif kind == 3:
            t = synth_he(s, i, noise=8.0)
        elif kind == 4:
            h, e = concentrations(s, i)
            t = beer_lambert(h, 0 * e, noise=6.0)
        else:
            t = rng.integers(0, 256, (s, s, 3)) * (rng.random((s, s, 1)) < 0.02)
        tiles.append(np.clip(t, 0, 255).astype(np.uint8))
    batch = np.stack(tiles)
    dec = macenko_decompose(tf.constant(batch))
    ok = dec["ok"].numpy()
    for k in ("stain_matrix", "max_c", "pinv"):
        assert np.all(np.isfinite(dec[k].numpy()[ok])), k
    out, passed = MacenkoNormalizer("torchstain").transform(batch, return_passthrough=True)
    np.testing.assert_array_equal(passed, ~ok)
    np.testing.assert_array_equal(out[passed], batch[passed])


def test_normalizer_config_roundtrip():
    norm = MacenkoNormalizer("slideflow_v3", alpha=2.0, min_tissue_pixels=50)
    cfg = norm.get_config()
    json.dumps(cfg)
    again = MacenkoNormalizer.from_config(cfg)
    assert again.get_config() == cfg
    img = synth_he(64, 2)
    np.testing.assert_array_equal(norm(img), again(img))


def test_chunked_transform_is_batch_size_independent():
    """The transform runs in fixed-size chunks (padded): a tile's output does not
    depend on the batch it came in, and equals the unchunked path up to rounding."""
    from histokd.stain.macenko import macenko_transform

    tiles = np.stack([synth_he(32, s) for s in range(5)] + [np.full((32, 32, 3), 255, np.uint8)])
    fit = PRESETS["torchstain"]
    he, mc = tf.constant(fit.he), tf.constant(fit.max_c)
    fn = tf.function(lambda x: macenko_transform(x, he, mc, chunk_size=4),
                     input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8)])
    out6, p6 = fn(tf.constant(tiles))           # 2 chunks, the second padded
    out3, p3 = fn(tf.constant(tiles[3:]))       # 1 padded chunk
    np.testing.assert_array_equal(out6.numpy()[3:], out3.numpy())
    assert p6.numpy().tolist() == [False] * 5 + [True] and p3.numpy().tolist() == [False, False, True]
    whole, pw = macenko_transform(tf.constant(tiles), he, mc, chunk_size=None)
    np.testing.assert_array_equal(pw.numpy(), p6.numpy())
    assert np.abs(whole.numpy().astype(int) - out6.numpy()).max() <= 1


def test_pseudo_angle_orders_like_atan2_and_inverts():
    """The percentiles of phi are selected on a pseudo-angle: it must sort points
    exactly like atan2 over all four quadrants and invert back to the angle."""
    from histokd.stain.macenko import pseudo_angle, pseudo_angle_to_angle

    rng = np.random.default_rng(0)
    xy = rng.normal(size=(2, 20000)) * rng.choice([1e-3, 1.0, 30.0], size=(1, 20000))
    axes = np.array([[1, 0, -1, 0, 2, -3], [0, 1, 0, -1, 2, -3]], float)
    x, y = (np.concatenate([xy, axes], 1)).astype(np.float32)
    theta = np.arctan2(y.astype(np.float64), x.astype(np.float64))
    p = pseudo_angle(tf.constant(x), tf.constant(y)).numpy().astype(np.float64)
    assert p.min() >= -2.0 and p.max() <= 2.0
    order = np.argsort(theta, kind="stable")
    assert np.all(np.diff(p[order]) >= 0), "pseudo-angle is not monotone in atan2"
    back = pseudo_angle_to_angle(tf.constant(p.astype(np.float32))).numpy()
    np.testing.assert_allclose(back, theta, atol=2e-6)


@pytest.mark.parametrize("group", [1, 16])
def test_top_desc_is_exact(group):
    """Exact top-k (with the group-maximum prefilter and its lower bound) on rows
    with ties, -inf padding and a monotone ramp (the worst case for grouping)."""
    from histokd.stain._select import top_desc as _top_desc

    rng = np.random.default_rng(1)
    n, k = 4000, 43
    rows = [rng.normal(size=n), np.round(rng.normal(size=n), 1), np.arange(n, dtype=float),
            np.where(rng.random(n) < 0.7, -np.inf, rng.normal(size=n))]
    a = np.stack(rows)[None].astype(np.float32)  # [1, 4, n]
    got = _top_desc(tf.constant(a), k, group).numpy()[0]
    want = -np.sort(-a[0], axis=1)[:, :k]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [4000, 4003])
def test_top_desc_with_group_maxima_from_an_xla_pass(n):
    """The per-pixel XLA passes hand their group maxima to the selection (also
    when N is not a multiple of the group: -inf padding); still exact."""
    from histokd.stain._kernels import group_max as _group_max
    from histokd.stain._select import top_desc as _top_desc

    rng = np.random.default_rng(2)
    a = np.stack([rng.normal(size=n), np.arange(n, dtype=float)[::-1],
                  np.where(rng.random(n) < 0.9, -np.inf, rng.normal(size=n))])[None].astype(np.float32)
    gmax = tf.function(lambda r: _group_max(r, 16), jit_compile=True)(tf.constant(a))
    assert gmax.shape == (1, 3, -(-n // 16))
    got = _top_desc(tf.constant(a), 41, 16, gmax).numpy()[0]
    np.testing.assert_array_equal(got, -np.sort(-a[0], axis=1)[:, :41])


@pytest.mark.parametrize("xla", [False, True])
@pytest.mark.parametrize("q", [99.0, 98.0, 97.0])
def test_upper_order_stats_equal_np_percentile(q, xla):
    """The NthElement selection (bound from the group maxima, packed candidate groups,
    +inf padding to a common rank) gives np.percentile exactly, for rows with many,
    few, one or no valid values, heavy ties, constant and monotone rows."""
    from histokd.stain._kernels import group_max as _group_max
    from histokd.stain._select import group_path as _group_path, k_for as _k_for, lerp as _lerp
    from histokd.stain._select import upper_order_stats as _upper_order_stats

    rng = np.random.default_rng(7)
    n, group = 4096, 16
    k = _k_for(n, n, 100.0 - q)
    assert _group_path(n, k, group)
    counts = np.array([n, 4000, 2000, 300, 40, 3, 1, 0, n, n, n, 2500])
    rows = []
    for i, c in enumerate(counts):
        if i == 8:
            v = np.arange(n, dtype=float)  # monotone: every top group is full of candidates
        elif i == 9:
            v = np.full(n, 0.25)  # one value: everything ties with the bound
        else:
            v = np.round(rng.normal(size=n), 1 if i in (10, 11) else 6)  # 10, 11: heavy ties
        v[c:] = -np.inf
        rows.append(v if i == 8 else rng.permutation(v))
    a = np.stack(rows)[:, None].astype(np.float32)  # [B, 1, n]
    a = np.concatenate([a, -a[:, :, ::-1]], 1)  # second row: the lower tail of the first
    a[:, 1][~np.isfinite(a[:, 0, ::-1])] = -np.inf
    x = tf.constant(a)
    gmax = _group_max(x, group)
    lo, hi, t = tf.function(lambda r, g, c: _upper_order_stats(r, g, c, q, k, group, xla))(
        x, gmax, tf.constant(counts, tf.int32))
    got = _lerp(lo, hi, t).numpy()
    for i, c in enumerate(counts):
        for j in range(2):
            if c > 0:
                want = np.percentile(a[i, j, np.isfinite(a[i, j])].astype(np.float64), q)
                assert got[i, j] == pytest.approx(want, rel=1e-6, abs=1e-6), (i, j, c)


@pytest.mark.parametrize("q", [99.0, 1.0, 50.0])
def test_percentile_from_unordered_top_is_exact(q):
    """The percentile from an unordered top-k set (only the smallest few ordered) equals
    np.percentile and the fully sorted path, for rows with many, few or no valid values,
    ties and -inf padding."""
    from histokd.stain._select import k_for as _k_for, percentile_from_top as _percentile_from_top
    from histokd.stain._select import top_desc as _top_desc

    rng = np.random.default_rng(5)
    n = 3000
    k = _k_for(n, n, 100.0 - q) if q > 50 else n  # the tail the decomposition selects
    counts = np.array([n, 2900, 1500, 40, 3, 1, 0, n])
    rows = []
    for i, c in enumerate(counts):
        v = np.round(rng.normal(size=n), 1 if i == len(counts) - 1 else 6)  # last row: ties
        v[c:] = -np.inf
        rows.append(rng.permutation(v))
    a = np.stack(rows).astype(np.float32)
    unordered = _top_desc(tf.constant(a[:, None]), k, 16, sort=False)[:, 0]
    ordered = _top_desc(tf.constant(a[:, None]), k, 16)[:, 0]
    got = _percentile_from_top(unordered, tf.constant(counts, tf.int32), q, presorted=False).numpy()
    ref = _percentile_from_top(ordered, tf.constant(counts, tf.int32), q).numpy()
    np.testing.assert_array_equal(got, ref)
    for i, c in enumerate(counts):
        if c > 0:
            assert got[i] == pytest.approx(np.percentile(a[i, np.isfinite(a[i])].astype(np.float64), q),
                                           abs=1e-6)


def test_small_matmul_equals_matmul():
    from histokd.stain._kernels import small_matmul as _small_matmul

    rng = np.random.default_rng(3)
    for m, k, n in [(2, 3, 2), (2, 2, 3), (3, 2, 3)]:
        a, b = rng.normal(size=(5, m, k)).astype(np.float32), rng.normal(size=(5, k, n)).astype(np.float32)
        np.testing.assert_allclose(_small_matmul(tf.constant(a), tf.constant(b)).numpy(), a @ b, rtol=1e-5, atol=1e-6)


def test_xla_and_tensorflow_kernels_agree():
    """The XLA-compiled per-pixel passes compute the same decomposition as
    TensorFlow's kernels (to float32 rounding)."""
    imgs = np.stack([synth_he(64, s) for s in range(4)] + [np.full((64, 64, 3), 250, np.uint8)])
    a = macenko_decompose(tf.constant(imgs), xla=True)
    b = macenko_decompose(tf.constant(imgs), xla=False)
    np.testing.assert_array_equal(a["ok"].numpy(), b["ok"].numpy())
    np.testing.assert_array_equal(a["n_tissue"].numpy(), b["n_tissue"].numpy())
    ok = a["ok"].numpy()
    np.testing.assert_allclose(a["stain_matrix"].numpy()[ok], b["stain_matrix"].numpy()[ok], atol=1e-5)
    np.testing.assert_allclose(a["max_c"].numpy()[ok], b["max_c"].numpy()[ok], rtol=1e-5)
    np.testing.assert_allclose(a["od"].numpy(), b["od"].numpy(), atol=1e-5)


def test_tensorflow_kernel_path_in_a_static_graph(monkeypatch):
    """HISTOKD_MACENKO_XLA=0 (no XLA available, or for debugging) runs the same
    passes as TensorFlow ops, also in a graph with fully static shapes, and agrees
    with the XLA path to one grey level on a few pixels."""
    imgs = np.stack([synth_he(48, s) for s in range(8)])
    xla_out = MacenkoNormalizer("torchstain")(imgs)
    monkeypatch.setenv("HISTOKD_MACENKO_XLA", "0")
    from histokd.stain.macenko import xla_enabled

    assert not xla_enabled()
    norm = MacenkoNormalizer("torchstain")
    fn = tf.function(lambda x: norm.transform(x))  # static [8,48,48,3] graph
    tf_out = fn(tf.constant(imgs)).numpy()
    diff = np.abs(tf_out.astype(int) - xla_out)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_many_tile_sizes_share_one_dynamic_graph(monkeypatch):
    """Beyond MAX_STATIC_SIZES distinct tile sizes, new sizes use the one
    dynamic-shape graph (no per-size trace and XLA compile) with the same results."""
    from histokd.stain import _kernels as M

    monkeypatch.setattr(M, "MAX_STATIC_SIZES", 1)
    monkeypatch.setattr(M, "_STATIC_SIZES", {})
    norm = MacenkoNormalizer("torchstain", alpha=1.5)  # constants no other test compiled
    a = np.stack([synth_he(40, s) for s in range(2)])
    b = np.stack([synth_he(44, s) for s in range(2)])
    out_a = norm(a)
    out_b = norm(b)  # second size: the dynamic graph
    keys = [k for k in M._GRAPHS if k[0] == "transform" and ("alpha", 1.5) in k]
    assert {(k[1], k[2]) for k in keys} == {(40, 40), (None, None)}
    assert out_a.shape == a.shape and out_b.shape == b.shape
    monkeypatch.setattr(M, "MAX_STATIC_SIZES", 16)
    monkeypatch.setattr(M, "_STATIC_SIZES", {})
    static_b = MacenkoNormalizer("torchstain", alpha=1.5)(b)
    diff = np.abs(static_b.astype(int) - out_b)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
