"""Centered kernel alignment (CKA) between layer representations.

Implements linear and RBF-kernel CKA (Kornblith, Norouzi, Lee, Hinton, *Similarity
of Neural Network Representations Revisited*, ICML 2019) estimated over a whole
dataset in minibatches with the unbiased HSIC estimator (Song et al. 2012), as in
Nguyen, Raghu, Kornblith, *Do Wide and Deep Networks Learn the Same Things?*
(ICLR 2021, §3.1):

    CKA_minibatch = mean_i HSIC_1(K_i, L_i) / sqrt(mean_i HSIC_1(K_i, K_i) · mean_i HSIC_1(L_i, L_i))

where ``K_i``/``L_i`` are the Gram matrices of minibatch ``i``. Only a few scalars
per layer pair are accumulated, so memory does not grow with the dataset size.

This is the analysis of *More From Less* (Farndale et al.), §2.2 and §3.3, Fig. 2:
layer-by-layer CKA between models, and the per-regime summary "averaged over
combinations of 4 models for each case" (Fig. 2b).

Example:
    >>> import numpy as np
    >>> from histokd.analysis.cka import cka
    >>> x = np.random.default_rng(0).normal(size=(64, 10))
    >>> round(cka(x, 3.0 * x), 6)
    1.0
"""

from __future__ import annotations

import itertools
import warnings
from typing import List, Mapping, Sequence

import numpy as np
import pandas as pd

from histokd.analysis import _taps
from histokd.errors import ConfigError, DataError

__all__ = [
    "gram_linear",
    "gram_rbf",
    "hsic_unbiased",
    "hsic_biased",
    "cka",
    "MinibatchCKA",
    "minibatch_cka",
    "cka_matrix",
    "regime_summary",
]

KERNELS = ("linear", "rbf")


# ------------------------------------------------------------------ kernels
def _as_2d(x, dtype=np.float64) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 0:
        raise DataError("a representation needs one row per example; got a scalar")
    return x.reshape(x.shape[0], -1).astype(dtype, copy=False)


def gram_linear(x) -> np.ndarray:
    """Linear Gram matrix ``X Xᵀ`` of features ``x`` [n, ...] (flattened per example).

    Example:
        >>> gram_linear(np.eye(2)).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    x = _as_2d(x)
    return x @ x.T


def gram_rbf(x, sigma_frac: float = 0.8) -> np.ndarray:
    """RBF Gram matrix ``exp(-‖xᵢ-xⱼ‖² / 2σ²)`` with σ a fraction of the median distance.

    Kornblith et al. 2019 (§3, "RBF CKA") set the bandwidth as a fraction of the
    median distance between examples; here σ = ``sigma_frac`` × median
    off-diagonal distance, computed on the examples given (one minibatch), which
    keeps RBF CKA invariant to isotropic scaling.

    Args:
        x: array [n, ...]. Features, flattened per example.
        sigma_frac: float. σ as a fraction of the median distance.
    """
    return _rbf_from_gram(_centered_gram(x), sigma_frac)


def _rbf_from_gram(g: np.ndarray, sigma_frac: float) -> np.ndarray:
    if sigma_frac <= 0:
        raise ConfigError(f"sigma_frac must be > 0, got {sigma_frac}")
    sq = np.diag(g)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    n = d2.shape[0]
    off = d2[~np.eye(n, dtype=bool)]
    med = float(np.median(off)) if off.size else 0.0
    if med <= 0.0:
        # All examples identical: every kernel value is 1 (no information).
        return np.ones_like(d2)
    return np.exp(-d2 / (2.0 * sigma_frac**2 * med))


_CHUNK = 1 << 15


def _centered_gram(x) -> np.ndarray:
    """Gram matrix of the batch-centred features, in float64, column chunk by chunk.

    HSIC_1 (and the biased HSIC, and RBF distances) do not change when a constant
    vector is added to every example, but ReLU features carry large means that
    cancel catastrophically in ``X Xᵀ`` (in float32 the error reaches orders of
    magnitude). Centring first avoids that; chunking keeps the float64 copy small
    for big conv maps.
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise DataError("a representation needs one row per example; got a scalar")
    x = x.reshape(x.shape[0], -1)
    g = np.zeros((x.shape[0], x.shape[0]))
    for j in range(0, max(x.shape[1], 1), _CHUNK):
        c = x[:, j : j + _CHUNK].astype(np.float64)
        c -= c.mean(axis=0, keepdims=True)
        g += c @ c.T
    return g


def _gram(x, kernel: str, sigma_frac: float) -> np.ndarray:
    if kernel == "linear":
        return _centered_gram(x)
    if kernel == "rbf":
        return _rbf_from_gram(_centered_gram(x), sigma_frac)
    raise ConfigError(f"unknown CKA kernel {kernel!r}; use one of {KERNELS}")


# ------------------------------------------------------------------ HSIC
class _GramStats:
    """Sufficient statistics of one Gram matrix for the unbiased HSIC estimator."""

    __slots__ = ("n", "flat", "rows", "total")

    def __init__(self, k: np.ndarray):
        k = np.array(k, dtype=np.float64, copy=True)
        n = k.shape[0]
        if k.shape != (n, n):
            raise DataError(f"a Gram matrix must be square, got shape {k.shape}")
        if n < 4:
            raise DataError(
                f"the unbiased HSIC estimator needs at least 4 examples per minibatch, got {n}; "
                "use a larger batch size"
            )
        np.fill_diagonal(k, 0.0)
        self.n = n
        self.rows = k.sum(axis=1)
        self.total = float(self.rows.sum())
        self.flat = k.ravel()


def _hsic_from_stats(a: _GramStats, b: _GramStats) -> float:
    n = a.n
    value = (
        float(a.flat @ b.flat)
        + a.total * b.total / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * float(a.rows @ b.rows)
    )
    return value / (n * (n - 3))


def _hsic_block(A: Sequence[_GramStats], B: Sequence[_GramStats]) -> np.ndarray:
    """HSIC_1 for every pair (a in A, b in B) of Gram matrices of one minibatch."""
    n = A[0].n
    FA = np.stack([s.flat for s in A])
    FB = np.stack([s.flat for s in B])
    RA = np.stack([s.rows for s in A])
    RB = np.stack([s.rows for s in B])
    SA = np.array([s.total for s in A])
    SB = np.array([s.total for s in B])
    out = FA @ FB.T + np.outer(SA, SB) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (RA @ RB.T)
    return out / (n * (n - 3))


def _hsic_self(A: Sequence[_GramStats]) -> np.ndarray:
    return np.array([_hsic_from_stats(s, s) for s in A])


def hsic_unbiased(k, l) -> float:
    """Unbiased HSIC estimator HSIC_1 (Song et al. 2012, Eq. 5; Nguyen et al. 2021, Eq. 2).

    ``HSIC_1 = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) - 2/(n-2)·1ᵀK̃L̃1] / (n(n-3))``
    with ``K̃``, ``L̃`` the Gram matrices with zeroed diagonals.

    Args:
        k: array [n, n]. Gram matrix of the first representation (n >= 4).
        l: array [n, n]. Gram matrix of the second representation.
    """
    k = np.asarray(k)
    l = np.asarray(l)
    if k.shape != l.shape:
        raise DataError(f"Gram matrices differ in shape: {k.shape} vs {l.shape}")
    return _hsic_from_stats(_GramStats(k), _GramStats(l))


def hsic_biased(k, l) -> float:
    """Biased HSIC ``tr(K H L H) / (n-1)²`` (Gretton et al. 2005), as in Kornblith et al. 2019."""
    k = np.asarray(k, dtype=np.float64)
    l = np.asarray(l, dtype=np.float64)
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    return float(np.sum((h @ k @ h) * l)) / (n - 1) ** 2


def _ratio(xy, xx, yy):
    xy = np.asarray(xy, dtype=np.float64)
    den = np.asarray(xx, dtype=np.float64) * np.asarray(yy, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, xy / np.sqrt(np.where(den > 0, den, 1.0)), np.nan)
    return out


def cka(x, y, kernel: str = "linear", sigma_frac: float = 0.8, unbiased: bool = True) -> float:
    """CKA between two representations of the same n examples, in one batch.

    Args:
        x: array [n, ...]. First representation (flattened per example).
        y: array [n, ...]. Second representation, same examples in the same order.
        kernel: str. ``"linear"`` or ``"rbf"``.
        sigma_frac: float. RBF bandwidth as a fraction of the median distance.
        unbiased: bool. Unbiased HSIC (Nguyen et al. 2021) or the biased one of
            Kornblith et al. 2019.

    Returns:
        float in [0, 1] (the unbiased estimate may be slightly outside); NaN when a
        representation is constant.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(50, 8))
        >>> q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(8, 8)))
        >>> abs(cka(x, x @ q) - 1.0) < 1e-9
        True
    """
    x = _as_2d(x)
    y = _as_2d(y)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"representations cover different numbers of examples: {x.shape[0]} vs {y.shape[0]}")
    k = _gram(x, kernel, sigma_frac)
    l = _gram(y, kernel, sigma_frac)
    f = hsic_unbiased if unbiased else hsic_biased
    return float(_ratio(f(k, l), f(k, k), f(l, l)))


class MinibatchCKA:
    """Accumulates minibatch CKA between ``n_x`` and ``n_y`` representations.

    Every :meth:`update` adds, for one minibatch, HSIC_1 of every (x_i, y_j) pair
    and of every representation with itself; :meth:`result` returns the
    ``[n_x, n_y]`` CKA matrix (Nguyen et al. 2021, §3.1). Memory is
    O(n_x · n_y) scalars plus one minibatch.

    Args:
        n_x: int. Number of representations on the first side (layers of model A).
        n_y: int. Number of representations on the second side (layers of model B).
        kernel: str. ``"linear"`` or ``"rbf"``.
        sigma_frac: float. RBF bandwidth as a fraction of the median distance.

    Example:
        >>> acc = MinibatchCKA(1, 1)
        >>> rng = np.random.default_rng(0)
        >>> for _ in range(3):
        ...     x = rng.normal(size=(16, 5)); acc.update([x], [2 * x])
        >>> float(acc.result()[0, 0])
        1.0
    """

    def __init__(self, n_x: int, n_y: int, kernel: str = "linear", sigma_frac: float = 0.8):
        if kernel not in KERNELS:
            raise ConfigError(f"unknown CKA kernel {kernel!r}; use one of {KERNELS}")
        self.kernel = kernel
        self.sigma_frac = sigma_frac
        self.xy = np.zeros((n_x, n_y))
        self.xx = np.zeros(n_x)
        self.yy = np.zeros(n_y)
        self.batches = 0

    def update_grams(self, ks: Sequence[np.ndarray], ls: Sequence[np.ndarray]):
        """Add one minibatch given its Gram matrices (one per representation)."""
        A = [_GramStats(k) for k in ks]
        B = [_GramStats(l) for l in ls]
        if len(A) != self.xx.size or len(B) != self.yy.size:
            raise DataError(
                f"expected {self.xx.size} and {self.yy.size} representations, got {len(A)} and {len(B)}"
            )
        if A[0].n != B[0].n:
            raise DataError(f"minibatch sizes differ between the two sides: {A[0].n} vs {B[0].n}")
        self.xy += _hsic_block(A, B)
        self.xx += _hsic_self(A)
        self.yy += _hsic_self(B)
        self.batches += 1

    def update(self, xs: Sequence, ys: Sequence):
        """Add one minibatch given its features (lists of arrays [n, ...])."""
        self.update_grams(
            [_gram(x, self.kernel, self.sigma_frac) for x in xs],
            [_gram(y, self.kernel, self.sigma_frac) for y in ys],
        )

    def result(self) -> np.ndarray:
        """CKA matrix [n_x, n_y] (NaN where a representation is constant)."""
        if self.batches == 0:
            raise DataError("no minibatch was added; the dataset is empty or every batch had < 4 examples")
        return _ratio(self.xy, self.xx[:, None], self.yy[None, :])


def minibatch_cka(x_batches, y_batches, kernel: str = "linear", sigma_frac: float = 0.8) -> float:
    """Minibatch CKA of two representations given as parallel iterables of batches.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> xs = [rng.normal(size=(8, 4)) for _ in range(5)]
        >>> round(minibatch_cka(xs, xs), 6)
        1.0
    """
    acc = MinibatchCKA(1, 1, kernel, sigma_frac)
    for x, y in zip(x_batches, y_batches, strict=True):
        acc.update([x], [y])
    return float(acc.result()[0, 0])


# ------------------------------------------------------------------ models
def _pool(x: np.ndarray, spatial_pool) -> np.ndarray:
    """Optional average pooling over the spatial axes of a channels-last map."""
    if spatial_pool is None or x.ndim < 3:
        return x
    if spatial_pool == "avg":
        return x.mean(axis=tuple(range(1, x.ndim - 1)))
    if isinstance(spatial_pool, (int, np.integer)) and spatial_pool > 0:
        if x.ndim != 4:
            return x.mean(axis=tuple(range(1, x.ndim - 1)))
        k = int(spatial_pool)
        b, h, w, c = x.shape
        if h <= k and w <= k:
            return x
        out = np.empty((b, min(k, h), min(k, w), c), dtype=x.dtype)
        for i in range(out.shape[1]):
            h0, h1 = (i * h) // out.shape[1], -(-((i + 1) * h) // out.shape[1])
            for j in range(out.shape[2]):
                w0, w1 = (j * w) // out.shape[2], -(-((j + 1) * w) // out.shape[2])
                out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
        return out
    raise ConfigError(f"spatial_pool must be None, 'avg' or a positive int grid size, got {spatial_pool!r}")


class _GramExtractor:
    """Runs a model on a batch and returns one Gram matrix per selected layer."""

    def __init__(self, model, layers, kernel, sigma_frac, spatial_pool):
        self.model = model
        self.chosen = _taps.select_layers(model, layers)
        self.labels = _taps.labels_for(self.chosen)
        self.kernel = kernel
        self.sigma_frac = sigma_frac
        self.spatial_pool = spatial_pool

    def _transform(self, key, value):
        import keras

        x = np.asarray(keras.ops.convert_to_numpy(value))
        return _gram(_pool(x, self.spatial_pool), self.kernel, self.sigma_frac)

    def grams(self, x) -> List[np.ndarray]:
        keys = [(str(i), layer) for i, (_, layer) in enumerate(self.chosen)]
        with _taps.LayerTaps(keys, transform=self._transform) as taps:
            self.model(x, training=False)
            missing = [self.labels[int(k)] for k, _ in keys if k not in taps.outputs]
            if missing:
                raise ConfigError(
                    f"layers {missing} of model {self.model.name!r} were not used in its forward pass; "
                    "pick layers on the path from input to output"
                )
            return [taps.outputs[k] for k, _ in keys]


def _progress(it, total, progress, desc):
    from tqdm.auto import tqdm

    return tqdm(it, total=total, disable=None if progress else True, desc=desc, leave=False)


def _batches_with_inputs(dataset, batches, batch_size, keys):
    """Yield, per element, one float32 model input per entry of ``keys``."""
    for b in _taps.iter_batches(dataset, batches, batch_size):
        yield [_taps.to_float_images(_np(_taps.pick_input(b, k))) for k in keys]


def _np(x):
    if hasattr(x, "numpy"):
        return x.numpy()
    return np.asarray(x)


def cka_matrix(
    model_a,
    model_b,
    dataset,
    layers_a=None,
    layers_b=None,
    kernel: str = "linear",
    batches: int | None = None,
    progress: bool = True,
    *,
    sigma_frac: float = 0.8,
    spatial_pool=None,
    input_key=None,
    input_key_b=None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Layer-by-layer minibatch CKA between two Keras models (More From Less, Fig. 2).

    Layers may sit inside nested sub-models (an encoder inside a classifier);
    each layer's output is flattened per example.

    Args:
        model_a: keras.Model. First model (takes float32 images in [0, 1]).
        model_b: keras.Model. Second model (may be ``model_a``).
        dataset: tf.data.Dataset | iterable of batches | array [N, ...]. Elements
            are arrays, ``(x, y)`` tuples or dicts; uint8 images are scaled to [0, 1].
        layers_a: None | str | list[str]. Layers of model A: None = every
            convolution layer; a regex searched in names/paths; or exact names.
        layers_b: same for model B (default: ``layers_a``).
        kernel: str. ``"linear"`` or ``"rbf"``.
        batches: int | None. Use only the first ``batches`` elements.
        progress: bool. Show a tqdm progress bar.
        sigma_frac: float. RBF bandwidth as a fraction of the median distance.
        spatial_pool: None | "avg" | int. Average-pool big conv maps before
            flattening: globally ("avg") or to an int×int grid.
        input_key: which part of a dataset element model A reads (see
            ``pick_input``: None, a dict key, a tuple index or a callable).
        input_key_b: same for model B (default: ``input_key``).
        batch_size: int. Chunk size when ``dataset`` is a single array.

    Returns:
        pandas.DataFrame [layers of A × layers of B] of CKA values.

    Example:
        >>> df = cka_matrix(enc_asym, enc_sym, val_ds, layers_a=r"_out$", batches=50)
        >>> df.to_csv("cka.csv")
    """
    if kernel not in KERNELS:
        raise ConfigError(f"unknown CKA kernel {kernel!r}; use one of {KERNELS}")
    ea = _GramExtractor(model_a, layers_a, kernel, sigma_frac, spatial_pool)
    same = model_b is model_a and (layers_b is None or layers_b == layers_a) and input_key_b is None
    eb = ea if same else _GramExtractor(
        model_b, layers_a if layers_b is None else layers_b, kernel, sigma_frac, spatial_pool
    )
    kb = input_key if input_key_b is None else input_key_b
    acc = MinibatchCKA(len(ea.labels), len(eb.labels), kernel, sigma_frac)
    skipped = 0
    total = _taps.count_batches(dataset, batches, batch_size)
    for xa, xb in _progress(_batches_with_inputs(dataset, batches, batch_size, [input_key, kb]), total, progress, "CKA"):
        if xa.shape[0] < 4:
            skipped += 1
            continue
        ga = ea.grams(xa)
        gb = ga if same else eb.grams(xb)
        acc.update_grams(ga, gb)
    if skipped:
        warnings.warn(f"CKA skipped {skipped} minibatch(es) with fewer than 4 examples", stacklevel=2)
    return pd.DataFrame(acc.result(), index=pd.Index(ea.labels, name="layer_a"), columns=pd.Index(eb.labels, name="layer_b"))


def regime_summary(
    models: Mapping[str, Sequence],
    dataset,
    layers=None,
    kernel: str = "linear",
    batches: int | None = None,
    progress: bool = True,
    *,
    sigma_frac: float = 0.8,
    spatial_pool=None,
    input_key=None,
    batch_size: int = 32,
    include_within: bool = True,
    return_pairs: bool = False,
):
    """Per-layer mean CKA for each pair of training regimes (More From Less, Fig. 2b).

    For every pair of regimes (e.g. asymmetric/symmetric) the CKA between
    *corresponding* layers (the i-th selected layer of each model) is averaged
    over all model pairs: every combination of two distinct models for a regime
    with itself, every (model of A, model of B) for two regimes. All models are
    run once per minibatch, so the cost is one forward pass per model.

    Args:
        models: dict regime name -> list of keras.Model with the same architecture
            (the same number of selected layers), e.g.
            ``{"asymmetric": [m1, m2], "symmetric": [...], "supervised": [...], "random": [...]}``.
        dataset: see :func:`cka_matrix`.
        layers: None | str | list[str]. Layer selection applied to every model.
        kernel: str. ``"linear"`` or ``"rbf"``.
        batches: int | None. Use only the first ``batches`` elements.
        progress: bool. Show a progress bar.
        sigma_frac, spatial_pool, batch_size: see :func:`cka_matrix`.
        input_key: a selector for every model, or a dict regime -> selector.
        include_within: bool. Include regime/itself columns (needs >= 2 models).
        return_pairs: bool. Also return the long table of every model pair.

    Returns:
        DataFrame [layers × "regimeA/regimeB"] of mean CKA; with ``return_pairs``,
        ``(summary, pairs)`` where ``pairs`` has columns regime_a, regime_b,
        model_a, model_b, layer, cka.

    Example:
        >>> summary = regime_summary({"asymmetric": [a1, a2], "symmetric": [s1, s2]}, ds, layers=r"_out$")
        >>> summary["asymmetric/symmetric"]
    """
    if kernel not in KERNELS:
        raise ConfigError(f"unknown CKA kernel {kernel!r}; use one of {KERNELS}")
    if not models or any(len(v) == 0 for v in models.values()):
        raise ConfigError("regime_summary needs at least one model per regime, e.g. {'asymmetric': [m1, m2]}")
    regimes = list(models)
    entries = []  # (regime, index, extractor)
    for r in regimes:
        for i, m in enumerate(models[r]):
            entries.append((r, i, _GramExtractor(m, layers, kernel, sigma_frac, spatial_pool)))
    n_layers = {len(e.labels) for _, _, e in entries}
    if len(n_layers) != 1:
        desc = ", ".join(f"{r}[{i}]: {len(e.labels)}" for r, i, e in entries)
        raise ConfigError(
            f"models select different numbers of layers ({desc}); use the same architecture "
            "or a layer pattern that matches the same layers in every model"
        )
    L = n_layers.pop()
    labels = entries[0][2].labels

    pairs = []  # (entry index a, entry index b, regime pair label)
    for ia, ra in enumerate(regimes):
        for rb in regimes[ia:]:
            ea = [k for k, e in enumerate(entries) if e[0] == ra]
            eb = [k for k, e in enumerate(entries) if e[0] == rb]
            if ra == rb:
                if not include_within:
                    continue
                combos = list(itertools.combinations(ea, 2))
            else:
                combos = list(itertools.product(ea, eb))
            for a, b in combos:
                pairs.append((a, b, f"{ra}/{rb}"))
    if not pairs:
        raise ConfigError("no model pairs to compare: give >= 2 models in a regime or >= 2 regimes")

    keys = [input_key.get(r) if isinstance(input_key, dict) else input_key for r, _, _ in entries]
    xy = np.zeros((len(pairs), L))
    self_h = np.zeros((len(entries), L))
    n_batches = 0
    total = _taps.count_batches(dataset, batches, batch_size)
    for xs in _progress(_batches_with_inputs(dataset, batches, batch_size, keys), total, progress, "CKA"):
        if xs[0].shape[0] < 4:
            continue
        stats = [[_GramStats(g) for g in e.grams(x)] for (_, _, e), x in zip(entries, xs)]
        for k, st in enumerate(stats):
            self_h[k] += _hsic_self(st)
        for p, (a, b, _) in enumerate(pairs):
            xy[p] += [_hsic_from_stats(sa, sb) for sa, sb in zip(stats[a], stats[b])]
        n_batches += 1
    if n_batches == 0:
        raise DataError("no minibatch with >= 4 examples was found in the dataset")

    rows = []
    for p, (a, b, label) in enumerate(pairs):
        values = _ratio(xy[p], self_h[a], self_h[b])
        ra, i, _ = entries[a]
        rb, j, _ = entries[b]
        for li, v in enumerate(values):
            rows.append((ra, rb, f"{ra}[{i}]", f"{rb}[{j}]", labels[li], li, float(v), label))
    long = pd.DataFrame(rows, columns=["regime_a", "regime_b", "model_a", "model_b", "layer", "layer_index", "cka", "pair"])
    summary = long.groupby(["layer_index", "pair"], sort=False)["cka"].mean().unstack("pair")
    summary = summary.reindex(index=range(L), columns=list(dict.fromkeys(lbl for _, _, lbl in pairs)))
    summary.index = pd.Index(labels, name="layer")
    summary.columns.name = "regimes"
    long = long.drop(columns=["layer_index", "pair"])
    return (summary, long) if return_pairs else summary
