"""Tests for histokd.analysis.report: a self-contained HTML page comparing runs."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histokd.analysis.report import flatten, write_report
from histokd.errors import DataError

# a 2x2 RGB PNG
_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAFklEQVR4nGP8z8DAwMDAxMDAwMDAAAANHQEDasKb6QAAAABJRU5ErkJggg=="
)


def _run(root: Path, name: str, epochs: int, views: str, acc: float, plots=True) -> Path:
    d = root / "runs" / name
    (d / "plots").mkdir(parents=True)
    (d / "export").mkdir()
    (d / "config.yaml").write_text(
        f"name: {name}\nmethod:\n  name: vicreg\n  views: {views}\n  loss: {{lambda: 25, mu: 25, nu: 1}}\n"
        f"train:\n  epochs: {epochs}\n  batch_size: 128\n"
    )
    e = np.arange(3)
    pd.DataFrame({"epoch": e, "loss": [3.0, 2.0, 1.0 + acc], "val_loss": [3.1, 2.2, 1.5]}).to_csv(
        d / "history.csv", index=False)
    (d / "metrics.json").write_text(json.dumps(
        {"probe": {"view_a": {"accuracy": acc, "loss": 1 - acc}, "view_b": {"accuracy": 0.88}},
         "confusion_matrix": [[3, 1], [0, 4]]}))
    (d / "export" / "metadata.json").write_text(json.dumps({"input_size": [224, 224, 3], "mpp": 0.5}))
    if plots:
        (d / "plots" / "history.png").write_bytes(_PNG)
        (d / "plots" / "confusion_matrix.png").write_bytes(_PNG)
    return d


def test_flatten_nested_metrics():
    assert flatten({"probe": {"view_a": {"accuracy": 0.9}}, "x": 1, "e": {}}) == {
        "probe.view_a.accuracy": 0.9, "x": 1, "e": {}}


@pytest.fixture
def report(tmp_path):
    a = _run(tmp_path, "asym", 100, "asymmetric", 0.7743)
    b = _run(tmp_path, "sym", 50, "symmetric", 0.6926)
    out = write_report([a, b], tmp_path / "out" / "report.html")
    return Path(out)


def test_report_content_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    # config diff: only the keys that differ
    diff = text.split("Configuration differences")[1].split("<h2>")[0]
    for key in ("method.views", "train.epochs", "name"):
        assert f">{key}<" in diff
    for same in ("train.batch_size", "method.loss.lambda", "method.name"):
        assert f">{same}<" not in diff
    # flattened metrics, best accuracy in bold, lower loss in bold
    metrics = text.split("<h2>Metrics</h2>")[1].split("<h2>")[0]
    assert "probe.view_a.accuracy" in metrics and "probe.view_b.accuracy" in metrics
    assert re.search(r'class="best">0\.7743<', metrics)
    assert re.search(r'class="best">0\.2257<', metrics)
    assert "0.88" in metrics and 'class="best">0.88<' not in metrics  # a tie is not "best"
    # every plot of every run embedded, nothing fetched from outside
    assert text.count('src="data:image/png;base64,') == 4
    assert not re.search(r'(src|href)="(https?:|file:|/)', text)
    assert "input_size" in text


def test_report_single_and_missing_parts(tmp_path):
    d = tmp_path / "bare"
    d.mkdir()
    out = write_report(d, tmp_path / "r.html")
    text = Path(out).read_text()
    assert "no config.yaml" in text and "no metrics.json" in text and "No plots in this run" in text
    with pytest.raises(DataError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "r2.html")
    with pytest.raises(DataError, match="at least one"):
        write_report([], tmp_path / "r3.html")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (900, 1200)
    assert img[..., :3].var() > 0
