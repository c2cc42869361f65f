"""Classification: linear probes per encoder (or the method's own head), label fractions,
metrics, plots, and uint8-in classifiers for export.

More From Less §2.2: the frozen encoder's features train a softmax dense layer
(``eval.probe_epochs`` epochs, Adam at ``eval.probe_lr``); "for a downsampled config the
sparse encoder is evaluated on downsampled test images and the dense encoder on
full-resolution ones". Metrics: accuracy, balanced accuracy, macro-F1, one-vs-rest AUC,
confusion matrix, ROC curves, embedding scatter.
"""

from __future__ import annotations

import numpy as np

from histokd.evaluation.metrics import classification_metrics
from histokd.evaluation.probe import extract_features, linear_probe, stratified_subset
from histokd.registry import TASKS
from histokd.tasks.base import Task


def _test_split(source):
    for split in ("test", "val"):
        if source.num_examples(split) > 0:
            return split
    return None


def evaluate_classification(cfg, model, source, run_dir, stain=None, progress=True) -> dict:
    """Evaluate every encoder of ``model`` on the input kind it was trained on.

    More From Less §2.2: the frozen encoder's features train a softmax dense layer for
    ``eval.probe_epochs`` epochs with Adam at ``eval.probe_lr``; "for a downsampled config
    the sparse encoder is evaluated on downsampled test images and the dense encoder on
    full-resolution ones". A branch whose head was trained with the method (the method's
    ``trained_heads()``: a supervised classifier) is evaluated with that head. Each
    encoder reads its own input (:func:`histokd.data.datasets.branch_input`): on a
    mask_pairs source (Table 2) mask encoders get ``x["mask"]`` and image encoders
    ``x["image"]`` of the same tiles.

    Returns:
        dict with ``evaluation`` → {"<branch> (<input>)": {"<fraction>": metrics}},
        ``test_split`` and ``_heads`` (branch → (head model, preprocess spec)) for export.
    """
    from histokd.data.views import Downsample
    from histokd.data.datasets import branch_input, eval_dataset
    from histokd.registry import METHODS

    method_cls = METHODS.get(cfg.model.method)
    model = model.evaluation_model()

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
    kinds = model.branch_input_kinds(cfg) if hasattr(model, "branch_input_kinds") else \
        method_cls.branch_input_kinds(cfg)
    encoders = model.branch_encoders()
    heads = model.trained_heads()
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
        if branch in heads:
            te_x, te_y = extract_features(enc, kind_test_ds, pre, progress, desc=f"{label} test")
            probs = np.asarray(heads[branch](te_x))
            m = classification_metrics(te_y, probs, names)
            out["evaluation"][label] = {"1.0": m}
            out["_heads"][branch] = {"head": heads[branch], "kind": kind, "encoder": enc}
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


class ClassificationTask(Task):
    """Single-label classification: probes / trained heads, metrics, plots, classifiers."""

    name = "classification"

    def evaluate(self, cfg, model, source, run_dir, stain=None, progress=True) -> dict:
        results = evaluate_classification(cfg, model, source, run_dir, stain=stain, progress=progress)
        results["task"] = self.name
        return results

    def export(self, cfg, model, results, source, run_dir, stain=None) -> dict:
        from histokd.export import export_run

        return export_run(cfg, model.evaluation_model(), results.get("_heads", {}), source, run_dir, stain=stain)

    def summary(self, results) -> str:
        rows = []
        for branch, per in results.get("evaluation", {}).items():
            for frac, m in per.items():
                rows.append((branch, frac, m["accuracy"], m["balanced_accuracy"], m["macro_f1"],
                             m["auc_ovr"] if m["auc_ovr"] is not None else float("nan")))
        head = f"{'encoder (input)':<28}{'labels':>8}{'accuracy':>10}{'bal.acc':>10}{'macroF1':>10}{'AUC':>8}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r[0]:<28}{r[1]:>8}{r[2]:>10.4f}{r[3]:>10.4f}{r[4]:>10.4f}{r[5]:>8.4f}")
        return "\n".join(lines)


TASKS.register("classification", ClassificationTask)
