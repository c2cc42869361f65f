"""Figures saved in every run's ``plots/`` folder.

Training curves per loss term, confusion matrices (More From Less Fig. S4
style: counts and row-normalised), one-vs-rest ROC curves with the macro AUC,
embedding scatter plots (t-SNE, PCA for very few points) and CKA heat maps /
per-regime CKA curves (Fig. 2b).

Every function takes arrays or paths, writes one PNG and returns its path. The
figures are drawn with matplotlib's Agg canvas directly (no ``pyplot`` state,
no change of the user's backend), so they work headless and in threads.

Example:
    >>> from histokd.analysis import plots
    >>> plots.plot_history("runs/demo/history.csv", "runs/demo/plots/history.png")
    'runs/demo/plots/history.png'
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import pandas as pd

from histokd.errors import DataError

__all__ = [
    "plot_history",
    "plot_confusion_matrix",
    "plot_roc",
    "plot_embedding",
    "plot_cka_heatmap",
    "plot_cka_regimes",
]


def _figure(width, height, dpi=100):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _cmap(name):
    import matplotlib

    return matplotlib.colormaps[name]


def _save(fig, out_png, dpi=100) -> str:
    out_png = str(out_png)
    parent = os.path.dirname(os.path.abspath(out_png))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(out_png, dpi=dpi, bbox_inches="tight")
    return out_png


def _class_names(n, class_names):
    if class_names is None:
        return [str(i) for i in range(n)]
    names = [str(c) for c in class_names]
    if len(names) < n:
        raise DataError(f"{len(names)} class names given but the labels use {n} classes")
    return names


# ---------------------------------------------------------------- history
def _history_frame(history) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        return history
    if isinstance(history, dict):
        return pd.DataFrame(history)
    path = str(history)
    if not os.path.exists(path):
        raise DataError(f"history file {path!r} does not exist; pass a run's history.csv (written by CSVLogger)")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"history file {path!r} is empty; the run has not finished an epoch yet") from None


def plot_history(history, out_png, *, title: str | None = None, ncols: int = 3, log_scale_loss: bool = False) -> str:
    """Training curves, one subplot per metric family (train and ``val_`` together).

    Args:
        history: str | Path | DataFrame | dict. A Keras ``CSVLogger`` file (an
            ``epoch`` column and one column per metric) or its contents.
        out_png: str. Output path.
        title: str. Figure title.
        ncols: int. Subplots per row.
        log_scale_loss: bool. Log y axis for families whose name contains "loss"
            (when all values are positive).

    Returns:
        str. ``out_png``.

    Example:
        >>> plot_history({"epoch": [0, 1], "loss": [2.0, 1.5], "val_loss": [2.1, 1.7]}, "h.png")
        'h.png'
    """
    df = _history_frame(history)
    if df.empty:
        raise DataError("the training history has no rows; nothing to plot")
    x = df["epoch"].to_numpy() + 1 if "epoch" in df.columns else np.arange(1, len(df) + 1)
    metrics = [c for c in df.columns if c != "epoch" and pd.api.types.is_numeric_dtype(df[c])]
    families: dict[str, dict[str, str]] = {}
    for c in metrics:
        base = c[4:] if c.startswith("val_") else c
        families.setdefault(base, {})["val" if c.startswith("val_") else "train"] = c
    if not families:
        raise DataError(f"the training history has no numeric metric columns (columns: {list(df.columns)})")
    # losses first (the total, then the terms), then the rest in file order
    order = sorted(families, key=lambda f: (0 if f == "loss" else 1 if "loss" in f else 2))
    n = len(order)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(4.0 * ncols, 2.8 * nrows + (0.4 if title else 0))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, fam in enumerate(order):
        ax = axes[i // ncols][i % ncols]
        for split, style in (("train", "-"), ("val", "--")):
            col = families[fam].get(split)
            if col is None:
                continue
            y = df[col].to_numpy(dtype=float)
            ax.plot(x, y, style, marker="o" if len(x) < 15 else None, markersize=3, label=split)
        if log_scale_loss and "loss" in fam:
            vals = df[[c for c in families[fam].values()]].to_numpy(dtype=float)
            if np.all(vals[np.isfinite(vals)] > 0):
                ax.set_yscale("log")
        ax.set_title(fam, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(families[fam]) > 1:
            ax.legend(fontsize=8)
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------- confusion
def _labels_1d(y, name):
    y = np.asarray(y)
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise DataError(f"{name} must be class indices [N] or scores [N, C], got shape {y.shape}")
    return y.astype(int)


def plot_confusion_matrix(
    y_true,
    y_pred,
    out_png,
    class_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    cmap: str = "Blues",
) -> str:
    """Confusion matrix as counts and row-normalised, side by side (Fig. S4 style).

    Args:
        y_true: array [N]. True class indices (or one-hot [N, C]).
        y_pred: array [N] of predicted indices or [N, C] scores (argmax taken).
            Pass ``y_true=None`` and a square count matrix as ``y_pred`` to plot
            an already computed confusion matrix.
        out_png: str. Output path.
        class_names: list[str]. Names of the classes, in index order.
        title: str. Figure title.
        cmap: str. Colormap.

    Returns:
        str. ``out_png``.

    Example:
        >>> plot_confusion_matrix([0, 1, 1], [0, 1, 0], "cm.png", ["ADI", "BACK"])
        'cm.png'
    """
    if y_true is None:
        cm = np.asarray(y_pred, dtype=float)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise DataError(f"a confusion matrix must be square, got shape {cm.shape}")
        k = cm.shape[0]
    else:
        t, p = _labels_1d(y_true, "y_true"), _labels_1d(y_pred, "y_pred")
        if t.shape != p.shape:
            raise DataError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
        if t.size and (t.min() < 0 or p.min() < 0):
            raise DataError("class indices must be >= 0")
        k = max(int(t.max(initial=-1)), int(p.max(initial=-1))) + 1
        if class_names is not None:
            k = max(k, len(class_names))
        cm = np.zeros((k, k), dtype=float)
        np.add.at(cm, (t, p), 1)
    names = _class_names(k, class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    side = max(3.5, 0.55 * k + 1.8)
    fig = _figure(2 * side + 0.8, side + (0.5 if title else 0.2))
    axes = fig.subplots(1, 2)
    fontsize = 9 if k <= 10 else 7 if k <= 16 else 5
    for ax, mat, sub, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        vmax = mat.max() if mat.max() > 0 else 1.0
        im = ax.imshow(mat, cmap=cmap, vmin=0, vmax=vmax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=fontsize)
        ax.set_yticklabels(names, fontsize=fontsize)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(sub, fontsize=10)
        if k <= 25:
            for i in range(k):
                for j in range(k):
                    v = mat[i, j]
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if v > 0.6 * vmax else "black")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------- ROC
def plot_roc(y_true, y_score, out_png, class_names: Sequence[str] | None = None, *, title: str | None = None) -> str:
    """One-vs-rest ROC curve per class, with per-class and macro AUC in the legend.

    Args:
        y_true: array [N]. True class indices (or one-hot [N, C]).
        y_score: array [N, C] of class scores/probabilities; [N] (or [N, 1]) for a
            binary problem (score of class 1).
        out_png: str. Output path.
        class_names: list[str]. Names of the classes.
        title: str. Figure title.

    Returns:
        str. ``out_png``. Classes absent from ``y_true`` get no curve and are
        left out of the macro AUC (noted in the legend).

    Example:
        >>> plot_roc([0, 1, 1, 0], [0.1, 0.8, 0.6, 0.3], "roc.png")
        'roc.png'
    """
    from sklearn.metrics import auc, roc_curve

    t = _labels_1d(y_true, "y_true")
    s = np.asarray(y_score, dtype=float)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim == 1:
        s = np.stack([1.0 - s, s], axis=1)
        binary = True
    else:
        binary = s.shape[1] == 2
    if s.shape[0] != t.shape[0]:
        raise DataError(f"y_true has {t.shape[0]} rows but y_score has {s.shape[0]}")
    k = s.shape[1]
    if t.size and t.max() >= k:
        raise DataError(f"y_true uses class {t.max()} but y_score has only {k} columns")
    names = _class_names(k, class_names)
    fig = _figure(5.6, 5.0)
    ax = fig.subplots()
    aucs, absent = [], []
    cmap = _cmap("tab10" if k <= 10 else "tab20")
    for c in range(1 if binary else 0, k):
        pos = t == c
        if pos.all() or not pos.any():
            absent.append(names[c])
            continue
        fpr, tpr, _ = roc_curve(pos.astype(int), s[:, c])
        a = auc(fpr, tpr)
        aucs.append(a)
        ax.plot(fpr, tpr, color=cmap(c % cmap.N), lw=1.5, label=f"{names[c]} (AUC {a:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    header = f"AUC {aucs[0]:.3f}" if binary and aucs else f"macro AUC {np.mean(aucs):.3f}" if aucs else "AUC n/a"
    if absent:
        header += f" (no curve: {', '.join(absent)})"
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or "ROC (one-vs-rest)", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(title=header, fontsize=7, title_fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------- embedding
def plot_embedding(
    features,
    labels,
    out_png,
    class_names: Sequence[str] | None = None,
    *,
    method: str = "auto",
    seed: int = 0,
    max_points: int = 5000,
    title: str | None = None,
) -> str:
    """2-D scatter of embeddings coloured by class (t-SNE, or PCA).

    Args:
        features: array [N, D]. Embeddings (e.g. encoder outputs).
        labels: array [N]. Class indices.
        out_png: str. Output path.
        class_names: list[str]. Names of the classes.
        method: str. ``"tsne"``, ``"pca"`` or ``"auto"`` (t-SNE, PCA below 10 points).
        seed: int. Random seed (t-SNE and subsampling).
        max_points: int. Random subsample above this many points (t-SNE is O(N log N)).
        title: str. Figure title.

    Returns:
        str. ``out_png``.

    Example:
        >>> plot_embedding(np.random.rand(50, 8), np.arange(50) % 3, "emb.png", method="pca")
        'emb.png'
    """
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(x.shape[0], -1) if x.ndim > 1 else x[:, None]
    y = _labels_1d(labels, "labels")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{x.shape[0]} feature rows but {y.shape[0]} labels")
    if x.shape[0] < 2:
        raise DataError("an embedding plot needs at least 2 points")
    if not np.isfinite(x).all():
        raise DataError("the features contain NaN or inf; the encoder may have diverged")
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_points:
        keep = np.sort(rng.choice(x.shape[0], max_points, replace=False))
        x, y = x[keep], y[keep]
    n = x.shape[0]
    if method not in ("auto", "tsne", "pca"):
        raise DataError(f"method must be 'auto', 'tsne' or 'pca', got {method!r}")
    use = "pca" if (method == "pca" or (method == "auto" and n < 10)) else "tsne"
    if use == "tsne" and n < 4:
        use = "pca"
    if x.shape[1] == 1:
        xy = np.concatenate([x, np.zeros_like(x)], axis=1)
        use = "raw"
    elif use == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(x - x.mean(axis=0))
    else:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        # Exact t-SNE is faster than Barnes-Hut for a few hundred points.
        tsne_method = "exact" if n <= 500 else "barnes_hut"
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                  method=tsne_method).fit_transform(x)
    k = int(y.max()) + 1 if y.size else 1
    if class_names is not None:
        k = max(k, len(class_names))
    names = _class_names(k, class_names)
    cmap = _cmap("tab10" if k <= 10 else "tab20")
    fig = _figure(6.2, 5.0)
    ax = fig.subplots()
    size = 40 if n < 50 else 14 if n <= 2000 else 5
    for c in range(k):
        m = y == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(c % cmap.N), label=names[c], alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    label = {"tsne": "t-SNE", "pca": "PCA", "raw": "feature"}[use]
    ax.set_title(title or f"{label} of {n} embeddings", fontsize=11)
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------- CKA
def plot_cka_heatmap(cka, out_png, *, title: str | None = None, xlabel: str | None = None,
                     ylabel: str | None = None, annotate: bool | None = None, cmap: str = "magma") -> str:
    """Heat map of a layer-by-layer CKA matrix (from :func:`histokd.analysis.cka.cka_matrix`).

    Args:
        cka: DataFrame [layers A × layers B] or array (a path to a CSV written by
            ``DataFrame.to_csv`` also works).
        out_png: str. Output path.
        title: str. Figure title.
        xlabel, ylabel: str. Axis labels (default: the DataFrame's axis names).
        annotate: bool. Write the values in the cells (default: when <= 16 × 16).
        cmap: str. Colormap; the scale is fixed to [0, 1].

    Returns:
        str. ``out_png``.

    Example:
        >>> plot_cka_heatmap(cka_matrix(m1, m2, ds), "plots/cka.png", title="asym vs sym")
        'plots/cka.png'
    """
    if isinstance(cka, (str, os.PathLike)):
        cka = pd.read_csv(cka, index_col=0)
    df = cka if isinstance(cka, pd.DataFrame) else pd.DataFrame(np.asarray(cka, dtype=float))
    mat = df.to_numpy(dtype=float)
    if mat.ndim != 2 or mat.size == 0:
        raise DataError(f"a CKA matrix must be a non-empty 2-D table, got shape {mat.shape}")
    r, c = mat.shape
    fig = _figure(min(18, 2.5 + 0.38 * c), min(18, 2.0 + 0.32 * r))
    ax = fig.subplots()
    # rows from bottom (first layer) to top, as usual for CKA plots
    im = ax.imshow(mat, cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
    fs = 8 if max(r, c) <= 20 else 6 if max(r, c) <= 40 else 4
    ax.set_xticks(range(c))
    ax.set_yticks(range(r))
    ax.set_xticklabels([str(v) for v in df.columns], rotation=90, fontsize=fs)
    ax.set_yticklabels([str(v) for v in df.index], fontsize=fs)
    ax.set_xlabel(xlabel or (df.columns.name or "model B layer"))
    ax.set_ylabel(ylabel or (df.index.name or "model A layer"))
    if annotate if annotate is not None else max(r, c) <= 16:
        for i in range(r):
            for j in range(c):
                v = mat[i, j]
                ax.text(j, i, "nan" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=fs - 1,
                        color="black" if (np.isfinite(v) and v > 0.6) else "white")
    ax.set_title(title or "linear CKA", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_cka_regimes(summary, out_png, *, title: str | None = None) -> str:
    """Per-layer mean CKA for each regime pair (More From Less Fig. 2b).

    Args:
        summary: DataFrame [layers × "regimeA/regimeB"] from
            :func:`histokd.analysis.cka.regime_summary`.
        out_png: str. Output path.
        title: str. Figure title.

    Returns:
        str. ``out_png``.

    Example:
        >>> plot_cka_regimes(regime_summary(models, ds), "plots/cka_regimes.png")
        'plots/cka_regimes.png'
    """
    df = summary if isinstance(summary, pd.DataFrame) else pd.read_csv(summary, index_col=0)
    if df.empty:
        raise DataError("the CKA summary is empty; nothing to plot")
    n = len(df.index)
    fig = _figure(min(16, 4.0 + 0.22 * n), 4.2)
    ax = fig.subplots()
    x = np.arange(n)
    cmap = _cmap("tab10")
    for i, col in enumerate(df.columns):
        a, _, b = str(col).partition("/")
        ax.plot(x, df[col].to_numpy(dtype=float), "-" if a == b else "--", marker="o", markersize=3,
                color=cmap(i % 10), label=str(col))
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in df.index], rotation=90, fontsize=7 if n <= 30 else 5)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("mean CKA")
    ax.set_xlabel(df.index.name or "layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title or "CKA between training regimes (same layer)", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_png)
