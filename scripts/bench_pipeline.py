#!/usr/bin/env python
"""Pairs/s of the paired-view pipeline: TFRecords -> decode -> Table S1 -> two views.

Compares, side by side in one run, (a) the Table S1 augmentations built from
stock Keras 3 layers (``histokd.data.augment.stock_augment_batch``) and (b)
histokd's fused implementation (``histokd.data.views.make_view_maker``), at
224 and 64 px. Each implementation gets its own fresh iterator per round
(warm-up batches first, so XLA compilation and the prefetch buffer are not
timed); rounds alternate between implementations so that both see the same
machine load. Reports the median over rounds of

* ``pairs/s``: wall-clock throughput (what training sees), and
* ``pairs/cpu-s``: pairs per CPU-second of this process (robust to other
  processes competing for the cores; x cores = the ceiling on a quiet box).

The TFRecords (PNG images, features ``image`` bytes + ``label`` int64, the
layout of ``histokd data prepare``) are written into a temporary directory
from synthetic H&E-like tiles (smoothed noise, pink stroma, purple nuclei).

Usage:
    python scripts/bench_pipeline.py                 # 224 and 64 px, 5 rounds
    python scripts/bench_pipeline.py --sizes 224 --rounds 7 --batches 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import histokd  # noqa: E402,F401  (sets the Keras backend)
import tensorflow as tf  # noqa: E402

from histokd.data.augment import AugmentConfig, StockLayers, stock_augment_batch  # noqa: E402
from histokd.data.views import downsample_batch, make_view_maker  # noqa: E402

AUTOTUNE = tf.data.AUTOTUNE


# ---------------------------------------------------------------------------
# data


def he_like_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Synthetic H&E-ish uint8 tiles: pink stroma texture with purple nuclei."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    pink = np.array([0.93, 0.62, 0.78])
    purple = np.array([0.35, 0.20, 0.55])
    white = np.array([0.96, 0.94, 0.95])
    for i in range(n):
        coarse = rng.random((size // 8 + 2, size // 8 + 2, 2)).astype(np.float32)
        field = tf.image.resize(coarse[None], [size, size], method="bicubic")[0].numpy()
        fine = rng.normal(0, 0.04, (size, size, 1))
        nuclei = (field[..., :1] > 0.72).astype(np.float64)
        lumen = (field[..., 1:2] > 0.85).astype(np.float64)
        img = pink * (0.85 + 0.3 * field[..., 1:2]) + fine
        img = img * (1 - nuclei) + purple * nuclei * (0.9 + 0.2 * field[..., :1])
        img = img * (1 - lumen) + white * lumen
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def write_records(path: Path, images: np.ndarray, shards: int = 4) -> list[str]:
    files = [str(path / f"bench-{s:02d}.tfrecord") for s in range(shards)]
    writers = [tf.io.TFRecordWriter(f) for f in files]
    for i, img in enumerate(images):
        png = tf.io.encode_png(img).numpy()
        ex = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i % 9])),
                }
            )
        )
        writers[i % shards].write(ex.SerializeToString())
    for w in writers:
        w.close()
    return files


def _parse(serialized):
    ex = tf.io.parse_single_example(
        serialized,
        {
            "image": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
        },
    )
    return tf.io.decode_png(ex["image"], channels=3), ex["label"]


def decoded(files, size, batch):
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=AUTOTUNE)
    ds = ds.map(_parse, num_parallel_calls=AUTOTUNE)
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, [size, size, 3]), y))
    return ds.repeat().batch(batch, drop_remainder=True)


# ---------------------------------------------------------------------------
# the two pipelines


def fused_pipeline(files, size, batch, downsample):
    vm = make_view_maker("asymmetric", size, downsample=downsample, seed=0)
    return vm.map(decoded(files, size, batch)).prefetch(AUTOTUNE)


def stock_pipeline(files, size, batch, downsample):
    cfg = AugmentConfig()
    layers = StockLayers(cfg)  # Keras layers must be built outside the traced function
    seeds = tf.data.Dataset.random(seed=0, rerandomize_each_iteration=True).batch(2)

    def views(el, s):
        x, y = el
        pair = tf.random.experimental.stateless_split(s, 2)
        xf = tf.cast(x, tf.float32) / 255.0
        a = downsample_batch(xf, downsample) if downsample else xf
        return {"view_a": stock_augment_batch(a, pair[0], cfg, layers),
                "view_b": stock_augment_batch(xf, pair[1], cfg, layers)}, y

    ds = tf.data.Dataset.zip((decoded(files, size, batch), seeds))
    return ds.map(views, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def decode_only(files, size, batch, downsample):
    return decoded(files, size, batch).prefetch(AUTOTUNE)


def time_round(ds, batches, warmup, batch):
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        views, _ = next(it)
    _ = views["view_a"].shape if isinstance(views, dict) else views.shape
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del it
    return batches * batch / wall, batches * batch / max(cpu, 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=16, help="timed batches per round")
    ap.add_argument("--warmup", type=int, default=6, help="untimed batches per round")
    ap.add_argument("--downsample", type=int, default=0,
                    help="view_a downsampled to this size (0: both views full resolution)")
    ap.add_argument("--no-decode-row", action="store_true", help="skip the decode-only row")
    ap.add_argument("--no-stock", action="store_true",
                    help="skip the (slow) stock row; ratios are then against the fused row")
    args = ap.parse_args()
    if args.rounds < 5:
        ap.error("--rounds must be >= 5 (medians of at least 5 rounds)")

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}; batch {args.batch}, {args.rounds} rounds x "
          f"{args.batches} batches, view_a downsample: {args.downsample or 'none'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            d = Path(tmp) / str(size)
            d.mkdir()
            files = write_records(d, he_like_tiles(args.images, size, seed=size))
            impls = {"stock Keras layers": stock_pipeline, "histokd fused": fused_pipeline}
            if args.no_stock:
                del impls["stock Keras layers"]
            if not args.no_decode_row:
                impls["decode only (ceiling)"] = decode_only
            results = {k: ([], []) for k in impls}
            # warm the traces/XLA caches once, untimed
            for name, make in impls.items():
                time_round(make(files, size, args.batch, args.downsample or None), 1, 2, args.batch)
            for _ in range(args.rounds):
                for name, make in impls.items():
                    w, c = time_round(make(files, size, args.batch, args.downsample or None),
                                      args.batches, args.warmup, args.batch)
                    results[name][0].append(w)
                    results[name][1].append(c)
            ref = "histokd fused" if args.no_stock else "stock Keras layers"
            base = statistics.median(results[ref][0])
            base_c = statistics.median(results[ref][1])
            for name, (w, c) in results.items():
                rows.append((size, name, statistics.median(w), statistics.median(c),
                             statistics.median(w) / base, statistics.median(c) / base_c,
                             min(w), max(w)))

    print()
    ref = "fused" if args.no_stock else "stock"
    hdr = f"{'size':>5}  {'pipeline':<22} {'pairs/s':>8} {'(min-max)':>15} {'pairs/cpu-s':>11} " \
          f"{'x ' + ref:>8} {'x ' + ref + '(cpu)':>12}"
    print(hdr)
    print("-" * len(hdr))
    for size, name, w, c, r, rc, lo, hi in rows:
        print(f"{size:>5}  {name:<22} {w:8.1f} {f'({lo:.0f}-{hi:.0f})':>15} {c:11.1f} "
              f"{r:8.2f} {rc:12.2f}")
    print(f"\nload average after run: {os.getloadavg()[0]:.1f} "
          "(values above the core count mean other processes shared the cores)")


if __name__ == "__main__":
    main()
