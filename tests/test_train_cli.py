"""End to end: `histokd train` on tiny data writes a run whose exported classifier reloads
and predicts; a run killed mid-epoch resumes and finishes with the same number of steps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import keras

import histokd  # noqa: F401
from histokd.cli import main

TINY = """
base: default
name: {name}
output_dir: {out}
data:
  image_size: 32
  synthetic_per_class: 24
  synthetic_classes: 3
views:
  downsample: 8
model:
  backbone_kwargs: {{width: 0.25, small_input: true}}
  expander_dims: [32, 32, 32]
train:
  epochs: {epochs}
  batch_size: 8
  verbose: 0
  checkpoint_every: {every}
eval:
  probe_epochs: 5
  embedding_plot: false
"""


def tiny_config(tmp_path, name="tiny", epochs=2, every=0, extra=""):
    p = tmp_path / f"{name}.yaml"
    p.write_text(TINY.format(name=name, out=tmp_path / "runs", epochs=epochs, every=every) + extra)
    return p


@pytest.mark.slow
def test_train_writes_run_that_reloads_and_predicts(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert main(["--quiet", "train", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "a (downsampled 8px)" in out and "b (full)" in out
    run = tmp_path / "runs" / "tiny"
    for f in ("config.yaml", "history.csv", "metrics.json", "export/metadata.json",
              "export/encoder_a.keras", "export/encoder_b.keras", "export/classifier_a.keras",
              "export/classifier_b.keras", "checkpoints/last.weights.h5"):
        assert (run / f).exists(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 * metrics["train"]["steps_per_epoch"]
    acc = metrics["evaluation"]["b (full)"]["1.0"]["accuracy"]
    assert 0.0 <= acc <= 1.0
    meta = json.loads((run / "export/metadata.json").read_text())
    assert meta["downsample"] == 8 and len(meta["class_names"]) == 3
    # reload with only `import histokd` and predict on uint8 images
    clf = keras.saving.load_model(run / "export/classifier_a.keras")
    x = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    p = clf.predict(x, verbose=0)
    assert p.shape == (3, 3) and np.allclose(p.sum(1), 1, atol=1e-5)
    # histokd predict on image files
    import cv2

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(2):
        cv2.imwrite(str(img_dir / f"{i}.png"), x[i])
    assert main(["predict", str(run / "export"), str(img_dir), "--out", str(tmp_path / "p.csv")]) == 0
    import pandas as pd

    df = pd.read_csv(tmp_path / "p.csv")
    assert len(df) == 2 and set(df.prediction) <= set(meta["class_names"])


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--config", "nope_config"]) == 2
    err = capsys.readouterr().err
    assert "histokd: error:" in err and "histokd configs" in err
    assert main(["train", "--set", "train.epoch=1"]) == 2
    assert "Did you mean 'epochs'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a histokd run directory" in capsys.readouterr().err


def test_configs_lists(capsys):
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "more_from_less/table1_asymmetric_7px" in out


@pytest.mark.slow
def test_killed_run_resumes_with_same_step_count(tmp_path):
    cfg = tiny_config(tmp_path, name="killme", epochs=3, every=2)
    run = tmp_path / "runs" / "killme"
    meta = run / "checkpoints" / "backup" / "training_metadata.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "histokd.cli", "--quiet", "train", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if meta.exists():
            try:
                it = json.loads(meta.read_text())["optimizer_iterations"]
            except (ValueError, KeyError):
                it = 0
            if it >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = it
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed"
    assert not (run / "metrics.json").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming" in res.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3 * metrics["train"]["steps_per_epoch"]
    # a fresh `histokd train` process sizes TensorFlow's pools per train.cpu_threads=auto
    from histokd.runtime import cpu_thread_plan

    from histokd.runtime import available_cpus

    plan = cpu_thread_plan("auto", "vicreg", cpus=available_cpus())
    expected = {"intra_op": plan[0], "inter_op": plan[1]} if plan else {"intra_op": 0, "inter_op": 0}
    assert metrics["train"]["cpu_threads"] == expected


def test_cpu_thread_plan():
    from histokd.config import parse_cpu_threads
    from histokd.errors import ConfigError
    from histokd.runtime import cpu_thread_plan

    # auto: one group of cores per view for two-view methods on CPU, TF's defaults otherwise
    assert cpu_thread_plan("auto", "vicreg", cpus=2) == (1, 2)
    assert cpu_thread_plan("auto", "simclr", cpus=16) == (8, 2)
    assert cpu_thread_plan("auto", "moby", cpus=3) == (1, 2)
    assert cpu_thread_plan("auto", "vicreg", cpus=1) is None
    assert cpu_thread_plan("auto", "vicreg", cpus=8, gpus=1) is None
    assert cpu_thread_plan("auto", "supervised", cpus=8) is None
    assert cpu_thread_plan("default", "vicreg", cpus=8) is None
    assert cpu_thread_plan("3, 1", "supervised", cpus=8, gpus=2) == (3, 1)
    assert cpu_thread_plan("auto", "supervised", cpus=8, streams=4) == (2, 4)  # streams win
    assert parse_cpu_threads("AUTO") == "auto"
    for bad in ("fast", "0,2", "1", "1,2,3", "-1,2"):
        with pytest.raises(ConfigError, match="INTRA,INTER"):
            parse_cpu_threads(bad)


def test_cpu_threads_config_key_validated(tmp_path, capsys):
    cfg = tiny_config(tmp_path, name="threads")
    rc = main(["train", "--config", str(cfg), "--set", "train.cpu_threads=many"])
    assert rc != 0
    assert "train.cpu_threads" in capsys.readouterr().err


def test_explicit_cpu_threads_warn_when_tensorflow_already_runs():
    import tensorflow as tf

    from histokd.runtime import apply_cpu_threads

    tf.constant(1.0) + 1.0  # TensorFlow is running in this process: pools are fixed
    before = (tf.config.threading.get_intra_op_parallelism_threads(),
              tf.config.threading.get_inter_op_parallelism_threads())
    if before == (5, 3):
        pytest.skip("pools happen to be (5, 3) already")
    with pytest.warns(UserWarning, match="fresh process"):
        assert apply_cpu_threads("5,3", "vicreg") is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto stays quiet in a notebook that ran TF first
        apply_cpu_threads("auto", "vicreg")
    assert (tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads()) == before
