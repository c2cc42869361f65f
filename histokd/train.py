"""The runner: strategy → data → method → ``fit`` → linear evaluation → export.

``run(config)`` is what ``histokd train`` calls. It writes a run directory

    runs/<name>/config.yaml        the resolved config (+ hash)
    runs/<name>/checkpoints/       last weights (ModelCheckpoint) and the resumable backup
    runs/<name>/logs/              TensorBoard
    runs/<name>/history.csv        per-epoch metrics (CSVLogger; appended on resume)
    runs/<name>/metrics.json       evaluation results
    runs/<name>/plots/             training curves, confusion matrices, ROC, embeddings
    runs/<name>/export/            encoders, classifiers, metadata.json

A run killed at any point (even mid-epoch, with ``train.checkpoint_every`` steps) resumes
from its last backup when started again with the same config, and finishes with the same
number of optimizer steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import keras

from histokd.config import RunConfig
from histokd.errors import CollapseError, ConfigError, HistokdError
from histokd.data.datasets import (  # noqa: F401  (also re-exported for scripts and tests)
    branch_input_kinds,
    build_data,
    make_views,
    stain_fn,
    train_dataset,
    val_dataset,
)
from histokd.registry import METHODS
from histokd.runs import build_method, load_run_config, load_trained_model  # noqa: F401  (re-exported)
from histokd.optimizers import FusedAdam, FusedAdamW, adam, warmup_cosine  # noqa: F401  (re-exported)
from histokd.runtime import (  # noqa: F401  (re-exported: the runner's process settings)
    apply_cpu_threads,
    cpu_thread_plan,
    make_strategy,
    thread_pools,
)


# ---------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------
def build_encoder(cfg: RunConfig, name: str, backbone=None):
    """The encoder of ``cfg.model`` (see :func:`histokd.methods.base.build_encoder`)."""
    from histokd.methods.base import build_encoder as _build

    return _build(cfg, name, backbone)


def make_optimizer(cfg: RunConfig, steps_per_epoch: int):
    """Adam (AdamW with ``train.weight_decay``) with a linear warm-up then cosine decay
    (More From Less §2.2, Goyal et al. 2017)."""
    t = cfg.train
    schedule = warmup_cosine(t.lr, t.epochs * steps_per_epoch, int(round(t.warmup_epochs * steps_per_epoch)))
    return adam(schedule, t.weight_decay)


class CollapseMonitor(keras.callbacks.Callback):
    """Stops a self-supervised run whose embeddings collapsed to a point.

    Watches ``std_a``/``std_b`` (the normalised embedding std logged by JointEmbedding:
    ≈1 when embeddings spread, →0 at collapse). Below ``threshold`` at the end of an epoch
    after the first, the run stops and :attr:`message` says what to change.
    """

    def __init__(self, threshold=0.02):
        super().__init__()
        self.threshold = threshold
        self.message = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        stds = {k: logs[k] for k in ("std_a", "std_b") if k in logs}
        if not stds or epoch < 1:
            return
        low = {k: v for k, v in stds.items() if v < self.threshold}
        if low:
            self.message = (
                f"training collapsed at epoch {epoch + 1}: normalised embedding std {low} "
                f"< {self.threshold}. The encoders output (nearly) the same vector for every image. "
                "Lower train.lr, raise loss.variance (VICReg) or the batch size, or check that the "
                "two views are not identical.")
            print(f"\n[histokd] {self.message}")
            self.model.stop_training = True


class ResumableBackup(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that resumes mid-epoch.

    Keras' BackupAndRestore restores the epoch only, so a run killed mid-epoch would
    redo (and overcount) that epoch. This subclass also records the optimizer step; the
    runner reads it (:func:`read_backup_state`) and first finishes the interrupted epoch
    with exactly its remaining steps. Backups are written every ``save_freq`` steps and at
    every epoch end, atomically (weights first, then the metadata that points at them).
    """

    def _load_model(self):
        # weights and optimizer state only; the runner decides where to restart
        if os.path.exists(self._weights_path):
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(self._weights_path)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.save_freq != "epoch":
            self._save_model()

    def _save_model(self):
        super()._save_model()
        meta_path = self._training_metadata_path
        meta = {"epoch": self._current_epoch,
                "optimizer_iterations": int(self.model.optimizer.iterations.numpy())}
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, meta_path)


def read_backup_state(backup_dir: Path):
    p = Path(backup_dir) / "training_metadata.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------
def prepare_run_dir(cfg: RunConfig, overwrite=False) -> Path:
    run_dir = Path(cfg.output_dir) / cfg.name
    cfg_path = run_dir / "config.yaml"
    if run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    if cfg_path.exists():
        old = cfg_path.read_text()
        old_hash = next((line.split(":", 1)[1].strip() for line in old.splitlines()
                         if line.startswith("# config_hash:")), None)
        if old_hash and old_hash != cfg.hash():
            raise ConfigError(
                f"{run_dir} already holds a run with a different config (hash {old_hash}, now {cfg.hash()}). "
                "Pick another name (--set name=NEW), or pass --overwrite to replace it.")
    for sub in ("checkpoints", "logs", "plots", "export"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(f"# config_hash: {cfg.hash()}\n" + cfg.to_yaml())
    return run_dir


def run(cfg: RunConfig, overwrite=False, progress=True) -> dict:
    """Train, evaluate and export one run; returns the metrics dict (also in metrics.json).

    Args:
        cfg: RunConfig. A validated config (see :func:`histokd.config.load_config`).
        overwrite: bool. Delete an existing run directory of the same name first.
        progress: bool. Progress bars.
    """
    from histokd.tasks import get_task

    method_cls = METHODS.get(cfg.model.method)
    task = get_task(cfg.task)
    apply_cpu_threads(cfg.train.cpu_threads, streams=method_cls.cpu_streams)  # before TensorFlow's first op
    keras.utils.set_random_seed(cfg.train.seed)
    if cfg.train.mixed_precision:
        keras.mixed_precision.set_global_policy(cfg.train.mixed_precision)
    run_dir = prepare_run_dir(cfg, overwrite=overwrite)
    t0 = time.time()
    strategy = make_strategy(cfg.train.strategy)
    replicas = strategy.num_replicas_in_sync
    if cfg.train.batch_size % replicas:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"{replicas} replicas of the strategy")
    source = build_data(cfg)
    n_train = source.num_examples("train")
    steps = n_train // cfg.train.batch_size
    if steps < 1:
        raise ConfigError(f"the training split has {n_train} images, fewer than one batch of "
                          f"{cfg.train.batch_size}; lower train.batch_size or add data")
    if cfg.train.steps_per_epoch:
        steps = min(steps, cfg.train.steps_per_epoch)
    stain = stain_fn(cfg)
    on_device = cfg.views.augment_on == "device"
    views = make_views(cfg, training=True)
    ds = train_dataset(cfg, source, cfg.train.batch_size, None if on_device else views, stain)

    with strategy.scope():
        model = build_method(cfg, num_classes=len(source.class_names), total_steps=cfg.train.epochs * steps)
        if replicas > 1:
            from histokd.methods.base import synchronize_batchnorm

            synchronize_batchnorm(model)
        if on_device:
            model.view_maker = views
        model.compile(optimizer=make_optimizer(cfg, steps), jit_compile=cfg.train.jit_compile,
                      **method_cls.compile_defaults(cfg))
        # build the optimizer state now: one trace of the train step instead of two
        model.optimizer.build(model.trainable_variables)

    val_ds = val_dataset(cfg, source, None if on_device else views, stain)

    backup_dir = run_dir / "checkpoints" / "backup"
    state = read_backup_state(backup_dir)
    monitor = CollapseMonitor(cfg.train.collapse_threshold)
    save_freq = cfg.train.checkpoint_every or "epoch"

    def callbacks():
        return [
            ResumableBackup(str(backup_dir), save_freq=save_freq, delete_checkpoint=False,
                            double_checkpoint=True),
            keras.callbacks.ModelCheckpoint(str(run_dir / "checkpoints" / "last.weights.h5"),
                                            save_weights_only=True),
            keras.callbacks.TensorBoard(str(run_dir / "logs"), write_graph=False),
            keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
            keras.callbacks.TerminateOnNaN(),
            monitor,
        ]

    verbose = cfg.train.verbose if progress else 0
    done_steps = state.get("optimizer_iterations", 0) if state else 0
    total_steps = cfg.train.epochs * steps
    if done_steps >= total_steps and (run_dir / "checkpoints" / "last.weights.h5").exists():
        model.load_weights(run_dir / "checkpoints" / "last.weights.h5")
    else:
        if state:
            epoch, within = divmod(done_steps, steps)
            print(f"[histokd] resuming {run_dir} at epoch {epoch + 1}, step {within} "
                  f"({done_steps}/{total_steps} steps done)")
            if within:
                # finish the interrupted epoch with exactly its remaining steps
                model.fit(ds, initial_epoch=epoch, epochs=epoch + 1, steps_per_epoch=steps - within,
                          validation_data=val_ds, callbacks=callbacks(), verbose=verbose, shuffle=False)
        done = int(model.optimizer.iterations.numpy())
        if state and not done:  # the backup is loaded by the callback; read its step count
            done = done_steps - done_steps % steps
        if not monitor.message and done < total_steps:
            model.fit(ds, initial_epoch=done // steps, epochs=cfg.train.epochs, steps_per_epoch=steps,
                      validation_data=val_ds, callbacks=callbacks(), verbose=verbose, shuffle=False)
        model.save_weights(run_dir / "checkpoints" / "last.weights.h5")
    steps_done = int(model.optimizer.iterations.numpy())
    if monitor.message:
        (run_dir / "COLLAPSED.txt").write_text(monitor.message + "\n")
        raise CollapseError(monitor.message)
    if not np.isfinite(_last_loss(run_dir)):
        raise HistokdError(f"training produced a non-finite loss (see {run_dir / 'history.csv'}); "
                           "lower train.lr or enable stain normalisation for badly stained data")
    train_seconds = time.time() - t0

    # the task evaluates what the method produced (model.evaluation_model(): a distiller's student)
    results = task.evaluate(cfg, model, source, run_dir, stain=stain, progress=progress)
    results["train"] = {"steps": steps_done, "steps_per_epoch": steps, "epochs": cfg.train.epochs,
                        "seconds": round(train_seconds, 1), "replicas": replicas,
                        "config_hash": cfg.hash(),
                        # TensorFlow's thread pools during the run (0 = TensorFlow's default)
                        "cpu_threads": thread_pools()}
    if stain is not None:
        results["stain"] = stain.counts()  # tiles seen / passed through unchanged (robustness policy)
    task.export(cfg, model, results, source, run_dir, stain=stain)
    results.pop("_heads", None)
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    try:
        from histokd.analysis.plots import plot_history

        plot_history(run_dir / "history.csv", run_dir / "plots" / "training_curves.png")
    except (ImportError, ValueError, KeyError) as e:  # plots never fail a finished run
        print(f"[histokd] could not draw training curves: {e}")
    shutil.rmtree(backup_dir, ignore_errors=True)
    return results


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _last_loss(run_dir: Path) -> float:
    import pandas as pd

    p = run_dir / "history.csv"
    if not p.exists():
        return float("nan")
    h = pd.read_csv(p)
    return float(h["loss"].iloc[-1]) if len(h) else float("nan")


def results_table(results: dict) -> str:
    """A plain-text table of a run's results (its task's summary)."""
    from histokd.tasks import get_task

    return get_task(results.get("task", "classification")).summary(results)


def steps_for(cfg: RunConfig, n_train: int) -> int:
    steps = max(1, n_train // cfg.train.batch_size)
    return min(steps, cfg.train.steps_per_epoch) if cfg.train.steps_per_epoch else steps


__all__ = ["run", "make_strategy", "build_method", "make_optimizer", "FusedAdam", "FusedAdamW", "CollapseMonitor",
           "results_table", "load_run_config", "load_trained_model"]
