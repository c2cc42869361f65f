"""Tests for histokd.analysis.plots: each function writes a readable, non-blank PNG."""

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from histokd.analysis import plots as P
from histokd.errors import DataError

NAMES = ["ADI", "BACK", "DEB", "LYM"]


def _check_png(path, min_side=150):
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side
    assert img[..., :3].std() > 0.02  # not blank
    return img


def _history(tmp_path):
    e = np.arange(6)
    df = pd.DataFrame({"epoch": e, "loss": 3 - 0.3 * e, "val_loss": 3.2 - 0.25 * e, "invariance": 1.0 / (1 + e),
                       "val_invariance": 1.1 / (1 + e), "variance": 0.5 + 0 * e, "learning_rate": 1e-4 * (1 - e / 6)})
    path = tmp_path / "history.csv"
    df.to_csv(path, index=False)
    return path


def test_history_one_subplot_per_family(tmp_path):
    out = P.plot_history(_history(tmp_path), tmp_path / "plots" / "history.png", title="run")
    assert out.endswith("history.png")
    img = _check_png(out)
    assert img.shape[1] > img.shape[0]  # 4 families on a 3-column grid: 2 rows x 3 columns
    with pytest.raises(DataError, match="does not exist"):
        P.plot_history(tmp_path / "missing.csv", tmp_path / "x.png")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        P.plot_history(tmp_path / "empty.csv", tmp_path / "x.png")


def test_confusion_matrix_counts_and_normalised(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    p = np.where(rng.random(80) < 0.6, y, rng.integers(0, 4, 80))
    _check_png(P.plot_confusion_matrix(y, p, tmp_path / "cm.png", NAMES, title="masks"))
    scores = np.eye(4)[p]  # [N, C] scores → argmax
    _check_png(P.plot_confusion_matrix(y, scores, tmp_path / "cm2.png", NAMES))
    _check_png(P.plot_confusion_matrix(None, [[5, 1], [0, 7]], tmp_path / "cm3.png"))
    with pytest.raises(DataError, match="class names"):
        P.plot_confusion_matrix([0, 5], [0, 5], tmp_path / "bad.png", NAMES)
    with pytest.raises(DataError, match="differ in length"):
        P.plot_confusion_matrix([0, 1], [0], tmp_path / "bad.png")


def test_roc_multiclass_binary_and_absent_class(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    s = rng.random((60, 4))
    s[np.arange(60), y] += 1
    _check_png(P.plot_roc(y, s, tmp_path / "roc.png", NAMES))  # class 3 never occurs
    yb = rng.integers(0, 2, 40)
    _check_png(P.plot_roc(yb, yb + rng.normal(0, 0.5, 40), tmp_path / "roc_bin.png"))
    with pytest.raises(DataError, match="only 2 columns"):
        P.plot_roc([0, 2], [[0.1, 0.9], [0.5, 0.5]], tmp_path / "bad.png")


def test_embedding_tsne_and_pca_fallback(tmp_path):
    rng = np.random.default_rng(2)
    y = np.arange(60) % 4
    x = rng.normal(size=(60, 8)) + 4 * np.eye(4, 8)[y]
    _check_png(P.plot_embedding(x, y, tmp_path / "tsne.png", NAMES))
    _check_png(P.plot_embedding(x[:6], y[:6], tmp_path / "pca.png", NAMES))
    with pytest.raises(DataError, match="NaN"):
        P.plot_embedding(np.full((5, 2), np.nan), np.zeros(5), tmp_path / "bad.png")


def test_cka_heatmap_and_regimes(tmp_path):
    rng = np.random.default_rng(3)
    df = pd.DataFrame(rng.random((5, 4)), index=[f"a{i}" for i in range(5)], columns=[f"b{i}" for i in range(4)])
    df.iloc[0, 0] = np.nan
    _check_png(P.plot_cka_heatmap(df, tmp_path / "cka.png", title="A vs B"))
    df.to_csv(tmp_path / "cka.csv")
    _check_png(P.plot_cka_heatmap(str(tmp_path / "cka.csv"), tmp_path / "cka2.png"))
    summary = pd.DataFrame({"asymmetric/asymmetric": np.linspace(1, 0.9, 6),
                            "asymmetric/symmetric": np.linspace(0.9, 0.4, 6)},
                           index=pd.Index([f"conv{i}" for i in range(6)], name="layer"))
    _check_png(P.plot_cka_regimes(summary, tmp_path / "reg.png"))
