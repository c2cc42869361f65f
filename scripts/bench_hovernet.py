#!/usr/bin/env python
"""Tiles/s of the Keras HoVer-Net forward pass and of its post-processing on CPU.

Fast mode, 6 types (the PanNuke model), batch 4 of 256×256 uint8 tiles. Variants,
timed side by side in one process with rounds interleaved (so that load drift
on a shared machine hits all of them alike):

* ``torch_cl``     – a PyTorch HoVer-Net written out from the official architecture
  (state-dict keys as the released checkpoints; checked against the numerical
  oracle before timing), ``channels_last``, ``inference_mode``, one thread per
  core — the configuration in which TIAToolbox's port was measured.
* ``keras``        – ``histokd.nuclei.HoVerNet`` in a ``tf.function``.
* ``keras_fused``  – the same weights with conv → BN → ReLU folded
  (``histokd.nuclei.hovernet.fuse_batchnorm``), the variant mask building uses.
* ``keras_xla``    – (``--extra``) the fused model compiled with XLA (``jit_compile``).
* ``postproc``     – ``histokd.nuclei.postprocess.postprocess`` of one 164×164 tile
  of real-looking maps (the post-processing fixture), reported per tile.

All models hold the oracle weights of tests/fixtures/hovernet (so outputs are
realistic and the Keras/torch outputs can be compared). The table reports the
median (min–max) over ``--rounds`` rounds of ``--steps`` batches each and the
per-round paired speed ratio to ``torch_cl``, and each variant's arithmetic rate:
the forward graph's float operations per tile (TensorFlow profiler; the torch
model computes the same) times tiles/s, as GFLOP/s and as a share of this
machine's float32 GEMM rate measured in the same run (``scripts/_roofline.py``).
The lines above the table give the tiles/s a forward pass would reach at 100 %
of that rate, and its kernel floor: every convolution of the fused forward graph
re-run alone with its real shapes, one after another, summed — the tiles/s if
nothing but those kernels ran (``--no-kernels`` skips it).

Usage::

    python scripts/bench_hovernet.py                 # default table
    python scripts/bench_hovernet.py --rounds 7 --extra
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures" / "hovernet"


def oracle_state_dict(mode="fast", n=6):
    stats = np.load(FIX / f"bn_stats_{mode}_{n}types.npz")
    sd = OrderedDict()
    for line in (FIX / f"keys_{mode}_{n}types.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        shape = tuple(int(s) for s in shape.split("x"))
        if "running" in key:
            sd[key] = stats[key].astype(np.float32)
            continue
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if len(shape) == 4:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif key.endswith("bn.weight"):
            v = 1 + 0.1 * rng.standard_normal(shape)
        elif key.endswith("bn.bias"):
            v = 0.1 * rng.standard_normal(shape)
        else:
            v = 0.01 * rng.standard_normal(shape)
        sd[key] = v.astype(np.float32)
    return sd


def torch_hovernet(num_types=6, ksize=3):
    """The official fast-mode network in PyTorch (module names = checkpoint keys)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SamePad(nn.Module):
        def __init__(self, k, s):
            super().__init__()
            self.k, self.s = k, s

        def forward(self, x):
            r = x.shape[2] % self.s
            pad = max(self.k - (self.s if r == 0 else r), 0)
            a = pad // 2
            return F.pad(x, (a, pad - a, a, pad - a))

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-5)

    class ResGroup(nn.Module):
        def __init__(self, cin, ch, n, stride):
            super().__init__()
            self.units = nn.ModuleList()
            c = cin
            for i in range(n):
                s = stride if i == 0 else 1
                mods = [] if i == 0 else [("preact/bn", bn(c)), ("preact/relu", nn.ReLU(True))]
                mods += [("conv1", nn.Conv2d(c, ch[0], 1, bias=False)), ("conv1/bn", bn(ch[0])),
                         ("conv1/relu", nn.ReLU(True)), ("conv2/pad", SamePad(3, s)),
                         ("conv2", nn.Conv2d(ch[0], ch[1], 3, stride=s, bias=False)),
                         ("conv2/bn", bn(ch[1])), ("conv2/relu", nn.ReLU(True)),
                         ("conv3", nn.Conv2d(ch[1], ch[2], 1, bias=False))]
                self.units.append(nn.Sequential(OrderedDict(mods)))
                c = ch[2]
            self.shortcut = nn.Conv2d(cin, ch[2], 1, stride=stride, bias=False)
            self.blk_bna = nn.Sequential(OrderedDict([("bn", bn(c)), ("relu", nn.ReLU(True))]))

        def forward(self, x):
            sc = self.shortcut(x)
            for u in self.units:
                x = u(x) + sc
                sc = x
            return self.blk_bna(x)

    def crop(x, c):
        t = c // 2
        return x[:, :, t:x.shape[2] - (c - t), t:x.shape[3] - (c - t)]

    class Dense(nn.Module):
        def __init__(self, cin, n):
            super().__init__()
            self.units = nn.ModuleList()
            c = cin
            for _ in range(n):
                self.units.append(nn.Sequential(OrderedDict([
                    ("preact_bna/bn", bn(c)), ("preact_bna/relu", nn.ReLU(True)),
                    ("conv1", nn.Conv2d(c, 128, 1, bias=False)), ("conv1/bn", bn(128)),
                    ("conv1/relu", nn.ReLU(True)),
                    ("conv2", nn.Conv2d(128, 32, ksize, groups=4, bias=False))])))
                c += 32
            self.blk_bna = nn.Sequential(OrderedDict([("bn", bn(c)), ("relu", nn.ReLU(True))]))

        def forward(self, x):
            for u in self.units:
                y = u(x)
                x = torch.cat([crop(x, x.shape[2] - y.shape[2]), y], 1)
            return self.blk_bna(x)

    def branch(out):
        return nn.Sequential(OrderedDict([
            ("u3", nn.Sequential(OrderedDict([("conva", nn.Conv2d(1024, 256, ksize, bias=False)),
                                              ("dense", Dense(256, 8)),
                                              ("convf", nn.Conv2d(512, 512, 1, bias=False))]))),
            ("u2", nn.Sequential(OrderedDict([("conva", nn.Conv2d(512, 128, ksize, bias=False)),
                                              ("dense", Dense(128, 4)),
                                              ("convf", nn.Conv2d(256, 256, 1, bias=False))]))),
            ("u1", nn.Sequential(OrderedDict([("conva/pad", SamePad(ksize, 1)),
                                              ("conva", nn.Conv2d(256, 64, ksize, bias=False))]))),
            ("u0", nn.Sequential(OrderedDict([("bn", bn(64)), ("relu", nn.ReLU(True)),
                                              ("conv", nn.Conv2d(64, out, 1, bias=True))])))]))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = nn.Sequential(OrderedDict([("pad", SamePad(7, 1)),
                                                    ("/", nn.Conv2d(3, 64, 7, bias=False)),
                                                    ("bn", bn(64)), ("relu", nn.ReLU(True))]))
            self.d0 = ResGroup(64, (64, 64, 256), 3, 1)
            self.d1 = ResGroup(256, (128, 128, 512), 4, 2)
            self.d2 = ResGroup(512, (256, 256, 1024), 6, 2)
            self.d3 = ResGroup(1024, (512, 512, 2048), 3, 2)
            self.conv_bot = nn.Conv2d(2048, 1024, 1, bias=False)
            self.decoder = nn.ModuleDict(OrderedDict([("tp", branch(num_types)), ("np", branch(2)),
                                                      ("hv", branch(2))]))

        def forward(self, x):
            x = x / 255.0
            d0 = self.d0(self.conv0(x))
            d1 = self.d1(d0)
            d2 = self.d2(d1)
            d3 = self.conv_bot(self.d3(d2))
            d0, d1 = crop(d0, 92), crop(d1, 36)
            up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest")  # noqa: E731
            out = {}
            for name, b in self.decoder.items():
                u3 = b.u3(up(d3) + d2)
                u2 = b.u2(up(u3) + d1)
                u1 = b.u1(up(u2) + d0)
                out[name] = b.u0(u1)
            return out

    return Net()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="batches per variant per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--extra", action="store_true", help="also time the XLA-compiled variant")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-kernels", action="store_true", help="skip timing the forward's dense kernels alone")
    args = ap.parse_args(argv)

    import histokd  # noqa: F401  (sets the Keras backend)
    import tensorflow as tf

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _roofline import ceiling_line, format_rate, gemm_rate, graph_flops, kernel_line, kernel_time

    from histokd.nuclei.checkpoint import load_state_dict_into
    from histokd.nuclei.hovernet import HoVerNet, fuse_batchnorm
    from histokd.nuclei.postprocess import postprocess

    cores = os.cpu_count()
    sd = oracle_state_dict()
    oracle = np.load(FIX / "oracle_fast_6types.npz")
    rng = np.random.default_rng(0)
    x = np.concatenate([oracle["input_uint8"], rng.integers(0, 256, (max(args.batch - 2, 0), 256, 256, 3),
                                                            dtype=np.uint8)])[:args.batch]

    variants = {}
    model = load_state_dict_into(HoVerNet("fast", 6), sd)
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    f_keras = tf.function(lambda t: model(t, training=False))
    variants["keras"] = lambda: {k: v.numpy() for k, v in f_keras(x).items()}
    fused = fuse_batchnorm(model)
    f_fused = tf.function(lambda t: fused(t, training=False))
    variants["keras_fused"] = lambda: {k: v.numpy() for k, v in f_fused(x).items()}
    flops_tile = graph_flops(f_fused, tf.TensorSpec([args.batch, 256, 256, 3], tf.uint8)) / args.batch
    checks = {}
    ref = {k: oracle["out_" + k] for k in ("np", "hv", "tp")}

    def err(out):
        return max(float(np.abs(out[k][:2] - ref[k]).max() / ref[k].std()) for k in ref)

    if args.extra:
        f_xla = tf.function(lambda t: fused(t, training=False), jit_compile=True)
        variants["keras_xla"] = lambda: {k: v.numpy() for k, v in f_xla(x).items()}
    if not args.no_torch:
        import torch

        torch.set_num_threads(cores)
        tnet = torch_hovernet().eval()
        tnet.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
        tnet = tnet.to(memory_format=torch.channels_last)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)

        def run_torch():
            with torch.inference_mode():
                out = tnet(xt)
            return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}

        variants = {"torch_cl": run_torch, **variants}

    maps = np.load(FIX / "postproc_oracle.npz")
    sl = (slice(46, 210), slice(46, 210))
    tile_np, tile_hv = maps["np_prob"][sl], maps["hv"][sl]
    tile_tp = np.eye(6, dtype=np.float32)[maps["true_type_map"][sl]]
    variants["postproc"] = lambda: [postprocess(tile_np, tile_hv, tile_tp) for _ in range(args.batch)]

    for name, fn in variants.items():  # warm-up (tracing) + correctness check
        out = fn()
        if name != "postproc":
            checks[name] = err(out)

    times = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                variants[name]()
            times[name].append((time.perf_counter() - t0) / args.steps)
            cpu[name].append((time.process_time() - c0) / args.steps)

    print(f"HoVer-Net fast/6 types, {params:,} parameters, batch {args.batch} of 256×256, "
          f"{cores} CPU cores, {args.rounds} rounds × {args.steps} batches")
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = float("nan")
    print(f"load average at the end: {load:.1f} (other processes share the cores: compare ratios)")
    peak = gemm_rate()
    print(ceiling_line("forward", flops_tile, peak, "tile"))
    if not args.no_kernels:
        kt = kernel_time(f_fused, tf.TensorSpec([args.batch, 256, 256, 3], tf.uint8))
        print(kernel_line("kernel floor of the fused forward", kt, args.batch, "tile"))
    print(f"{'variant':<13} {'s/batch median (min–max)':>27} {'tiles/s':>8} {'× torch_cl (paired)':>20} "
          f"{'CPU s/batch':>12} {'max|Δ|/std vs oracle':>21}  arithmetic rate")
    base = times.get("torch_cl")
    for name, ts in times.items():
        med = float(np.median(ts))
        ratio = ""
        if base is not None and name != "torch_cl":
            ratio = f"{np.median(np.array(base) / np.array(ts)):.2f}"
        label = "post-proc" if name == "postproc" else name
        print(f"{label:<13} {med:>10.3f} ({min(ts):.3f}–{max(ts):.3f}){'':>5} {args.batch / med:>8.2f} "
              f"{ratio:>20} {np.median(cpu[name]):>12.2f} {checks.get(name, float('nan')):>21.1e}  "
              f"{'' if name == 'postproc' else format_rate(flops_tile, args.batch / med, peak)}")
    return times


if __name__ == "__main__":
    sys.exit(main() and 0)
