"""Evaluation of a trained run: linear probes per encoder (or the supervised head),
label fractions, metrics and plots. Called by :func:`histokd.train.run` and ``histokd eval``."""

from __future__ import annotations

import numpy as np
import keras

from histokd.evaluation.metrics import classification_metrics
from histokd.evaluation.probe import extract_features, linear_probe, stratified_subset


def _test_split(source):
    for split in ("test", "val"):
        if source.num_examples(split) > 0:
            return split
    return None


def evaluate_run(cfg, model, source, run_dir, stain=None, progress=True) -> dict:
    """Evaluate every encoder of ``model`` on the input kind it was trained on.

    More From Less §2.2: the frozen encoder's features train a softmax dense layer for
    ``eval.probe_epochs`` epochs with Adam at ``eval.probe_lr``; "for a downsampled config
    the sparse encoder is evaluated on downsampled test images and the dense encoder on
    full-resolution ones". A supervised model is evaluated with its own head. Each
    encoder reads its own input (:func:`histokd.data.datasets.branch_input`): on a
    mask_pairs source (Table 2) mask encoders get ``x["mask"]`` and image encoders
    ``x["image"]`` of the same tiles.

    Returns:
        dict with ``evaluation`` → {"<branch> (<input>)": {"<fraction>": metrics}},
        ``test_split`` and ``_heads`` (branch → (head model, preprocess spec)) for export.
    """
    from histokd.data.views import Downsample
    from histokd.data.datasets import branch_input, branch_input_kinds, eval_dataset

    split = _test_split(source)
    out = {"evaluation": {}, "test_split": split, "_heads": {}}
    if split is None:
        print("[histokd] no test or val split: skipping evaluation")
        return out
    names = list(source.class_names)
    k = len(names)
    r = cfg.views.downsample
    train_ds = eval_dataset(cfg, source, "train", stain)
    test_ds = eval_dataset(cfg, source, split, stain)
    kinds = branch_input_kinds(cfg)
    encoders = model.branch_encoders()
    cache = {}
    by_kind = {}

    def datasets_for(kind):
        # one selection per input kind; a plain image batch passes through unchanged
        if kind not in by_kind:
            by_kind[kind] = tuple(
                ds.map(lambda x, y, _k=kind: (branch_input(x, _k), y)) if isinstance(ds.element_spec[0], dict)
                else ds for ds in (train_ds, test_ds))
        return by_kind[kind]

    for branch, kind in kinds.items():
        enc = encoders[branch]
        kind_train_ds, kind_test_ds = datasets_for(kind)
        pre = Downsample(r, cfg.data.image_size) if kind == "downsampled" else None
        label = f"{branch} ({kind}{' ' + str(r) + 'px' if kind == 'downsampled' else ''})"
        key = (id(enc), kind)
        if cfg.model.method == "supervised":
            te_x, te_y = extract_features(enc, kind_test_ds, pre, progress, desc=f"{label} test")
            probs = model.head(te_x).numpy()
            m = classification_metrics(te_y, probs, names)
            out["evaluation"][label] = {"1.0": m}
            out["_heads"][branch] = {"head": model.head, "kind": kind, "encoder": enc}
            _plots(cfg, run_dir, label, te_x, te_y, probs, names)
            continue
        if key not in cache:
            tr = extract_features(enc, kind_train_ds, pre, progress, desc=f"{label} train")
            te = extract_features(enc, kind_test_ds, pre, progress, desc=f"{label} {split}")
            cache[key] = (tr, te)
        (tr_x, tr_y), (te_x, te_y) = cache[key]
        np.savez_compressed(run_dir / f"features_{branch}_{kind}.npz", train_x=tr_x, train_y=tr_y,
                            test_x=te_x, test_y=te_y)
        per = {}
        for frac in cfg.eval.label_fractions:
            idx = stratified_subset(tr_y, frac, seed=cfg.train.seed)
            head, _ = linear_probe(tr_x[idx], tr_y[idx], k, epochs=cfg.eval.probe_epochs,
                                   lr=cfg.eval.probe_lr, batch_size=cfg.eval.probe_batch_size,
                                   seed=cfg.train.seed)
            probs = head.predict(te_x, verbose=0)
            per[str(frac)] = classification_metrics(te_y, probs, names)
            if frac == max(cfg.eval.label_fractions):
                out["_heads"][branch] = {"head": head, "kind": kind, "encoder": enc}
                _plots(cfg, run_dir, label, te_x, te_y, probs, names)
        out["evaluation"][label] = per
    return out


def _plots(cfg, run_dir, label, feats, y, probs, names):
    slug = label.replace(" ", "_").replace("(", "").replace(")", "")
    try:
        from histokd.analysis import plots
    except ImportError:
        return
    pdir = run_dir / "plots"
    try:
        plots.plot_confusion_matrix(y, probs.argmax(1), pdir / f"confusion_{slug}.png", names, title=label)
        plots.plot_roc(y, probs, pdir / f"roc_{slug}.png", names, title=label)
        if cfg.eval.embedding_plot:
            plots.plot_embedding(feats, y, pdir / f"embedding_{slug}.png", names, title=label,
                                 seed=cfg.train.seed)
    except Exception as e:  # a plot must never lose a finished run's results
        print(f"[histokd] plot for {label} failed: {e}")
