#!/usr/bin/env python
"""Images/s of histokd's transformer backbones vs Hugging Face transformers (PyTorch), side by side.

For each model (``swinv2_tiny`` and ``vit_small`` at 224 px, batch 8):

* histokd: ``histokd.backbones.make_backbone(name, 224)`` (Swin V2-T at 224 px uses
  window 7; ViT-S/16 with the Hugging Face LayerNorm epsilon 1e-12);
* transformers: ``Swinv2Model`` (``image_size=224, window_size=7``, same depths/heads/
  drop-path) / ``ViTModel`` (``hidden_size=384``, 12 layers, 6 heads, no pooler), random
  init; its weights are copied into the histokd model with
  :func:`histokd.backbones.convert.load_pretrained`, so both compute the same function
  (the maximum relative difference of the pooled features is printed as a check).

Two modes:

* ``forward``: inference. histokd in a ``tf.function`` (``jit_compile=False``; with
  ``--xla`` also an XLA-compiled row), transformers under ``torch.inference_mode()``.
* ``train``: one training step: forward (``training=True`` / ``model.train()``, so
  stochastic depth is active on both sides), loss = mean of squares of the pooled
  features, backward, Adam update. histokd: ``tf.function`` with a ``GradientTape`` and
  ``histokd.train.FusedAdam`` (the optimizer ``histokd train`` uses; ``--stock-adam``
  for ``keras.optimizers.Adam``); transformers: ``torch.optim.Adam``.

Threads: PyTorch ``torch.set_num_threads(2)`` (``--torch-threads``); TensorFlow keeps its
default thread pools (``--intra``/``--inter`` to change). By default PyTorch runs in its own
spawned process driven round by round (rounds interleaved: histokd, torch, histokd, …),
so that neither framework's idle worker threads (OpenMP spin-waiting, Eigen pools)
slow the other; ``--torch-in-process`` runs both in one process.

Each round times ``--steps`` calls per side after ``--warmup`` untimed calls; the table
shows the median images/s over ``--rounds`` rounds and the median of the per-round paired
ratios histokd / torch (target: >= 1.2). Other jobs may share the CPU: the load average
is printed before and after. The table also gives each side's arithmetic rate: the
step's float operations per image (TensorFlow profiler on the traced histokd graph;
the transformers model computes the same function) times images/s, as GFLOP/s and as
a share of this machine's float32 GEMM rate measured in the same run
(``scripts/_roofline.py``), and each mode's kernel floor: every matrix product and
convolution of histokd's traced graph (gradients included for ``train``) re-run
alone with its real shapes, one after another, summed — the images/s the mode would
reach if nothing but those kernels ran (``--no-kernels`` skips it). The transformers
model runs the same products on the same oneDNN library, so the floor bounds both.

On a shared, oversubscribed CPU, PyTorch's OpenMP pool with 2 threads slows down far more
than TensorFlow's thread pools (it can fall below its own 1-thread speed), which inflates the
ratio; for a per-core comparison that load hits alike, run both sides single-threaded::

    python scripts/bench_backbones.py --torch-threads 1 --intra 1 --inter 1 --torch-in-process

XLA (``--xla``, ``jit_compile=True``) was measured on this 2-core Xeon: about even for
Swin V2 forward, slower for the Swin V2 training step, ~10 % faster for ViT, with minutes of
compilation; the models keep ``jit_compile=False``.

Usage::

    python scripts/bench_backbones.py                       # both models, both modes
    python scripts/bench_backbones.py --models vit_small --modes forward --rounds 7 --xla
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

MODELS = ("swinv2_tiny", "vit_small")
MODES = ("forward", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES), help="comma list of forward, train")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per side (median reported), >= 5")
    p.add_argument("--steps", type=int, default=2, help="timed calls per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side before the first round")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--intra", type=int, default=0, help="TF intra-op threads (0 = TF default)")
    p.add_argument("--inter", type=int, default=0, help="TF inter-op threads (0 = TF default)")
    p.add_argument("--xla", action="store_true", help="also time histokd with jit_compile=True")
    p.add_argument("--torch-in-process", action="store_true",
                   help="run PyTorch in the TensorFlow process (default: its own process)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--no-kernels", action="store_true", help="skip timing each mode's dense kernels alone")
    p.add_argument("--stock-adam", action="store_true",
                   help="histokd side with keras.optimizers.Adam instead of histokd.train.FusedAdam")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS] + [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown model/mode {bad}; models: {MODELS}, modes: {MODES}")
    if args.rounds < 5:
        print("note: fewer than 5 rounds; medians are less reliable", file=sys.stderr)
    return args


def load_average():
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "load average n/a"


# ============================================================================ PyTorch side
def hf_config(transformers, name, size):
    if name == "vit_small":
        return transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                      intermediate_size=1536, image_size=size, patch_size=16,
                                      layer_norm_eps=1e-12)
    if name == "swinv2_tiny":
        return transformers.Swinv2Config(image_size=size, patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                                         num_heads=[3, 6, 12, 24], window_size=7 if size % 224 == 0 else 8,
                                         drop_path_rate=0.2, layer_norm_eps=1e-5)
    raise ValueError(name)


class TorchSide:
    """Hugging Face models, their Adam optimisers and timing loops (runs in any process)."""

    def __init__(self, threads):
        import torch

        torch.set_num_threads(int(threads))
        self.torch = torch
        self.models, self.opts, self.inputs = {}, {}, {}

    def info(self):
        import transformers

        t = self.torch
        return (f"torch {t.__version__} (threads {t.get_num_threads()}, mkldnn "
                f"{t.backends.mkldnn.is_available()}), transformers {transformers.__version__}")

    def build(self, name, size, batch, seed=0):
        import transformers

        torch = self.torch
        torch.manual_seed(seed)
        cfg = hf_config(transformers, name, size)
        if name == "vit_small":
            model = transformers.ViTModel(cfg, add_pooling_layer=False)
        else:
            model = transformers.Swinv2Model(cfg)
        model.eval()
        self.models[name] = model
        self.opts[name] = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = np.random.default_rng(seed).random((batch, size, size, 3), dtype=np.float32)
        self.inputs[name] = torch.from_numpy(self._normalize(x).transpose(0, 3, 1, 2).copy())
        attn = getattr(model.config, "_attn_implementation", "?")
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}, x, attn

    @staticmethod
    def _normalize(x):  # histokd backbones normalise inside; HF models expect normalised input
        mean = np.asarray([0.485, 0.456, 0.406], np.float32)
        std = np.asarray([0.229, 0.224, 0.225], np.float32)
        return (x - mean) / std

    def _pooled(self, name, out):
        return out.last_hidden_state[:, 0] if name == "vit_small" else out.pooler_output

    def forward(self, name):
        model = self.models[name].eval()
        with self.torch.inference_mode():
            return self._pooled(name, model(self.inputs[name])).numpy().copy()

    def run(self, name, mode, steps):
        model, x, torch = self.models[name], self.inputs[name], self.torch
        if mode == "forward":
            model.eval()
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(steps):
                    out = self._pooled(name, model(x))
                float(out.sum())
            return time.perf_counter() - t0
        model.train()
        opt = self.opts[name]
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = self._pooled(name, model(x)).square().mean()
            loss.backward()
            opt.step()
        float(loss.detach())
        return time.perf_counter() - t0


def _torch_worker(conn, threads):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    side = TorchSide(threads)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        method, args = msg
        try:
            conn.send(("ok", getattr(side, method)(*args)))
        except Exception as e:  # pragma: no cover - reported in the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()


class TorchProxy:
    """Calls :class:`TorchSide` methods in a spawned process."""

    def __init__(self, threads):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_worker, args=(child, threads), daemon=True)
        self.proc.start()

    def __getattr__(self, method):
        def call(*args):
            self.conn.send((method, args))
            status, value = self.conn.recv()
            if status != "ok":
                raise RuntimeError(f"torch worker: {value}")
            return value
        return call

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=30)


# ============================================================================ histokd side
class KerasSide:
    """A histokd backbone with a compiled forward and a compiled Adam training step."""

    def __init__(self, tf, name, size, batch, state, x, lr, xla=False, stock_adam=False):
        import keras
        from keras import ops

        from histokd.backbones import make_backbone
        from histokd.backbones.convert import load_pretrained

        kwargs = {"layer_norm_eps": 1e-12} if name.startswith("vit") else {}
        self.model = make_backbone(name, size, **kwargs)
        report = load_pretrained(self.model, state)
        self.loaded = report["loaded"]
        self.x = tf.constant(x)
        model = self.model
        from histokd.optimizers import FusedAdam

        self.optimizer = keras.optimizers.Adam(lr) if stock_adam else FusedAdam(lr)
        variables = model.trainable_variables
        self.optimizer.build(variables)

        def forward(images):
            return model(images, training=False)

        def train_step(images):
            with tf.GradientTape() as tape:
                loss = ops.mean(ops.square(model(images, training=True)))
            grads = tape.gradient(loss, variables)
            self.optimizer.apply(grads, variables)
            return loss

        self.fns = {"forward": tf.function(forward, jit_compile=False),
                    "train": tf.function(train_step, jit_compile=False)}
        if xla:
            self.fns["forward_xla"] = tf.function(forward, jit_compile=True)
            self.fns["train_xla"] = tf.function(train_step, jit_compile=True)

    def pooled(self):
        return self.fns["forward"](self.x).numpy()

    def run(self, mode, steps):
        fn, x = self.fns[mode], self.x
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(x)
        np.asarray(out)
        return time.perf_counter() - t0


def _tf_setup(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import histokd  # noqa: F401  (sets KERAS_BACKEND=tensorflow)
    import tensorflow as tf

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    return tf


def _tf_info(tf):
    import keras

    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 Linux builds)")
    intra = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    inter = tf.config.threading.get_inter_op_parallelism_threads() or "default"
    return (f"tensorflow {tf.__version__}, keras {keras.__version__} (intra-op threads {intra}, "
            f"inter-op threads {inter}, TF_ENABLE_ONEDNN_OPTS={onednn})")


# ============================================================================ main
def main(argv=None):
    args = parse_args(argv)
    torch_side = TorchSide(args.torch_threads) if args.torch_in_process else TorchProxy(args.torch_threads)
    tf = _tf_setup(args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _roofline import format_rate, gemm_rate, graph_flops, kernel_time

    print(f"cpu: {os.cpu_count()} logical cores; {load_average()} (start)")
    print(_tf_info(tf))
    print(torch_side.info() + ("" if args.torch_in_process else "; in its own process"))
    print(f"batch {args.batch}, {args.size} px, {args.rounds} rounds x {args.steps} steps after "
          f"{args.warmup} warm-up steps; interleaved round by round")
    rows = []
    try:
        for name in args.models:
            state, x, attn = torch_side.build(name, args.size, args.batch)
            ours = KerasSide(tf, name, args.size, args.batch, state, x, args.lr, xla=args.xla,
                             stock_adam=args.stock_adam)
            ref = torch_side.forward(name)
            err = float(np.abs(ours.pooled() - ref).max() / np.abs(ref).max())
            print(f"{name}: {ours.model.count_params() / 1e6:.1f} M params, {ours.loaded} weights copied from "
                  f"transformers (attn_implementation={attn}); pooled max rel diff {err:.2e}")
            spec = tf.TensorSpec(ours.x.shape, ours.x.dtype)
            flops = {m: graph_flops(ours.fns[m], spec) / args.batch for m in args.modes}
            print("  work per image: " + ", ".join(f"{m} {v / 1e9:.2f} GFLOP" for m, v in flops.items()))
            floors = {}
            if not args.no_kernels:
                for m in args.modes:
                    kt = kernel_time(ours.fns[m], spec)
                    floors[m] = args.batch / kt["seconds"]
                    print(f"  {m}: {kt['kernels']} dense kernels ({kt['distinct']} distinct), each re-run alone: "
                          f"{kt['seconds'] * 1e3:.0f} ms per batch -> floor {floors[m]:.2f} img/s")
            for mode in args.modes:
                our_modes = [mode] + ([mode + "_xla"] if args.xla else [])
                for m in our_modes:
                    ours.run(m, args.warmup)
                torch_side.run(name, mode, args.warmup)
                times = {m: [] for m in our_modes}
                times["torch"] = []
                for _ in range(args.rounds):
                    for m in our_modes:
                        times[m].append(ours.run(m, args.steps))
                    times["torch"].append(torch_side.run(name, mode, args.steps))
                ips = {k: [args.batch * args.steps / t for t in v] for k, v in times.items()}
                for m in our_modes:
                    ratios = [a / b for a, b in zip(ips[m], ips["torch"])]
                    rows.append((name, m, statistics.median(ips[m]), statistics.median(ips["torch"]),
                                 statistics.median(ratios), min(ratios), max(ratios), flops[mode],
                                 floors.get(mode)))
                    print("  %-12s %-12s histokd %6.2f img/s  torch %6.2f img/s  ratio %.2f (%.2f-%.2f)"
                          % rows[-1][:7], flush=True)
            del ours
    finally:
        if not args.torch_in_process:
            torch_side.close()
    print(f"\n{load_average()} (end)")
    peak = gemm_rate()
    print(f"float32 GEMM on this machine: {peak:.0f} GFLOP/s (TensorFlow, 4096², median of 5)")
    print("| model | mode | histokd img/s | torch img/s | ratio (median, min-max) | histokd rate | torch rate "
          "| kernel floor img/s (histokd, torch share) |")
    print("|---|---|---:|---:|---|---|---|---|")
    for name, mode, ours_ips, torch_ips, ratio, lo, hi, fl, floor in rows:
        flag = "" if ratio >= 1.2 else " (below 1.2)"
        fl_txt = (f"{floor:.2f} ({100 * ours_ips / floor:.0f} %, {100 * torch_ips / floor:.0f} %)"
                  if floor else "-")
        print(f"| {name} | {mode} | {ours_ips:.2f} | {torch_ips:.2f} | {ratio:.2f} ({lo:.2f}-{hi:.2f}){flag} | "
              f"{format_rate(fl, ours_ips, peak)} | {format_rate(fl, torch_ips, peak)} | {fl_txt} |")
    return rows


if __name__ == "__main__":
    main()
