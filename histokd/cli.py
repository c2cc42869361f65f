"""The ``histokd`` command.

    histokd train --config NAME|PATH [--set a.b=c ...] [--overwrite]
    histokd configs
    histokd eval RUN_DIR
    histokd predict MODEL IMAGES... [--out preds.csv]
    histokd export RUN_DIR [--saved-model]
    histokd data prepare SRC OUT | data fetch NAME DEST | data info SRC
    histokd normalize SRC DST [--target torchstain|PATH] [--batch N] [--report]
    histokd masks SRC DST [--weights PATH | --method classical]
    histokd analyze cka RUN_A RUN_B [...] | analyze gradcam MODEL IMAGES... --layer NAME
    histokd report RUN_DIR [RUN_DIR ...] [--out report.html]

A user mistake prints ``histokd: error: ...`` (what was wrong and what to do) and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from histokd.errors import HistokdError


def _cmd_train(args):
    from histokd.runtime import prefer_sequential_xla_cpu

    prefer_sequential_xla_cpu()  # process-wide XLA:CPU option, before anything is compiled

    from histokd.config import load_config
    from histokd.train import results_table, run

    overrides = list(args.set or [])
    if args.name:
        overrides.append(f"name={args.name}")
    cfg = load_config(args.config, overrides)
    print(f"[histokd] run '{cfg.name}' ({args.config}) → {Path(cfg.output_dir) / cfg.name}")
    results = run(cfg, overwrite=args.overwrite, progress=not args.quiet)
    print()
    print(results_table(results))
    if "stain" in results:
        c = results["stain"]
        print(f"\nstain normalisation: {c['tiles']} tiles, {c['passed_through']} passed through unchanged "
              "(background-only, near-white, noise or single-stain tiles)")
    print(f"\nrun directory: {Path(cfg.output_dir) / cfg.name}  "
          f"(export/, metrics.json, plots/, history.csv)")
    return 0


def _cmd_configs(args):
    import yaml

    from histokd.config import CONFIG_DIR, list_configs

    for name in list_configs():
        data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
        print(f"{name:<48} {data.get('description', '')}")
    return 0


def _load_run(run_dir):
    from histokd.runs import load_run_config

    return load_run_config(run_dir)


def _rebuild(run_dir, cfg):
    from histokd.data.datasets import build_data
    from histokd.runs import load_trained_model

    source = build_data(cfg)
    model, _ = load_trained_model(run_dir, num_classes=len(source.class_names))
    return model, source


def _cmd_eval(args):
    from histokd.data.datasets import stain_fn
    from histokd.tasks import get_task

    run_dir, cfg = _load_run(args.run_dir)
    model, source = _rebuild(run_dir, cfg)
    task = get_task(cfg.task)
    results = task.evaluate(cfg, model, source, run_dir, stain=stain_fn(cfg), progress=not args.quiet)
    results.pop("_heads", None)
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    old.update(results)
    (run_dir / "metrics.json").write_text(json.dumps(old, indent=2))
    print(task.summary(results))
    return 0


def _cmd_export(args):
    from histokd.data.datasets import stain_fn
    from histokd.tasks import get_task

    run_dir, cfg = _load_run(args.run_dir)
    if args.saved_model:
        cfg.export.saved_model = True
    model, source = _rebuild(run_dir, cfg)
    stain = stain_fn(cfg)
    task = get_task(cfg.task)
    results = task.evaluate(cfg, model, source, run_dir, stain=stain, progress=not args.quiet)
    meta = task.export(cfg, model, results, source, run_dir, stain=stain)
    print(json.dumps(meta, indent=2))
    return 0


def _cmd_predict(args):
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from histokd.data import decode_image_file
    from histokd.export import load_classifier

    model, meta = load_classifier(args.model)
    size = int(model.input_shape[1])
    names = meta.get("class_names") or [str(i) for i in range(model.output_shape[-1])]
    paths = []
    for p in args.images:
        p = Path(p)
        if p.is_dir():
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in
                            (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"))
        else:
            paths.append(p)
    if not paths:
        raise HistokdError("no images given: pass image files or folders of images")
    rows = []
    for i in range(0, len(paths), args.batch):
        chunk = paths[i:i + args.batch]
        imgs = []
        for p in chunk:
            img = decode_image_file(str(p))
            if img.shape[:2] != (size, size):
                img = tf.image.resize(img, (size, size), antialias=True).numpy().round().clip(0, 255)
            imgs.append(img.astype("uint8"))
        probs = model.predict(np.stack(imgs), verbose=0)
        for p, pr in zip(chunk, probs):
            row = {"path": str(p), "prediction": names[int(pr.argmax())], "confidence": float(pr.max())}
            row.update({f"p_{n}": float(v) for n, v in zip(names, pr)})
            rows.append(row)
    df = pd.DataFrame(rows)
    df.to_csv(args.out, index=False)
    print(df[["path", "prediction", "confidence"]].to_string(index=False, max_rows=20))
    print(f"\n{len(df)} predictions → {args.out}")
    return 0


def _cmd_data(args):
    from histokd import data as hd

    if args.data_cmd == "prepare":
        summary = hd.prepare_cli(args.src, args.out, image_size=args.image_size,
                                 on_bad_image=args.on_bad_image, shard_size=args.shard_size)
        print(json.dumps(summary, indent=2, default=str))
    elif args.data_cmd == "fetch":
        summary = hd.fetch(args.name, args.dest, url_override=args.url)
        print(json.dumps(summary, indent=2, default=str))
    elif args.data_cmd == "info":
        src = hd.source_from_path(args.src)
        print(hd.format_dataset_info(hd.dataset_info(src)))
    return 0


def _cmd_normalize(args):
    from histokd.runtime import apply_cpu_threads, prefer_sequential_xla_cpu

    prefer_sequential_xla_cpu()  # process-wide XLA:CPU option, before anything is compiled

    from histokd.stain import normalize_folder
    from histokd.stain.macenko import PARALLEL_CHUNKS

    # one group of cores per chunk of tiles in flight (before TensorFlow's first op)
    apply_cpu_threads(args.cpu_threads, streams=PARALLEL_CHUNKS)

    summary = normalize_folder(args.src, args.dst, target=args.target, batch_size=args.batch,
                               report=args.report)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_masks(args):
    from histokd.nuclei import build_mask_dataset

    method = args.method or ("hovernet" if args.weights else None)
    if method is None:
        raise HistokdError("histokd masks needs --weights PATH (HoVer-Net checkpoint, CC BY-NC-SA, not "
                           "bundled) or --method classical (no weights, no nucleus types)")
    summary = build_mask_dataset(args.src, args.dst, weights=args.weights, method=method, mpp=args.mpp,
                                 batch_size=args.batch)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_hovernet_train(args):
    from histokd.nuclei.training import fine_tune_hovernet, load_hovernet_config

    kwargs = load_hovernet_config(args.config, args.set)
    if args.weights:  # mode and type count come from the checkpoint unless set explicitly
        explicit = {item.split("=", 1)[0].strip() for item in args.set or []}
        kwargs = {k: v for k, v in kwargs.items() if k not in ("mode", "num_types") or k in explicit}
    model, history = fine_tune_hovernet(args.src, args.out, weights=args.weights,
                                        verbose=0 if args.quiet else 1, **kwargs)
    last = {k: v[-1] for k, v in history.items() if v}
    print(json.dumps({"model": str(Path(args.out) / "hovernet.keras"), "last": last}, indent=2))
    return 0


def _cmd_analyze(args):
    from histokd.analysis import cli_support

    if args.analyze_cmd == "cka":
        out = cli_support.cka_runs(args.runs, data=args.data, out_dir=args.out, layers=args.layers,
                                   kernel=args.kernel, max_batches=args.max_batches)
    else:
        out = cli_support.gradcam_images(args.model, args.images, layers=args.layer, out=args.out)
    print(out)
    return 0


def _cmd_report(args):
    from histokd.analysis.report import write_report

    path = write_report(args.run_dirs, args.out)
    print(f"report → {path}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(
        prog="histokd",
        description="Self-supervised learning and knowledge distillation for histopathology "
                    "(More From Less; Swin V2 + MoBY pre-training + layer-wise distillation) on Keras 3.",
        epilog="Start with `histokd train` (the demo config) or `histokd configs`; "
               "`histokd COMMAND --help` for each command.",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train, evaluate and export a run")
    t.add_argument("--config", default="default", help="packaged config name or YAML path")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=3")
    t.add_argument("--name", help="run name (default: the config's)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.set_defaults(fn=_cmd_train)

    sub.add_parser("configs", help="list packaged configs").set_defaults(fn=_cmd_configs)

    e = sub.add_parser("eval", help="re-run the linear evaluation of a run")
    e.add_argument("run_dir")
    e.set_defaults(fn=_cmd_eval)

    x = sub.add_parser("export", help="(re-)export a run's encoders and classifiers")
    x.add_argument("run_dir")
    x.add_argument("--saved-model", action="store_true", help="also write TF SavedModels")
    x.set_defaults(fn=_cmd_export)

    pr = sub.add_parser("predict", help="classify images with an exported classifier")
    pr.add_argument("model", help="classifier .keras file or a run's export/ folder")
    pr.add_argument("images", nargs="+", help="image files or folders")
    pr.add_argument("--out", default="preds.csv")
    pr.add_argument("--batch", type=int, default=64)
    pr.set_defaults(fn=_cmd_predict)

    d = sub.add_parser("data", help="prepare, fetch or inspect datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("prepare", help="convert a folder / manifest / .npz into sharded TFRecords")
    dp.add_argument("src")
    dp.add_argument("out")
    dp.add_argument("--image-size", type=int, default=None)
    dp.add_argument("--on-bad-image", choices=["error", "skip"], default="error")
    dp.add_argument("--shard-size", type=int, default=1024)
    df = dsub.add_parser("fetch", help="download, verify, extract and prepare a public dataset")
    df.add_argument("name", help="e.g. nct_crc_he_100k, crc_val_he_7k")
    df.add_argument("dest")
    df.add_argument("--url", default=None, help="mirror URL overriding the manifest's")
    di = dsub.add_parser("info", help="summarise a dataset")
    di.add_argument("src")
    d.set_defaults(fn=_cmd_data)

    n = sub.add_parser("normalize", help="Macenko-normalise a folder of tiles")
    n.add_argument("src")
    n.add_argument("dst")
    n.add_argument("--target", default="torchstain", help="preset name or target image path")
    n.add_argument("--batch", type=int, default=64)
    n.add_argument("--report", action="store_true", help="write a before/after thumbnail grid")
    n.add_argument("--cpu-threads", default="auto",
                   help="TensorFlow thread pools: auto (on a CPU, one group of cores per chunk of "
                        "tiles in flight), default (TensorFlow's) or INTRA,INTER")
    n.set_defaults(fn=_cmd_normalize)

    m = sub.add_parser("masks", help="nuclear-type masks for tissue/nuclei distillation")
    m.add_argument("src")
    m.add_argument("dst")
    m.add_argument("--weights", default=None, help="HoVer-Net checkpoint (.tar or .pth)")
    m.add_argument("--method", choices=["hovernet", "classical"], default=None)
    m.add_argument("--mpp", type=float, default=None, help="microns per pixel of the input")
    m.add_argument("--batch", type=int, default=8)
    m.set_defaults(fn=_cmd_masks)

    h = sub.add_parser("hovernet-train", help="fine-tune HoVer-Net on image + instance-mask pairs")
    h.add_argument("src", help="folder of NAME.png + NAME_inst.npy|png (+ NAME_type.npy|png) pairs")
    h.add_argument("out", help="output folder (hovernet.keras, history.json)")
    h.add_argument("--config", default="hovernet_fast", help="hovernet_fast, hovernet_original or a YAML path")
    h.add_argument("--weights", default=None, help="official checkpoint to start from (.tar or .pth)")
    h.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. epochs=5")
    h.set_defaults(fn=_cmd_hovernet_train)

    a = sub.add_parser("analyze", help="CKA and GradCAM")
    asub = a.add_subparsers(dest="analyze_cmd", required=True)
    ac = asub.add_parser("cka", help="layer-by-layer CKA between runs")
    ac.add_argument("runs", nargs="+")
    ac.add_argument("--data", default=None, help="dataset (default: the first run's test split)")
    ac.add_argument("--out", default="cka")
    ac.add_argument("--layers", default=None, help="regex of layer names")
    ac.add_argument("--kernel", choices=["linear", "rbf"], default="linear")
    ac.add_argument("--max-batches", type=int, default=None)
    ag = asub.add_parser("gradcam", help="GradCAM overlays")
    ag.add_argument("model")
    ag.add_argument("images", nargs="+")
    ag.add_argument("--layer", action="append", required=True)
    ag.add_argument("--out", default="gradcam.png")
    a.set_defaults(fn=_cmd_analyze)

    r = sub.add_parser("report", help="one HTML page comparing runs")
    r.add_argument("run_dirs", nargs="+")
    r.add_argument("--out", default="report.html")
    r.set_defaults(fn=_cmd_report)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except HistokdError as e:
        print(f"histokd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histokd: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
