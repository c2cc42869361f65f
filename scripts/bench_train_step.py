#!/usr/bin/env python
"""Views/s of one VICReg training step: histokd vs a bare Keras step vs plain PyTorch.

The step (More From Less §2.2 at CPU-benchmark scale): a ResNet-50 encoder
shared by both branches, 64×64 input, batch 32 per view and two views (so 64
views per step, each view through the encoder separately so BatchNorm sees
per-view statistics as in VICReg), an expander of three dense layers of 2048
(BN + ReLU between), the VICReg loss (λ=25, μ=25, ν=1) and Adam (lr 1e-4).

Variants, timed side by side in one process, rounds interleaved so that load
drift on a shared machine hits all of them alike:

* ``keras_bare``      – ``keras.applications.ResNet50`` + an inline expander and
  VICReg inside one ``tf.function`` with a ``GradientTape`` (no Keras trainer).
* ``histokd_fit``     – ``histokd.methods.joint_embedding.JointEmbedding`` with a
  ``histokd.backbones`` ResNet-50 trained through ``fit`` (the real Keras
  ``train_step`` with every logged metric: loss terms, embedding std; the
  cross-replica gather is a no-op on one device) and the optimizer ``histokd
  train`` uses (``histokd.train.FusedAdam``); with shared branches the expander's
  dense layers run once on both views (BatchNorm still per view,
  ``ProjectionHead.call_views``). Timed between the ends of the
  first and last batch of each ``fit`` call, i.e. steady state.
* ``torch_eager``     – the same model written out in PyTorch (ResNet-50 with
  Keras' layout: stride in the first 1×1 convolution, convolution biases),
  eager mode, default NCHW, ``torch.set_num_threads(cpu count)``, in its own
  spawned process (driven round by round, so still interleaved) because
  TensorFlow's idle thread pools slowed PyTorch by ~10–15 % in one process.
* ``*_bf16``          – Keras variants under ``mixed_bfloat16`` (optional).
* ``torch_cl``        – PyTorch with ``channels_last`` tensors (optional).
* ``histokd_tob``     – histokd through ``train_on_batch`` (optional).
* ``histokd_fit_stockbn`` – histokd with ``fused_bn=False`` (stock
  ``keras.layers.BatchNormalization`` in the backbone) (optional).
* ``histokd_fit_stockadam`` – histokd with ``keras.optimizers.Adam`` instead of
  ``histokd.train.FusedAdam`` (the optimizer ``histokd train`` uses) (optional).

The table also gives each variant's arithmetic rate: the float operations of one
step (TensorFlow profiler on ``keras_bare``'s traced step; the other variants run
the same convolutions and matrix products) per view times views/s, as GFLOP/s and
as a share of this machine's float32 GEMM rate measured in the same run
(``scripts/_roofline.py``). A line under the table gives the step's
kernel floor: every convolution and matrix product of that step (forward and
gradients, real shapes) re-run alone, one after another, and summed — the time
the step would take if nothing but its dense kernels ran; the column "of floor" is
each variant's speed as a share of the speed that floor allows (``--no-kernels``
skips it).

Thread pools: by default the TensorFlow process uses what ``histokd train`` sets
for this step (``train.cpu_threads=auto``, :func:`histokd.train.cpu_thread_plan`:
on a CPU, intra-op ``cores // 2`` and inter-op 2, so the two views' encoder chains
run side by side, one per group of cores); ``--threads tf`` keeps TensorFlow's
defaults, ``--intra``/``--inter`` set them. PyTorch runs with
``torch.set_num_threads(cores)`` (eager mode runs one op at a time).

XLA (``jit_compile``) is off: on this CPU it made the step ~4× slower. Each
round runs ``--steps`` steps per variant after ``--warmup`` steps; the table
reports the median (min–max) over ``--rounds`` rounds and the per-round paired
ratio to ``torch_eager``.

Usage::

    python scripts/bench_train_step.py                      # default table
    python scripts/bench_train_step.py --bf16 --extra       # + mixed_bfloat16, channels_last, train_on_batch
    python scripts/bench_train_step.py --variants keras_bare,torch_eager --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DEFAULT_VARIANTS = ["keras_bare", "histokd_fit", "torch_eager"]
EXTRA_VARIANTS = ["histokd_fit_stockbn", "histokd_fit_stockadam", "histokd_tob", "torch_cl"]
BF16_VARIANTS = ["keras_bare_bf16", "histokd_fit_bf16"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32, help="images per view (two views per step)")
    p.add_argument("--size", type=int, default=64, help="input tile size in pixels")
    p.add_argument("--expander", type=int, default=2048, help="width of the 3 expander layers")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported), >= 5")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before round 1")
    p.add_argument("--variants", default=None,
                   help="comma list; default keras_bare,histokd_fit,torch_eager")
    p.add_argument("--bf16", action="store_true", help="add Keras mixed_bfloat16 variants")
    p.add_argument("--extra", action="store_true", help="add histokd_tob and torch_cl variants")
    p.add_argument("--threads", choices=("histokd", "tf"), default="histokd",
                   help="TF thread pools: what `histokd train` sets for this step (train.cpu_threads=auto: "
                        "intra-op cores//2, inter-op 2 on a CPU) or TensorFlow's defaults")
    p.add_argument("--intra", type=int, default=0, help="TF intra-op threads (overrides --threads)")
    p.add_argument("--inter", type=int, default=0, help="TF inter-op threads (overrides --threads)")
    p.add_argument("--torch-threads", type=int, default=0, help="0 = os.cpu_count()")
    p.add_argument("--torch-in-process", action="store_true",
                   help="run PyTorch in the TF process (default: its own process, rounds still interleaved)")
    p.add_argument("--jit", action="store_true", help="XLA jit_compile for the Keras variants (slow on CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-kernels", action="store_true", help="skip timing the step's dense kernels alone")
    args = p.parse_args(argv)
    if args.variants:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    else:
        args.variants = list(DEFAULT_VARIANTS)
        if args.bf16:
            args.variants += BF16_VARIANTS
        if args.extra:
            args.variants += EXTRA_VARIANTS
    known = set(DEFAULT_VARIANTS + EXTRA_VARIANTS + BF16_VARIANTS)
    unknown = [v for v in args.variants if v not in known]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {sorted(known)}")
    if args.rounds < 5:
        print("note: fewer than 5 rounds; medians are less reliable", file=sys.stderr)
    return args


# ----------------------------------------------------------------------------- Keras


def _keras_setup(args):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if args.intra or args.inter:
        if args.intra:
            tf.config.threading.set_intra_op_parallelism_threads(args.intra)
        if args.inter:
            tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    elif args.threads == "histokd":
        from histokd.runtime import apply_cpu_threads

        apply_cpu_threads("auto", "vicreg")
    return tf


def _vicreg_keras(za, zb):
    from keras import ops

    za = ops.cast(za, "float32")
    zb = ops.cast(zb, "float32")
    n = ops.cast(ops.shape(za)[0], "float32")
    d = ops.cast(ops.shape(za)[1], "float32")
    inv = ops.mean(ops.square(za - zb))

    def var_cov(z):
        zc = z - ops.mean(z, axis=0, keepdims=True)
        std = ops.sqrt(ops.sum(ops.square(zc), axis=0) / (n - 1.0) + 1e-4)
        cov = ops.matmul(ops.transpose(zc), zc) / (n - 1.0)
        off = ops.sum(ops.square(cov)) - ops.sum(ops.square(ops.diagonal(cov)))
        return ops.mean(ops.relu(1.0 - std)), off / d

    va, ca = var_cov(za)
    vb, cb = var_cov(zb)
    return 25.0 * inv + 25.0 * 0.5 * (va + vb) + 1.0 * (ca + cb)


class KerasBareStep:
    """keras.applications.ResNet50 + inline expander + VICReg in one tf.function."""

    def __init__(self, args, tf, views):
        import keras

        size, width = args.size, args.expander
        self.encoder = keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg"
        )
        inp = keras.Input((self.encoder.output_shape[-1],))
        x = inp
        for i in range(2):
            x = keras.layers.Dense(width, use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
        self.expander = keras.Model(inp, keras.layers.Dense(width)(x))
        self.optimizer = keras.optimizers.Adam(1e-4)
        self.variables = self.encoder.trainable_variables + self.expander.trainable_variables
        self.optimizer.build(self.variables)
        mean = tf.constant([103.939, 116.779, 123.68])

        def preprocess(x):  # caffe mode on [0, 1] input, as histokd does inside its backbone
            return tf.reverse(x, axis=[-1]) * 255.0 - mean

        def step(xa, xb):
            with tf.GradientTape() as tape:
                za = self.expander(self.encoder(preprocess(xa), training=True), training=True)
                zb = self.expander(self.encoder(preprocess(xb), training=True), training=True)
                loss = _vicreg_keras(za, zb)
            grads = tape.gradient(loss, self.variables)
            self.optimizer.apply(grads, self.variables)
            return loss

        self.step = tf.function(step, jit_compile=bool(args.jit))
        self.xa, self.xb = (tf.constant(v) for v in views)

    def run(self, steps):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step(self.xa, self.xb)
        float(loss)
        return time.perf_counter() - t0

    def tracing_count(self):
        return self.step.experimental_get_tracing_count()


class _StepTimes:
    """Keras callback recording the wall time at the end of every training batch."""

    def __new__(cls):
        import keras

        class Recorder(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.ends = []

            def on_train_batch_end(self, batch, logs=None):
                self.ends.append(time.perf_counter())

        return Recorder()


class HistokdStep:
    """histokd JointEmbedding (shared ResNet-50 backbone) trained through fit / train_on_batch."""

    def __init__(self, args, tf, views, mode="fit", fused_bn=True, fused_adam=True):
        import keras

        import histokd  # noqa: F401
        from histokd.backbones import make_backbone
        from histokd.methods.joint_embedding import JointEmbedding
        from histokd.optimizers import FusedAdam

        self.mode = mode
        encoder = make_backbone("resnet50", args.size, fused_bn=fused_bn)
        self.model = JointEmbedding(
            encoder, shared=True, expander_dims=(args.expander,) * 3, loss="vicreg"
        )
        # the optimizer `histokd train` uses (histokd.train.make_optimizer)
        opt = FusedAdam(1e-4) if fused_adam else keras.optimizers.Adam(1e-4)
        self.model.compile(optimizer=opt, jit_compile=bool(args.jit))
        xa, xb = views
        self.x = {"view_a": tf.constant(xa), "view_b": tf.constant(xb)}
        self.y = tf.zeros((xa.shape[0],), tf.int32)
        self.dataset = tf.data.Dataset.from_tensors((self.x, self.y)).repeat()
        self.recorder = _StepTimes()
        self.traces = 0
        train_step = self.model.train_step

        def counting_train_step(data):  # Python body runs once per (re)trace
            self.traces += 1
            return train_step(data)

        self.model.train_step = counting_train_step

    def run(self, steps):
        if self.mode == "tob":
            t0 = time.perf_counter()
            for _ in range(steps):
                logs = self.model.train_on_batch(self.x, self.y, return_dict=True)
            float(logs["loss"])
            return time.perf_counter() - t0
        # steady state: from the end of the first batch to the end of the last one
        self.model.fit(self.dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0,
                       callbacks=[self.recorder])
        ends = self.recorder.ends
        return (ends[-1] - ends[0]) * steps / (len(ends) - 1)

    def tracing_count(self):
        return self.traces


# ----------------------------------------------------------------------------- PyTorch


def _torch_model(torch, width, out_dim=2048):
    """ResNet-50 as keras.applications builds it (v1: stride on the first 1×1 conv,
    convolutions with bias, BN eps 1.001e-5) + 3-layer expander, in plain PyTorch."""
    nn = torch.nn
    eps = 1.001e-5

    class Bottleneck(nn.Module):
        def __init__(self, cin, filters, stride, shortcut):
            super().__init__()
            self.c1 = nn.Conv2d(cin, filters, 1, stride)
            self.b1 = nn.BatchNorm2d(filters, eps=eps)
            self.c2 = nn.Conv2d(filters, filters, 3, 1, 1)
            self.b2 = nn.BatchNorm2d(filters, eps=eps)
            self.c3 = nn.Conv2d(filters, 4 * filters, 1)
            self.b3 = nn.BatchNorm2d(4 * filters, eps=eps)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, 4 * filters, 1, stride), nn.BatchNorm2d(4 * filters, eps=eps))
                if shortcut else None
            )

        def forward(self, x):
            s = x if self.short is None else self.short(x)
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)))
            y = self.b3(self.c3(y))
            return torch.relu(y + s)

    class ResNet50(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3), nn.BatchNorm2d(64, eps=eps), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            blocks, cin = [], 64
            for filters, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(n):
                    blocks.append(Bottleneck(cin, filters, stride if i == 0 else 1, i == 0))
                    cin = 4 * filters
            self.blocks = nn.Sequential(*blocks)
            mean_rgb = torch.tensor([123.68, 116.779, 103.939]).view(1, 3, 1, 1) / 255.0
            self.register_buffer("mean", mean_rgb)

        def forward(self, x):
            # caffe preprocessing on [0, 1] RGB input (channel order is irrelevant for speed)
            x = (x - self.mean) * 255.0
            return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)

    expander = nn.Sequential(
        nn.Linear(out_dim, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
        nn.Linear(width, width),
    )
    return ResNet50(), expander


def _vicreg_torch(torch, za, zb):
    n, d = za.shape
    inv = torch.mean((za - zb) ** 2)

    def var_cov(z):
        zc = z - z.mean(0, keepdim=True)
        std = torch.sqrt(zc.pow(2).sum(0) / (n - 1) + 1e-4)
        cov = zc.T @ zc / (n - 1)
        off = cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()
        return torch.relu(1 - std).mean(), off / d

    va, ca = var_cov(za)
    vb, cb = var_cov(zb)
    return 25.0 * inv + 25.0 * 0.5 * (va + vb) + (ca + cb)


class TorchStep:
    def __init__(self, args, views, channels_last=False):
        import torch

        self.torch = torch
        torch.set_num_threads(args.torch_threads or os.cpu_count())
        torch.manual_seed(0)
        self.encoder, self.expander = _torch_model(torch, args.expander)
        params = list(self.encoder.parameters()) + list(self.expander.parameters())
        self.n_params = sum(p.numel() for p in params)
        self.optimizer = torch.optim.Adam(params, lr=1e-4)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.encoder = self.encoder.to(memory_format=fmt)
        self.xa, self.xb = (
            torch.from_numpy(v.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt) for v in views
        )
        self.encoder.train()
        self.expander.train()

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        za = self.expander(self.encoder(self.xa))
        zb = self.expander(self.encoder(self.xb))
        loss = _vicreg_torch(self.torch, za, zb)
        loss.backward()
        self.optimizer.step()
        return loss

    def run(self, steps):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        float(loss.detach())
        return time.perf_counter() - t0


def _torch_worker(conn, arg_dict, views, channels_last):
    """Child process: builds the PyTorch step, then runs ``steps`` on request."""
    try:
        step = TorchStep(argparse.Namespace(**arg_dict), views, channels_last=channels_last)
    except Exception as err:  # report e.g. a missing torch to the parent
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", step.n_params))
    while True:
        steps = conn.recv()
        if steps is None:
            return
        c0 = time.process_time()
        wall = step.run(steps)
        conn.send((wall, time.process_time() - c0))


class TorchProcess:
    """The PyTorch step in its own (spawned) process, driven round by round.

    Keeps PyTorch's OpenMP threads and TensorFlow's thread pools out of each
    other's way while still interleaving the rounds with the Keras variants.
    """

    def __init__(self, args, views, channels_last=False):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_torch_worker, args=(child, vars(args), views, channels_last),
                                   daemon=True)
        self.process.start()
        status, info = self.conn.recv()
        if status == "error":
            raise ImportError(info)
        self.n_params = info
        self.last_cpu = None

    def run(self, steps):
        self.conn.send(steps)
        wall, self.last_cpu = self.conn.recv()
        return wall

    def close(self):
        self.conn.send(None)
        self.process.join(timeout=10)


# ----------------------------------------------------------------------------- driver


def build(variant, args, tf, views):
    import keras

    bf16 = variant.endswith("_bf16")
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
    try:
        base = variant[:-5] if bf16 else variant
        if base == "keras_bare":
            return KerasBareStep(args, tf, views)
        if base == "histokd_fit":
            return HistokdStep(args, tf, views, mode="fit")
        if base == "histokd_fit_stockbn":
            return HistokdStep(args, tf, views, mode="fit", fused_bn=False)
        if base == "histokd_fit_stockadam":
            return HistokdStep(args, tf, views, mode="fit", fused_adam=False)
        if base == "histokd_tob":
            return HistokdStep(args, tf, views, mode="tob")
        if base in ("torch_eager", "torch_cl"):
            cls = TorchStep if args.torch_in_process else TorchProcess
            return cls(args, views, channels_last=(base == "torch_cl"))
        raise ValueError(variant)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def main(argv=None):
    args = parse_args(argv)
    tf = _keras_setup(args)
    import numpy as np

    rng = np.random.default_rng(0)
    views = [rng.random((args.batch, args.size, args.size, 3), dtype=np.float32) for _ in range(2)]
    views_per_step = 2 * args.batch

    print(f"# VICReg step: ResNet-50, {args.size}x{args.size}, batch {args.batch} x 2 views "
          f"({views_per_step} views/step), expander 3x{args.expander}, Adam; "
          f"{args.rounds} rounds x {args.steps} steps, warm-up {args.warmup}")
    torch_where = "in-process" if args.torch_in_process else "own process"
    threading = tf.config.threading
    print(f"# torch: {torch_where}; cpus={os.cpu_count()} tf={tf.__version__} "
          f"intra={threading.get_intra_op_parallelism_threads()} "
          f"inter={threading.get_inter_op_parallelism_threads()} "
          f"onednn={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default(on)')} jit={args.jit} "
          f"load={os.getloadavg()[0]:.1f}")

    runners = {}
    for v in args.variants:
        t0 = time.perf_counter()
        try:
            runners[v] = build(v, args, tf, views)
        except ImportError as err:  # e.g. histokd method or torch not installed
            print(f"# skip {v}: {err}")
            continue
        runners[v].run(args.warmup)
        print(f"# built + warmed {v} in {time.perf_counter() - t0:.1f}s", flush=True)

    times = {v: [] for v in runners}
    cpu = {v: [] for v in runners}
    for r in range(args.rounds):
        for v, runner in runners.items():
            c0 = time.process_time()
            times[v].append(runner.run(args.steps))
            child_cpu = getattr(runner, "last_cpu", None)
            cpu[v].append(child_cpu if child_cpu is not None else time.process_time() - c0)
        print(f"# round {r + 1}: " + "  ".join(
            f"{v}={views_per_step * args.steps / times[v][-1]:.1f}" for v in runners), flush=True)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _roofline import format_rate, gemm_rate, graph_flops, kernel_line, kernel_time

    flops_view = kt = None
    if "keras_bare" in runners:
        spec = tf.TensorSpec(views[0].shape, tf.float32)
        flops_view = graph_flops(runners["keras_bare"].step, spec, spec) / views_per_step
        if not args.no_kernels:
            kt = kernel_time(runners["keras_bare"].step, spec, spec)
    peak = gemm_rate()

    ref = "torch_eager" if "torch_eager" in runners else None
    rows = []
    for v in runners:
        rates = [views_per_step * args.steps / t for t in times[v]]
        row = {
            "variant": v,
            "views_per_s": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "step_ms": 1000 * statistics.median(times[v]) / args.steps,
            "cpu_ms_per_step": 1000 * statistics.median(cpu[v]) / args.steps,
        }
        if ref:
            row["ratio_vs_torch"] = statistics.median(
                [tr / tv for tv, tr in zip(times[v], times[ref])]
            )
        if "keras_bare" in runners:
            row["ratio_vs_bare"] = statistics.median(
                [tb / tv for tv, tb in zip(times[v], times["keras_bare"])]
            )
        count = getattr(runners[v], "tracing_count", None)
        row["traces"] = count() if count else None
        rows.append(row)

    print()
    header = (f"| {'variant':<21} | {'views/s (median)':>16} | {'min–max':>13} | {'ms/step':>8} | "
              f"{'CPU ms/step':>11} | {'× torch_eager':>13} | {'× keras_bare':>12} | of floor | arithmetic rate |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for row in rows:
        rt = f"{row['ratio_vs_torch']:.2f}" if "ratio_vs_torch" in row else "-"
        rb = f"{row['ratio_vs_bare']:.2f}" if "ratio_vs_bare" in row else "-"
        floor = f"{100 * row['views_per_s'] * kt['seconds'] / views_per_step:.0f} %" if kt else "-"
        print(f"| {row['variant']:<21} | {row['views_per_s']:>16.1f} | "
              f"{row['min']:>6.1f}–{row['max']:<6.1f} | {row['step_ms']:>8.0f} | "
              f"{row['cpu_ms_per_step']:>11.0f} | {rt:>13} | {rb:>12} | "
              f"{floor:>8} | "
              f"{format_rate(flops_view, row['views_per_s'], peak) if flops_view else '-'} |")
    if flops_view:
        print(f"work: {flops_view / 1e9:.2f} GFLOP per view (TensorFlow profiler, keras_bare step); "
              f"float32 GEMM on this machine {peak:.0f} GFLOP/s (TF, 4096², median of 5)")
    if kt:
        print(kernel_line("kernel floor of the step (keras_bare graph)", kt, views_per_step, "view"))
    traced = [f"{r['variant']}={r['traces']}" for r in rows if r["traces"] is not None]
    if traced:
        print("tf.function traces of the train step: " + ", ".join(traced))
    print(f"\nratios are medians of per-round paired ratios; load average now {os.getloadavg()[0]:.1f}")
    if "histokd_fit" in runners and ref:
        ratio = next(r["ratio_vs_torch"] for r in rows if r["variant"] == "histokd_fit")
        print(f"histokd full method step / PyTorch eager = {ratio:.2f} (target >= 1.3)")
    for runner in runners.values():
        if hasattr(runner, "close"):
            runner.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "times": times, "cpu": cpu}, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
