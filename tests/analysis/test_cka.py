"""Tests for histokd.analysis.cka (More From Less §3.3, Fig. 2)."""

import gc
import itertools
import tracemalloc

import numpy as np
import pytest

import histokd  # noqa: F401  (sets the Keras backend)
import keras

from histokd.analysis import cka as C
from histokd.errors import ConfigError, DataError


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- estimator
def _hsic_u_statistic(k, l):
    """Brute-force U-statistic of Song et al. 2012 (Theorem 2) over ordered 4-tuples."""
    n = k.shape[0]
    total = 0.0
    count = 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2.0 * k[i, j] * l[i, q]
        count += 1
    return total / count


def test_hsic_unbiased_equals_u_statistic():
    rng = _rng(1)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    k, l = C.gram_linear(x), C.gram_rbf(y)
    assert C.hsic_unbiased(k, l) == pytest.approx(_hsic_u_statistic(k, l), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_identity_orthogonal_and_scaling_invariance(kernel, unbiased):
    rng = _rng(2)
    x = rng.normal(size=(60, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert C.cka(x, x, kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    y = rng.normal(size=(60, 8)) + 0.5 * x[:, :8]
    base = C.cka(x, y, kernel, unbiased=unbiased)
    assert 0.0 < base < 0.99
    assert C.cka(x @ q, y, kernel, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert C.cka(7.5 * x, y, kernel, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert C.cka(x @ q * 0.01, 3 * y, kernel, unbiased=unbiased) == pytest.approx(base, abs=1e-10)


def test_linear_cka_not_invariant_to_invertible_maps():
    rng = _rng(3)
    x = rng.normal(size=(80, 6))
    a = np.diag([1.0, 1.0, 1.0, 1.0, 1.0, 30.0]) @ rng.normal(size=(6, 6))
    assert abs(np.linalg.det(a)) > 1e-3
    value = C.cka(x, x @ a)
    assert value < 0.9  # invertible but not orthogonal: CKA changes (CCA would stay 1)


def test_unrelated_representations_score_low_and_high_vs_related():
    rng = _rng(4)
    x = rng.normal(size=(400, 20))
    assert abs(C.cka(x, rng.normal(size=(400, 20)))) < 0.05
    assert C.cka(x, np.tanh(x)) > 0.9


def test_biased_and_unbiased_agree_for_large_n():
    rng = _rng(5)
    x = rng.normal(size=(800, 5))
    y = x @ rng.normal(size=(5, 5)) + rng.normal(size=(800, 5))
    assert C.cka(x, y, unbiased=True) == pytest.approx(C.cka(x, y, unbiased=False), abs=0.01)


def test_minibatch_matches_direct_full_batch_computation():
    """The streaming accumulator equals the estimator written out directly on all the data."""
    rng = _rng(6)
    n_batches, bs = 7, 16
    xs = [rng.normal(size=(n_batches * bs, d)) for d in (5, 9)]
    ys = [rng.normal(size=(n_batches * bs, 4)) + xs[0][:, :4], rng.normal(size=(n_batches * bs, 3, 2))]

    acc = C.MinibatchCKA(2, 2)
    for b in range(n_batches):
        sl = slice(b * bs, (b + 1) * bs)
        acc.update([x[sl] for x in xs], [y[sl] for y in ys])
    got = acc.result()

    def direct_hsic(k, l):  # textbook form with traces and ones vectors
        n = k.shape[0]
        kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
        one = np.ones(n)
        return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))

    def feats(a):
        return a.reshape(a.shape[0], -1)

    want = np.zeros((2, 2))
    for i, j in itertools.product(range(2), range(2)):
        xy = xx = yy = 0.0
        for b in range(n_batches):
            xb = feats(xs[i])[b * bs:(b + 1) * bs]
            yb = feats(ys[j])[b * bs:(b + 1) * bs]
            k, l = xb @ xb.T, yb @ yb.T
            xy += direct_hsic(k, l)
            xx += direct_hsic(k, k)
            yy += direct_hsic(l, l)
        want[i, j] = xy / np.sqrt(xx * yy)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # one batch holding everything equals the full-batch function
    one = C.MinibatchCKA(1, 1)
    one.update([xs[0]], [ys[0]])
    assert one.result()[0, 0] == pytest.approx(C.cka(xs[0], ys[0]), abs=1e-12)


def _stream(n_batches, bs=32, d=256, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        x = rng.normal(size=(bs, d))
        yield x, np.tanh(x[:, : d // 2])


def _peak_bytes(n_batches):
    acc = C.MinibatchCKA(1, 1)
    tracemalloc.start()
    try:
        for x, y in _stream(n_batches):
            acc.update([x], [y])
        acc.result()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_minibatch_memory_does_not_grow_with_dataset_size():
    _peak_bytes(2)  # warm up caches / lazy imports
    small, large = _peak_bytes(10), _peak_bytes(100)
    assert large < 1.25 * small + 64 * 1024, (small, large)


def test_errors():
    with pytest.raises(ConfigError, match="kernel"):
        C.cka(np.ones((5, 2)), np.ones((5, 2)), kernel="poly")
    with pytest.raises(DataError, match="at least 4"):
        C.cka(np.eye(3), np.eye(3))
    with pytest.raises(DataError, match="different numbers"):
        C.cka(np.ones((5, 2)), np.ones((6, 2)))
    with pytest.raises(DataError, match="no minibatch"):
        C.MinibatchCKA(1, 1).result()
    assert np.isnan(C.cka(np.ones((6, 3)), _rng().normal(size=(6, 3))))


# ---------------------------------------------------------------- models
def _encoder(seed, name="encoder", size=8):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="conv_b")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv_c")(x)
    out = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inp, out, name=name)


def _classifier(encoder):
    inp = keras.Input((8, 8, 3))
    head = keras.Sequential([keras.layers.Dense(3, name="fc")], name="head")
    return keras.Model(inp, head(encoder(inp)), name="classifier")


def _images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_cka_matrix_self_is_one_on_diagonal_and_names_layers():
    enc = _encoder(0)
    df = C.cka_matrix(enc, enc, _images(40), batch_size=10, progress=False)
    assert list(df.index) == ["conv_a", "conv_b", "conv_c"] == list(df.columns)
    np.testing.assert_allclose(np.diag(df.values), 1.0, atol=1e-9)
    assert (df.values <= 1.0 + 1e-9).all()


def test_cka_matrix_nested_matches_direct_features():
    """Taps inside a nested encoder give the same CKA as features read from the flat encoder."""
    enc_a, enc_b = _encoder(1), _encoder(2, name="other")
    clf = _classifier(enc_a)
    imgs = _images(36, seed=3)
    batches = [imgs[i:i + 12] for i in range(0, 36, 12)]
    df = C.cka_matrix(clf, enc_b, batches, layers_a=["encoder/conv_b", "conv_c"], layers_b=r"conv_(a|c)$",
                      progress=False)
    assert df.shape == (2, 2)
    assert list(df.columns) == ["conv_a", "conv_c"]
    fa = keras.Model(enc_a.input, [enc_a.get_layer("conv_b").output, enc_a.get_layer("conv_c").output])
    fb = keras.Model(enc_b.input, [enc_b.get_layer("conv_a").output, enc_b.get_layer("conv_c").output])
    acc = C.MinibatchCKA(2, 2)
    for b in batches:
        x = b.astype("float32") / 255.0
        acc.update([np.asarray(t) for t in fa(x)], [np.asarray(t) for t in fb(x)])
    np.testing.assert_allclose(df.values, acc.result(), atol=1e-6)


def test_cka_matrix_dataset_dicts_pooling_and_rbf():
    import tensorflow as tf

    enc = _encoder(4)
    imgs = _images(24, seed=5)
    ds = tf.data.Dataset.from_tensor_slices({"image": imgs, "label": np.zeros(24, "int32")}).batch(8)
    lin = C.cka_matrix(enc, enc, ds, layers_a=["conv_a"], progress=False, spatial_pool="avg")
    assert lin.values[0, 0] == pytest.approx(1.0)
    rbf = C.cka_matrix(enc, _encoder(5), ds, layers_a="conv_", kernel="rbf", batches=2, progress=False,
                       spatial_pool=2)
    assert rbf.shape == (3, 3) and np.isfinite(rbf.values).all()


def test_cka_matrix_memory_flat_over_batches():
    # 16x16 maps: keeping activations (or Gram matrices) per batch would add MiBs over 24 batches
    enc_a, enc_b = _encoder(6, size=16), _encoder(7, size=16)
    imgs = _images(16, size=16)

    def peak(n):
        gc.collect()
        tracemalloc.start()
        try:
            C.cka_matrix(enc_a, enc_b, (imgs for _ in range(n)), progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(2)
    small, large = peak(8), peak(24)
    assert large < 2 * small + 512 * 1024, (small, large)


def test_cka_matrix_errors():
    enc = _encoder(8)
    with pytest.raises(ConfigError, match="no layer named"):
        C.cka_matrix(enc, enc, _images(8), layers_a=["nope"], progress=False)
    with pytest.raises(ConfigError, match="no layers matching"):
        C.cka_matrix(enc, enc, _images(8), layers_a="^zzz", progress=False)
    with pytest.raises(DataError, match="input_key"):
        C.cka_matrix(enc, enc, [{"a": _images(8), "b": _images(8)}], progress=False)


def test_regime_summary_groups_pairs_by_regime():
    imgs = _images(32, seed=9)
    base = _encoder(10)
    # "trained" regime: copies of one model with tiny weight noise (very similar);
    # "random" regime: independent random initialisations.
    trained = []
    for s in (11, 12):
        m = _encoder(s)
        rng = np.random.default_rng(s)
        m.set_weights([w + 1e-3 * rng.normal(size=w.shape) for w in base.get_weights()])
        trained.append(m)
    rand = [_encoder(20), _encoder(21)]
    summary, pairs = C.regime_summary({"trained": trained, "random": rand}, imgs, batch_size=8,
                                      progress=False, return_pairs=True)
    assert list(summary.columns) == ["trained/trained", "trained/random", "random/random"]
    assert list(summary.index) == ["conv_a", "conv_b", "conv_c"]
    assert (summary["trained/trained"] > 0.99).all()
    assert len(pairs) == 3 * (1 + 4 + 1)
    mine = pairs[(pairs.regime_a == "trained") & (pairs.regime_b == "random")].groupby("layer", sort=False)["cka"].mean()
    np.testing.assert_allclose(summary["trained/random"].values, mine.values)
    with pytest.raises(ConfigError, match="at least one model"):
        C.regime_summary({"a": []}, imgs)


def test_large_feature_means_do_not_break_precision():
    """ReLU-like features with big offsets: float32 X Xᵀ would cancel catastrophically."""
    rng = _rng(7)
    x = (rng.random(size=(64, 40000)) + 50.0).astype(np.float32)
    y = 2.0 * x[:, :300]
    xc = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    yc = y.astype(np.float64) - y.astype(np.float64).mean(axis=0)
    want = C.hsic_unbiased(xc @ xc.T, yc @ yc.T) / np.sqrt(
        C.hsic_unbiased(xc @ xc.T, xc @ xc.T) * C.hsic_unbiased(yc @ yc.T, yc @ yc.T))
    assert C.cka(x, y) == pytest.approx(want, abs=1e-6)
    acc = C.MinibatchCKA(1, 1)
    acc.update([x], [y])
    assert acc.result()[0, 0] == pytest.approx(want, abs=1e-6)
