"""Run directories: a run's config, its method rebuilt from the config, its trained weights.

``histokd train`` writes ``runs/<name>/config.yaml`` and ``checkpoints/last.weights.h5``;
these functions read them back (``histokd eval``, a distillation teacher, notebooks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from histokd.errors import HistokdError


def build_method(cfg, num_classes: int, total_steps=None):
    """The method ``cfg.model.method`` names, built from the config (not compiled).

    Args:
        cfg: RunConfig.
        num_classes: int. Classes of the labelled task (supervised / distillation heads).
        total_steps: int. Optimizer steps of the whole run (momentum and progressive
            schedules); None when only rebuilding to load weights.
    """
    from histokd.registry import METHODS

    return METHODS.get(cfg.model.method).from_run_config(cfg, num_classes=num_classes, total_steps=total_steps)


def load_run_config(run_dir):
    """``(Path, RunConfig)`` of a run directory written by ``histokd train``."""
    from histokd.config import config_from_dict, load_yaml

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise HistokdError(f"{run_dir} is not a histokd run directory (no config.yaml); "
                           "pass the folder `histokd train` printed")
    return run_dir, config_from_dict(load_yaml(cfg_path))


def load_trained_model(run_dir, num_classes=None):
    """Rebuild a finished run's model from its config and load its last weights.

    Args:
        run_dir: str or Path. The run directory.
        num_classes: int. Classes of the run (default: from ``export/metadata.json``, else
            from the run's data).

    Returns:
        (keras.Model, RunConfig)
    """
    run_dir, cfg = load_run_config(run_dir)
    weights = run_dir / "checkpoints" / "last.weights.h5"
    if not weights.exists():
        raise HistokdError(f"{weights} does not exist: the run has not finished an epoch yet; "
                           "run `histokd train` with the same config to resume it")
    if num_classes is None:
        meta = run_dir / "export" / "metadata.json"
        if meta.exists():
            num_classes = len(json.loads(meta.read_text())["class_names"])
        else:
            from histokd.data.datasets import build_data

            num_classes = len(build_data(cfg).class_names)
    # the checkpoint holds every weight: do not re-read the initial weights file (which may be gone)
    build_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))
    model = build_method(build_cfg, num_classes=num_classes)
    try:
        model.load_weights(weights)
    except ValueError as e:
        raise HistokdError(f"the weights in {weights} do not fit the model its config describes ({e}); "
                           "was the run directory edited by hand?") from None
    return model, cfg


__all__ = ["build_method", "load_run_config", "load_trained_model"]
