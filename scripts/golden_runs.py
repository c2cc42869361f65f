"""Golden values of tiny seeded runs, one per method, to check that a refactor keeps behaviour.

Runs ``histokd.train.run`` on tiny synthetic configs (each in its own process, so seeds and
thread pools start fresh) and records the per-epoch training losses and the evaluation
accuracies. ``--write`` stores them in ``tests/fixtures/golden_runs.json``; ``--check``
re-runs and compares (losses to ``--rtol``, accuracies exactly unless ``--losses-only``).

    python scripts/golden_runs.py --write
    python scripts/golden_runs.py --check

The fixture was recorded before the plugin refactor (issue 16) and matched after it for
vicreg, vicreg_shared, simclr, supervised and distill; MoBY's crops then depended on the
order of a parallel tf.data map (run-to-run noise), so MoBY was checked step by step
against the old class instead. With every view maker seeded per batch since, all runs are
reproducible and the fixture was re-recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden_runs.json"

TINY = ["data.source=synthetic", "data.path=null", "data.test_path=null", "data.image_size=32",
        "data.synthetic_per_class=16", "data.val_fraction=0.2", "data.test_fraction=0.25", "data.synthetic_classes=3", "data.stain.method=none",
        "train.batch_size=8", "train.epochs=2", "train.verbose=0", "train.warmup_epochs=0.5",
        "train.checkpoint_every=0", "train.strategy=auto", "train.weight_decay=0.0",
        "model.backbone=resnet18", "model.backbone_kwargs={width: 0.125, small_input: true}",
        "model.weights=null", "eval.probe_epochs=40", "eval.probe_lr=0.01", "eval.embedding_plot=false",
        "data.cache=true", "train.lr=0.001"]

RUNS = {
    "vicreg": ("default", ["model.expander_dims=[32,32,32]", "views.downsample=8"]),
    "vicreg_shared": ("default", ["model.expander_dims=[32,32,32]", "views.downsample=8",
                                  "model.shared=true"]),
    "simclr": ("default", ["model.method=simclr", "model.expander_dims=[32,32]",
                           "views.kind=symmetric", "views.downsample=16"]),
    "supervised": ("default", ["model.method=supervised", "views.kind=identity",
                               "views.downsample=null"]),
    "moby": ("swinv2/moby_swinv2_tiny", ["moby.hidden_dim=32", "moby.out_dim=16", "moby.queue_size=32",
                                        "views.augment=false"]),
    "distill": ("swinv2/distill_swinv2_base_to_tiny", ["distill.teacher={teacher}",
                                                       "distill.stage_interval_epochs=1.0"]),
}

CHILD = r"""
import json, sys
import histokd
from histokd.config import load_config
from histokd.train import run
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
res = run(cfg, overwrite=True, progress=False)
import pandas as pd
h = pd.read_csv(f"{cfg.output_dir}/{cfg.name}/history.csv")
acc = {k: {f: round(float(m["accuracy"]), 6) for f, m in v.items()} for k, v in res["evaluation"].items()}
print("GOLDEN" + json.dumps({"loss": [float(x) for x in h["loss"]], "accuracy": acc,
                             "steps": res["train"]["steps"]}))
"""


def run_one(name, config, overrides, out_dir):
    over = TINY + overrides + [f"output_dir={out_dir}", f"name={name}"]
    res = subprocess.run([sys.executable, "-c", CHILD, config, json.dumps(over)],
                         capture_output=True, text=True, timeout=900)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("GOLDEN")), None)
    if res.returncode or line is None:
        raise SystemExit(f"{name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(line[len("GOLDEN"):])


def collect(names):
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "supervised"
        for name in names:
            config, over = RUNS[name]
            over = [o.format(teacher=teacher) for o in over]
            if name == "distill" and "supervised" not in out:
                out["supervised"] = run_one("supervised", *RUNS["supervised"], tmp)
            out[name] = run_one(name, config, over, tmp)
            print(f"{name:>14}: loss {out[name]['loss']} accuracy {out[name]['accuracy']}", flush=True)
    return {k: out[k] for k in names}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--losses-only", action="store_true")
    args = ap.parse_args(argv)
    names = args.only or list(RUNS)
    got = collect(names)
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
        old.update(got)
        FIXTURE.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        print(f"wrote {FIXTURE}")
    if args.check:
        want = json.loads(FIXTURE.read_text())
        bad = []
        for name, g in got.items():
            w = want[name]
            for a, b in zip(g["loss"], w["loss"]):
                if abs(a - b) > args.rtol * max(abs(b), 1e-8):
                    bad.append(f"{name}: loss {g['loss']} != {w['loss']}")
                    break
            if not args.losses_only and g["accuracy"] != w["accuracy"]:
                bad.append(f"{name}: accuracy {g['accuracy']} != {w['accuracy']}")
            if g["steps"] != w["steps"]:
                bad.append(f"{name}: steps {g['steps']} != {w['steps']}")
        print("\n".join(bad) if bad else "all golden values match")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
