"""Train or fine-tune HoVer-Net on a folder of image + instance-mask pairs.

Graham et al., HoVer-Net (MedIA 2019) §3.4 and the official schedule
(hover_net ``models/hovernet/opt.py``): Adam (lr 1e-4, betas 0.9/0.999), a first
phase with the encoder frozen, then everything trainable, the learning rate ×0.1
after ``lr_step`` epochs of each phase. Targets come from
:mod:`histokd.nuclei.targets`, the loss from :mod:`histokd.losses.hovernet`
(``HoVerNet.compute_loss``). Used to adapt the nuclear-mask model of More From
Less §2.1 to a user's own annotated tiles.

Folder layout (either form, files matched by name):

* ``NAME.png|jpg|tif`` + ``NAME_inst.npy|png|tif`` (instance ids, 0 background)
  [+ ``NAME_type.npy|png`` (type id per pixel)];
* hover_net's extracted patches ``NAME.npy`` of shape [H, W, 4 or 5] = RGB,
  instance ids[, type ids].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from histokd.errors import ConfigError, DataError
from histokd.nuclei.targets import hv_map

Sample = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]


def _read_label(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"cannot read label map {path}; write it as .npy or a 16-bit PNG/TIFF")
    return arr if arr.ndim == 2 else arr[..., 0]


def load_training_pairs(folder) -> List[Sample]:
    """Read ``(image uint8 [H,W,3], inst_map int32 [H,W], type_map int32 [H,W] or None)`` samples.

    Example:
        >>> samples = load_training_pairs("my_annotations/")  # doctest: +SKIP
    """
    from histokd.nuclei.masks import IMAGE_EXTENSIONS, read_rgb

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"training folder {folder} does not exist")
    samples: List[Sample] = []
    for path in sorted(folder.iterdir()):
        stem = path.stem
        if path.suffix == ".npy" and not stem.endswith(("_inst", "_type")):
            arr = np.load(path)
            if arr.ndim != 3 or arr.shape[-1] not in (4, 5):
                raise DataError(f"{path}: expected a hover_net patch [H, W, 4|5] (RGB, inst[, type]); "
                                f"got shape {arr.shape}")
            samples.append((arr[..., :3].astype(np.uint8), arr[..., 3].astype(np.int32),
                            arr[..., 4].astype(np.int32) if arr.shape[-1] == 5 else None))
        elif path.suffix.lower() in IMAGE_EXTENSIONS and not stem.endswith(("_inst", "_type")):
            inst_p = [p for p in folder.glob(f"{stem}_inst.*")]
            if not inst_p:
                raise DataError(f"{path} has no instance map {stem}_inst.npy/.png/.tif next to it")
            type_p = [p for p in folder.glob(f"{stem}_type.*")]
            image = read_rgb(path)
            inst = _read_label(inst_p[0]).astype(np.int32)
            types = _read_label(type_p[0]).astype(np.int32) if type_p else None
            if inst.shape != image.shape[:2] or (types is not None and types.shape != inst.shape):
                raise DataError(f"{path}: image {image.shape[:2]}, instance map {inst.shape} and type "
                                f"map {None if types is None else types.shape} must have the same size")
            samples.append((image, inst, types))
    if not samples:
        raise DataError(f"no training pairs in {folder}: expected NAME.png + NAME_inst.npy (or hover_net "
                        "NAME.npy patches)")
    return samples


def _pad_to(x: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(0, size - x.shape[0]), max(0, size - x.shape[1])
    if ph == 0 and pw == 0:
        return x
    pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)) + ((0, 0),) * (x.ndim - 2)
    return np.pad(x, pad, mode="reflect" if x.dtype == np.uint8 else "constant")


def hovernet_dataset(samples: List[Sample], input_size: int, output_size: int, num_types: int,
                     batch_size: int = 4, shuffle: bool = True, augment: bool = True, seed: int = 0,
                     repeat: bool = True):
    """A ``tf.data`` pipeline of random windows and their NP/HV(/TP) targets.

    HV maps are computed once per sample on the whole image (instances under 30
    px dropped), then windows of ``input_size`` are cut at random positions and
    the targets centre-cropped to ``output_size``. Augmentation: random
    horizontal/vertical flips, negating the matching HV channel.

    Args:
        samples: list of (image, inst_map, type_map or None).
        input_size: int. Model window (256 fast / 270 original).
        output_size: int. Model output (164 / 80).
        num_types: int. 0 = no TP target.
        batch_size: int. Batch size.
        shuffle: bool. Random window positions (False: the centre window of each sample).
        augment: bool. Random flips.
        seed: int. Random seed.
        repeat: bool. Endless stream (use ``steps_per_epoch``).

    Returns:
        tf.data.Dataset of ``(uint8 [B,S,S,3], {"np", "hv"[, "tp"]})``.
    """
    import tensorflow as tf

    if num_types and any(t is None for _, _, t in samples):
        raise DataError(f"num_types={num_types} needs a type map for every sample; some have none "
                        "(give NAME_type files or train with num_types=0)")
    prepared = []
    for image, inst, types in samples:
        hv = hv_map(inst)
        arrays = [image, (inst > 0).astype(np.int32), hv] + ([types] if num_types else [])
        prepared.append([_pad_to(a, input_size) for a in arrays])
    border = (input_size - output_size) // 2

    def gen():
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(prepared)) if shuffle else np.arange(len(prepared))
            for i in order:
                arrs = prepared[i]
                h, w = arrs[0].shape[:2]
                if shuffle:
                    y, x = rng.integers(0, h - input_size + 1), rng.integers(0, w - input_size + 1)
                else:
                    y, x = (h - input_size) // 2, (w - input_size) // 2
                win = [a[y:y + input_size, x:x + input_size] for a in arrs]
                if augment:
                    if rng.random() < 0.5:  # left-right: x offsets change sign
                        win = [a[:, ::-1] for a in win]
                        win[2] = win[2] * np.array([-1, 1], np.float32)
                    if rng.random() < 0.5:  # up-down: y offsets change sign
                        win = [a[::-1] for a in win]
                        win[2] = win[2] * np.array([1, -1], np.float32)
                c = slice(border, border + output_size)
                tgt = {"np": np.ascontiguousarray(win[1][c, c]), "hv": np.ascontiguousarray(win[2][c, c])}
                if num_types:
                    tgt["tp"] = np.ascontiguousarray(win[3][c, c])
                yield np.ascontiguousarray(win[0]), tgt
            if not repeat:
                return

    spec_t = {"np": tf.TensorSpec((output_size, output_size), tf.int32),
              "hv": tf.TensorSpec((output_size, output_size, 2), tf.float32)}
    if num_types:
        spec_t["tp"] = tf.TensorSpec((output_size, output_size), tf.int32)
    ds = tf.data.Dataset.from_generator(
        gen, output_signature=(tf.TensorSpec((input_size, input_size, 3), tf.uint8), spec_t))
    return ds.batch(batch_size, drop_remainder=repeat).prefetch(tf.data.AUTOTUNE)


def fine_tune_hovernet(folder, out, weights=None, mode: str = "fast", num_types: Optional[int] = None,
                       frozen_epochs: int = 50, epochs: int = 50, steps_per_epoch: int = 100,
                       batch_size: int = 4, lr: float = 1e-4, lr_step: int = 25,
                       msge_axes: str = "paper", loss_weights: Optional[Dict[str, float]] = None,
                       input_size: Optional[int] = None, seed: int = 0, verbose: int = 1):
    """Train HoVer-Net on annotated tiles with the official two-phase schedule; save ``.keras``.

    Args:
        folder: training pairs (module docstring).
        out: output folder (``hovernet.keras``, ``history.json``).
        weights: official checkpoint to start from (mode and types detected), or None
            for a random start (the official start is ImageNet pre-activation
            ResNet-50 weights, not bundled).
        mode: ``fast`` / ``original`` when starting from scratch.
        num_types: type classes incl. background (0 = none); from ``weights`` if given.
        frozen_epochs: epochs with the encoder frozen (official 50).
        epochs: epochs with everything trainable (official 50).
        steps_per_epoch: batches per epoch.
        batch_size: int. Official: 16 frozen, 4 unfrozen on GPU.
        lr: float. Adam learning rate (1e-4).
        lr_step: int. Epochs before the ×0.1 step, per phase (25).
        msge_axes: ``"paper"`` or ``"official"`` (see :mod:`histokd.losses.hovernet`).
        loss_weights: term weights (default all 1).
        input_size: window (default 256 / 270).
        seed: int.
        verbose: Keras ``fit`` verbosity.

    Returns:
        (model, history dict).

    Example:
        >>> model, hist = fine_tune_hovernet("annotated/", "runs/hovernet", weights="hovernet_fast-pannuke.pth",
        ...                                  frozen_epochs=5, epochs=5)  # doctest: +SKIP
    """
    import keras

    from histokd.losses.hovernet import HoVerNetLoss
    from histokd.nuclei.checkpoint import load_official_checkpoint
    from histokd.nuclei.hovernet import HoVerNet

    samples = load_training_pairs(folder)
    if weights is not None:
        model = load_official_checkpoint(weights, num_types=num_types, input_size=input_size)
    else:
        if num_types is None:
            raise ConfigError("num_types is required when training from scratch (0 = no type branch)")
        model = HoVerNet(mode, num_types, input_size)
    ds = hovernet_dataset(samples, model.input_size, model.output_size, model.num_types,
                          batch_size=batch_size, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    history: Dict[str, list] = {}

    def phase(n_epochs, trainable_encoder, tag):
        if n_epochs <= 0:
            return
        model.set_encoder_trainable(trainable_encoder)
        model.compile(optimizer=keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999),
                      loss=HoVerNetLoss(loss_weights, msge_axes))
        sched = keras.callbacks.LearningRateScheduler(lambda e: lr * (0.1 if e >= lr_step else 1.0))
        h = model.fit(ds, epochs=n_epochs, steps_per_epoch=steps_per_epoch, callbacks=[sched],
                      verbose=verbose, shuffle=False)  # the dataset draws random windows itself
        for k, v in h.history.items():
            history.setdefault(f"{tag}_{k}", []).extend(float(x) for x in v)

    phase(frozen_epochs, False, "frozen")
    phase(epochs, True, "full")
    model.set_encoder_trainable(True)
    model.save(out / "hovernet.keras")
    (out / "history.json").write_text(json.dumps(history, indent=1))
    return model, history


# ------------------------------------------------------------------ configs (histokd hovernet-train)
HOVERNET_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def hovernet_config_names() -> List[str]:
    """Packaged HoVer-Net training configs (``histokd/nuclei/configs/*.yaml``)."""
    return sorted(p.stem for p in HOVERNET_CONFIG_DIR.glob("*.yaml"))


def load_hovernet_config(name_or_path: str = "hovernet_fast", overrides=None) -> dict:
    """Keyword arguments of :func:`fine_tune_hovernet` from a YAML config and ``key=value`` overrides.

    Args:
        name_or_path: a packaged name (:func:`hovernet_config_names`) or a YAML file path.
        overrides: list of ``key=value`` strings (values parsed as YAML).

    Raises:
        ConfigError: unknown config, unknown key (the message lists the valid ones) or a
            value of the wrong type.

    Example:
        >>> kw = load_hovernet_config("hovernet_fast", ["epochs=5", "frozen_epochs=5"])
        >>> kw["epochs"]
        5
    """
    import inspect

    import yaml

    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = HOVERNET_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"no HoVer-Net config {name_or_path!r}; packaged: "
                          f"{', '.join(hovernet_config_names())} (or pass a YAML path)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of fine_tune_hovernet arguments")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. epochs=5)")
        key, raw = item.split("=", 1)
        data[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    params = inspect.signature(fine_tune_hovernet).parameters
    valid = [k for k in params if k not in ("folder", "out", "weights", "verbose")]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"unknown HoVer-Net training key(s) {unknown}; valid keys: {', '.join(valid)}")
    for key, value in data.items():
        default = params[key].default
        if value is None or default is None or isinstance(default, (str, dict)):
            continue
        want = float if isinstance(default, float) else type(default)
        if want is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) != (want is bool) or not isinstance(value, (int, float) if want is float else want):
            raise ConfigError(f"HoVer-Net training key {key} must be {want.__name__}, got {value!r}")
        data[key] = want(value)
    return data

