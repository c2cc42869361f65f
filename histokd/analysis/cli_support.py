"""What ``histokd analyze cka`` and ``histokd analyze gradcam`` do, on run directories and files.

* :func:`cka_runs` — layer-by-layer CKA between the exported encoders of several
  runs (More From Less §3.3, Fig. 2): each encoder reads the input it was trained
  on (a sparse-branch encoder the downsampled tiles, a dense one the full tiles),
  and a CSV + heat map is written per pair of encoders.
* :func:`gradcam_images` — GradCAM overlays of an exported classifier on image
  files (Fig. 3 / Fig. S5).

Example:
    >>> cka_runs(["runs/asym", "runs/sym"], out_dir="cka", max_batches=20)
    ['cka/asym_a__sym_a.csv', 'cka/asym_a__sym_a.png', ...]
    >>> gradcam_images("runs/asym/export/classifier_a.keras", ["tile.png"], ["conv1_conv"], "gc.png")
    'gc.png'
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import List, Sequence

import numpy as np

from histokd.errors import ConfigError, DataError

__all__ = ["cka_runs", "gradcam_images", "run_encoder_units", "list_images", "read_images"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


def _run_config(run_dir: Path):
    from histokd.config import config_from_dict, load_yaml

    p = run_dir / "config.yaml"
    if not p.exists():
        raise DataError(f"{run_dir} is not a histokd run directory (no config.yaml); pass the folder "
                        "`histokd train` printed")
    return config_from_dict(load_yaml(p))


def run_encoder_units(run_dirs: Sequence) -> list:
    """One entry per distinct exported encoder of each run.

    Returns:
        list of dicts with ``label`` (``"<run>_<branch>"``), ``run``, ``branch``,
        ``input`` (full/downsampled/mask), ``downsample`` and ``encoder``.
    """
    from histokd.evaluation.transfer import load_run_encoders

    units = []
    names = [Path(r).resolve().name for r in run_dirs]
    for run, name in zip(run_dirs, names):
        run = Path(run)
        # disambiguate runs with the same folder name
        label = name if names.count(name) == 1 else _slug(str(run))
        seen = {}
        for branch, enc in load_run_encoders(run).items():
            key = (id(enc.encoder), enc.input, enc.downsample)
            if key in seen:  # shared weights read the same input: one unit
                continue
            seen[key] = branch
            units.append({"label": f"{label}_{branch}", "run": run, "branch": branch, "input": enc.input,
                          "downsample": enc.downsample, "encoder": enc.encoder})
    return units


def _analysis_source(run_dirs, data, cfg):
    """(source, split) used for the analysis."""
    if data is None:
        from histokd.data.datasets import build_data

        source = build_data(cfg)
    else:
        from histokd.data import source_from_path

        synthetic = str(data).lower() in ("synthetic", "demo")
        # a user-given folder/CSV is used whole (no validation split carved out)
        source = source_from_path(data, val_fraction=0.0 if not synthetic else cfg.data.val_fraction,
                                  test_fraction=None if synthetic else 0.0, seed=cfg.data.seed,
                                  image_size=cfg.data.image_size,
                                  synthetic_per_class=cfg.data.synthetic_per_class,
                                  synthetic_classes=cfg.data.synthetic_classes)
    for split in ("test", "val", "train"):
        if source.num_examples(split) > 0:
            return source, split
    raise DataError(f"the analysis data {data or 'of ' + str(run_dirs[0])} has no images")


def _input_fn(unit):
    """Dataset element (images uint8, labels) → float [0, 1] input of this unit's encoder."""
    if unit["input"] == "downsampled":
        from histokd.data.views import downsample_batch

        r = int(unit["downsample"])

        def fn(batch):
            return downsample_batch(batch[0], r).numpy()
    else:

        def fn(batch):
            return np.asarray(batch[0]).astype(np.float32) / 255.0

    return fn


def cka_runs(
    run_dirs: Sequence,
    data=None,
    out_dir="cka",
    layers=None,
    kernel: str = "linear",
    max_batches: int | None = None,
    *,
    branches: Sequence[str] | None = None,
    batch_size: int = 64,
    spatial_pool=None,
    progress: bool = True,
) -> List[str]:
    """Layer-by-layer CKA between the exported encoders of runs (``histokd analyze cka``).

    More From Less §3.3 / Fig. 2: "we use centered kernel alignment (CKA) to
    compare the outputs of each convolutional layer of each model". Every
    exported encoder of every run (``export/encoder_<branch>.keras``) is compared
    with every encoder of every *other* run (with a single run: its branches with
    each other). Each encoder reads the input kind it was trained on
    (``metadata.json``: a downsampled branch sees the tiles downsampled to its
    size and resized back, a full branch the tiles themselves). Branches that
    read nuclear-type masks are skipped with a note (no mask data here).

    Args:
        run_dirs: list of run directories.
        data: None | str. Analysis images: None = the first run's data
            (its test split, else val, else train); a path (image folder, manifest
            CSV, MedMNIST .npz, prepared TFRecord folder) or ``"synthetic"``: its
            test split if it has one, else all its images.
        out_dir: str. Output folder (created).
        layers: None | str | list[str]. Layers compared: None = every convolution
            layer (the paper's choice); a regex (``"_out$"`` for ResNet block
            outputs) or a list of names.
        kernel: str. ``linear`` or ``rbf``.
        max_batches: int | None. Use only the first batches of the data.
        branches: list[str] | None. Only these branches (e.g. ``["a"]`` for the
            sparse encoders of asymmetric/symmetric runs).
        batch_size: int. Minibatch size of the minibatch CKA estimate.
        spatial_pool: None | "avg" | int. Pool big conv maps first (see ``cka_matrix``).
        progress: bool. Progress bars.

    Returns:
        list[str]. Written files: per pair ``<A>__<B>.csv`` and ``<A>__<B>.png``.

    Example:
        >>> cka_runs(["runs/asym7", "runs/sym7"], branches=["a"], layers="_out$")
    """
    from histokd.analysis.cka import cka_matrix
    from histokd.analysis.plots import plot_cka_heatmap
    from histokd.data.datasets import eval_dataset, stain_fn

    run_dirs = [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ConfigError("histokd analyze cka needs at least one run directory")
    cfg = _run_config(run_dirs[0])
    for r in run_dirs[1:]:
        _run_config(r)  # fail early on a folder that is not a run
    units = run_encoder_units(run_dirs)
    if branches is not None:
        units = [u for u in units if u["branch"] in set(branches)]
    usable = []
    for u in units:
        if u["input"] == "mask":
            print(f"[histokd] skipping {u['label']}: it reads nuclear-type masks, and the analysis data "
                  "holds images only")
        else:
            usable.append(u)
    if len(run_dirs) == 1:
        pairs = list(itertools.combinations(usable, 2))
    else:
        pairs = [(a, b) for a, b in itertools.combinations(usable, 2) if a["run"] != b["run"]]
    if not pairs:
        raise ConfigError(
            f"nothing to compare: {len(usable)} image encoder(s) in {len(run_dirs)} run(s) "
            f"({', '.join(u['label'] for u in usable) or 'none'}); give two runs, or one run with two "
            "image branches, and check --branches")

    source, split = _analysis_source(run_dirs, data, cfg)
    ds = eval_dataset(cfg, source, split, stain=stain_fn(cfg), batch_size=batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, info = [], []
    for a, b in pairs:
        df = cka_matrix(a["encoder"], b["encoder"], ds, layers_a=layers, kernel=kernel,
                        batches=max_batches, progress=progress, input_key=_input_fn(a),
                        input_key_b=_input_fn(b), spatial_pool=spatial_pool)
        df.index.name = f"{a['label']} ({_describe(a)})"
        df.columns.name = f"{b['label']} ({_describe(b)})"
        stem = out / f"{_slug(a['label'])}__{_slug(b['label'])}"
        df.to_csv(stem.with_suffix(".csv"))
        plot_cka_heatmap(df, stem.with_suffix(".png"),
                         title=f"{kernel} CKA: {a['label']} vs {b['label']} ({split} split)")
        written += [str(stem.with_suffix(".csv")), str(stem.with_suffix(".png"))]
        info.append({"a": a["label"], "a_input": _describe(a), "b": b["label"], "b_input": _describe(b),
                     "csv": stem.with_suffix(".csv").name, "png": stem.with_suffix(".png").name})
    (out / "cka_runs.json").write_text(json.dumps({
        "runs": [str(r) for r in run_dirs], "data": str(data) if data else f"{run_dirs[0]} config",
        "split": split, "kernel": kernel, "layers": layers, "max_batches": max_batches,
        "pairs": info}, indent=2))
    written.append(str(out / "cka_runs.json"))
    return written


def _describe(unit) -> str:
    return f"{unit['downsample']} px" if unit["input"] == "downsampled" else unit["input"]


def list_images(paths: Sequence) -> List[Path]:
    """Image files named by ``paths`` (files, or every image in folders, sorted)."""
    files = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in _IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"image {p} does not exist")
    if not files:
        raise DataError("no images given: pass image files or folders of images")
    return files


def read_images(paths: Sequence, size: int):
    """Decode image files (or every image in folders) to uint8 ``[N, size, size, 3]``.

    Returns:
        (images, list of paths).
    """
    import tensorflow as tf

    from histokd.data import decode_image_file

    files = list_images(paths)
    out = []
    for f in files:
        img = decode_image_file(str(f))
        if img.shape[:2] != (size, size):
            img = tf.image.resize(img, (size, size), antialias=True).numpy().round().clip(0, 255)
        out.append(np.asarray(img).astype(np.uint8))
    return np.stack(out), files


def gradcam_images(model_path, images: Sequence, layers=None, out="gradcam.png", *,
                   class_index=None, max_images: int = 16) -> str:
    """GradCAM overlays of an exported classifier on image files (``histokd analyze gradcam``).

    More From Less §3.3, Fig. 3 / Fig. S5. The classifier (``export/classifier_<branch>.keras``,
    uint8 images in, preprocessing — stain normalisation, downsampling — inside) is
    loaded with :func:`histokd.export.load_classifier`; images are decoded and
    resized to its input size; the figure has one row per image and one column
    per layer.

    Args:
        model_path: str. A classifier ``.keras`` file or a run's ``export/`` folder.
        images: list of image files or folders.
        layers: None | str | list[str]. Layer names or paths inside the classifier
            (e.g. ``conv1_conv``, ``encoder_a/conv2_block1_1_conv``); None = the
            last convolution layer.
        out: str. Output PNG.
        class_index: None | int. Class to explain (None: the predicted class).
        max_images: int. At most this many images (rows).

    Returns:
        str. The PNG path.

    Example:
        >>> gradcam_images("runs/asym/export", ["tiles/"], ["conv1_conv", "conv5_block2_2_conv"])
    """
    from histokd.analysis import _taps
    from histokd.analysis.gradcam import gradcam_grid
    from histokd.export import load_classifier

    files = list_images(images)  # fail on a wrong path before loading the model
    if len(files) > max_images:
        print(f"[histokd] {len(files)} images given; showing the first {max_images}")
        files = files[:max_images]
    model, meta = load_classifier(model_path)
    imgs, files = read_images(files, int(model.input_shape[1]))
    if layers is None:
        convs = [p for p, l in _taps.iter_layers(model) if _taps.is_conv(l)]
        if not convs:
            raise ConfigError(f"{model_path} has no convolution layer; pass --layer NAME")
        layers = [convs[-1]]
    elif isinstance(layers, str):
        layers = [layers]
    name = Path(model_path).stem if Path(model_path).suffix == ".keras" else model.name
    names = meta.get("class_names")
    row_labels = [f.name for f in files]
    if names:
        probs = model.predict(imgs, verbose=0)
        row_labels = [f"{f.name}\n{names[int(p.argmax())]}" for f, p in zip(files, probs)]
    return gradcam_grid({name: model}, imgs, list(layers), str(out),
                        class_index=class_index, row_labels=row_labels)
