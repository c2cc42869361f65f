"""Benchmark: Macenko normalisation throughput, histokd vs peers, side by side.

Normalises a batch of 256 real-looking 224x224 tiles (the Kather 2016 tiles
under ../shared/data replicated to 256 when present, else the procedural
H&E tiles of histokd.data.synthetic) to the same target (torchstain's default
HERef / maxCRef) with:

* histokd        MacenkoNormalizer.transform on the whole batch (one graph call;
                 per-pixel passes XLA-compiled, HISTOKD_MACENKO_XLA=0 to compare;
                 internally chunks of 4 tiles, two in flight)
* histokd unchunked  the same ops over the whole batch at once (previous design)
* histokd tf.data the same step inside Dataset.map after batch (the training path;
                 steady state: one running iterator, one batch per timed run)
* torchstain numpy / torch / tensorflow backends, tile by tile (their API)
* macenko-pca    Rust stain separation + deconvolution + maxC rescale +
                 reconstruction with the target stains, tile by tile
* floor          one log, one 3x3 matmul, one exp over the same batch (TF): the
                 practical limit of any per-pixel recolouring (the faster of the
                 whole batch and its two halves side by side)

Process settings: by default the process is configured as ``histokd normalize``
configures itself, so the benchmark measures that path: the XLA:CPU option of
``histokd.runtime.prefer_sequential_xla_cpu`` (``--xla-cpu default`` keeps XLA's
scheduling) and the thread pools of ``histokd.runtime.cpu_thread_plan`` with two
streams (on a CPU, intra-op ``cores // 2`` and inter-op 2, one group of cores per
chunk of tiles in flight; ``--threads tf`` keeps TensorFlow's defaults). The
per-tile peers are unaffected (torch uses its own 2 threads). Recorded figures per
machine: docs/benchmarks.md.

Reports the median of >= 5 timed runs (after warm-up) as tiles/s, the CPU time
per tile, ratios measured in the same run, and the parity of histokd with
torchstain numpy on the batch. The machine load is printed: on a shared
machine absolute figures move, ratios much less.

Run:
    python scripts/bench_stain.py [--runs 5] [--batch 256] [--peer-tiles 256]
        [--threads histokd|tf] [--xla-cpu histokd|default] [--skip ROW,...]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAXC_REF = np.array([1.9705, 1.0308])


def load_tiles(n: int):
    kather = SHARED / "kather2016_ishil100"
    files = sorted(kather.glob("*/*.png")) if kather.is_dir() else []
    if files:
        from histokd.stain.io import read_rgb

        tiles = np.stack([read_rgb(f) for f in files])
        src = f"{len(files)} Kather 2016 tiles from {kather}"
    else:
        from histokd.data.synthetic import make_synthetic_he

        tiles, _, _ = make_synthetic_he(n_per_class=16, image_size=224, seed=0)
        src = f"{len(tiles)} synthetic H&E tiles (histokd.data.synthetic; ../shared/data absent)"
    reps = int(math.ceil(n / len(tiles)))
    return np.ascontiguousarray(np.concatenate([tiles] * reps)[:n]), src


def timed(fn, runs: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def per_tile(fn, tiles):
    def run():
        for t in tiles:
            try:
                fn(t)
            except Exception:  # torchstain raises on background tiles; the cost still counts
                pass
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--peer-tiles", type=int, default=256,
                    help="tiles per timed run for the per-tile peers (torchstain tf uses at most 64)")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip, e.g. torchstain-tf")
    ap.add_argument("--threads", choices=("histokd", "tf"), default="histokd",
                    help="TF thread pools: what `histokd normalize` sets (on a CPU, one group of cores "
                         "per chunk stream) or TensorFlow's defaults")
    ap.add_argument("--xla-cpu", choices=("histokd", "default"), default="histokd",
                    help="XLA:CPU scheduling: what `histokd normalize` sets (each kernel's steps on "
                         "the calling thread) or XLA's default")
    args = ap.parse_args(argv)
    runs = max(5, args.runs)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    from histokd.runtime import apply_cpu_threads, prefer_sequential_xla_cpu

    if args.xla_cpu == "histokd":
        prefer_sequential_xla_cpu()  # as `histokd normalize` does, before anything is compiled

    import tensorflow as tf

    if args.threads == "histokd":
        from histokd.stain.macenko import PARALLEL_CHUNKS

        apply_cpu_threads("auto", streams=PARALLEL_CHUNKS)  # as `histokd normalize` does

    from histokd.stain import MacenkoNormalizer, make_stain_fn

    tiles, src = load_tiles(args.batch)
    b = len(tiles)
    load0 = os.getloadavg()
    print(f"tiles: batch of {b} x 224x224 from {src}")
    threading = tf.config.threading
    print(f"machine: {os.cpu_count()} CPUs, load average {load0[0]:.1f} (1 min) at start; "
          f"tensorflow {tf.__version__}; TF pools intra={threading.get_intra_op_parallelism_threads()} "
          f"inter={threading.get_inter_op_parallelism_threads()} (0 = TF default); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rows = []  # (name, tiles_per_run, wall, cpu, note)

    # histokd, one graph call on the batch
    norm = MacenkoNormalizer("torchstain")
    x = tf.constant(tiles)
    out_hk = norm.transform(x).numpy()
    w, c = timed(lambda: norm.transform(x).numpy(), runs)
    rows.append(("histokd", b, w, c, "chunks of 4 tiles, exact percentiles, XLA passes"))

    # histokd without chunking (the previous design), for the side-by-side gain
    from histokd.stain.macenko import macenko_transform

    he_t, mc_t = tf.constant(norm.target_fit.he), tf.constant(norm.target_fit.max_c)
    whole = tf.function(lambda xb: macenko_transform(xb, he_t, mc_t, chunk_size=None)[0])
    whole(x)
    w, c = timed(lambda: whole(x).numpy(), runs)
    rows.append(("histokd unchunked", b, w, c, "whole batch per op (previous design)"))

    # histokd inside tf.data (the training-pipeline path)
    stain = make_stain_fn("macenko", "torchstain")
    # steady state of a running pipeline (as in training): one iterator, one batch per run
    it = iter(tf.data.Dataset.from_tensors(x).repeat().map(stain))
    w, c = timed(lambda: next(it).numpy(), runs)
    rows.append(("histokd tf.data", b, w, c, "Dataset.map after batch, steady state"))

    # floor: one log, one 3x3 matmul, one exp (same batch, same framework)
    m_floor = tf.constant(np.eye(3, dtype=np.float32) * 0.9)

    @tf.function
    def floor(xb):
        od = math.log(240.0) - tf.math.log(tf.cast(xb, tf.float32) + 1.0)
        z = tf.linalg.matmul(tf.reshape(od, [-1, 3]), m_floor)
        return tf.cast(tf.minimum(240.0 * tf.exp(-z), 255.0), tf.uint8)

    @tf.function
    def floor_halves(xb):  # the two halves side by side (what the pools favour when intra < cores)
        half = tf.reshape(xb, [2, -1] + list(xb.shape[1:]))
        return tf.map_fn(floor, half, parallel_iterations=2, fn_output_signature=tf.uint8)

    w, c = min(timed(lambda: floor(x).numpy(), runs), timed(lambda: floor_halves(x).numpy(), runs))
    rows.append(("floor (log+3x3+exp)", b, w, c, "practical limit (whole batch or two halves side by side)"))

    peer_n = min(args.peer_tiles, b)
    peer_tiles = tiles[:peer_n]
    mads = None
    try:
        import torchstain

        if "torchstain-numpy" not in skip:
            tn = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
            w, c = timed(per_tile(lambda t: tn.normalize(t, stains=False), peer_tiles), runs)
            rows.append(("torchstain numpy", peer_n, w, c, "per tile"))
            mads = []
            for o, t in zip(out_hk, tiles[: min(b, 100)]):
                try:
                    r = tn.normalize(t, stains=False)[0]
                    mads.append(float(np.abs(o.astype(float) - r.astype(float)).mean()))
                except Exception:
                    mads.append(float("inf"))
        if "torchstain-torch" not in skip:
            import torch

            tt = torchstain.normalizers.MacenkoNormalizer(backend="torch")
            chw = [torch.from_numpy(t).permute(2, 0, 1).contiguous() for t in peer_tiles]
            w, c = timed(per_tile(lambda t: tt.normalize(t, stains=False), chw), runs)
            rows.append(("torchstain torch", peer_n, w, c,
                         f"per tile, {torch.get_num_threads()} torch threads"))
        if "torchstain-tf" not in skip:
            tft = torchstain.normalizers.MacenkoNormalizer(backend="tensorflow")
            n_tf = min(64, peer_n)
            chw = [tf.constant(np.transpose(t, (2, 0, 1))) for t in peer_tiles[:n_tf]]
            w, c = timed(per_tile(lambda t: tft.normalize(t, stains=False), chw), runs)
            rows.append(("torchstain tensorflow", n_tf, w, c, "per tile (eager)"))
    except ImportError:
        print("torchstain not installed: its rows are skipped (pip install torchstain torch)")

    if "macenko-pca" not in skip:
        try:
            import macenko_pca as mp

            ref_w = np.stack([HE_REF[:, 0], HE_REF[:, 1], np.cross(HE_REF[:, 0], HE_REF[:, 1])], 1)
            ref_w = ref_w / np.linalg.norm(ref_w, axis=0, keepdims=True)
            sda_scale = 255.0 / math.log(256.0)  # macenko-pca works in SDA units
            hi = mp.stain_color_map["hematoxylin"]
            ei = mp.stain_color_map["eosin"]

            def mpca(t):
                im = t.astype(np.float32)
                w_ = mp.rgb_separate_stains_macenko_pca(im)
                ih, ie = mp.find_stain_index(hi, w_), mp.find_stain_index(ei, w_)
                conc = mp.rgb_color_deconvolution(im, w_)
                out = np.zeros_like(conc)
                for j, (k, mref) in enumerate(((ih, MAXC_REF[0]), (ie, MAXC_REF[1]))):
                    ch = conc[:, :, k]
                    out[:, :, j] = ch * (mref * sda_scale / max(np.percentile(ch, 99), 1e-6))
                return np.clip(mp.reconstruct_rgb(out, ref_w.astype(np.float32)), 0, 255).astype(np.uint8)

            w, c = timed(per_tile(mpca, peer_tiles), runs)
            rows.append(("macenko-pca", peer_n, w, c, "per tile; + maxC rescale and target recolour"))
        except ImportError:
            print("macenko-pca not installed: its row is skipped (pip install macenko-pca)")

    load1 = os.getloadavg()
    rate = {name: n / w for name, n, w, c, _ in rows}
    hk = rate["histokd"]
    peers = {k: v for k, v in rate.items() if not k.startswith(("histokd", "floor"))}
    fastest = max(peers, key=peers.get) if peers else None
    print()
    print(f"{'method':24s} {'tiles/run':>9s} {'median s':>9s} {'tiles/s':>9s} {'CPU ms/tile':>11s} "
          f"{'histokd x':>9s}  note")
    for name, n, w, c, note in rows:
        ratio = hk / rate[name]
        print(f"{name:24s} {n:9d} {w:9.3f} {n / w:9.1f} {1000 * c / n:11.2f} {ratio:9.2f}  {note}")
    print()
    if fastest:
        print(f"histokd vs fastest peer ({fastest}): {hk / peers[fastest]:.2f}x  "
              f"(target >= 5x); histokd: {hk:.0f} tiles/s (target >= 1000)")
    print(f"floor / histokd: {rate['floor (log+3x3+exp)'] / hk:.2f}x")
    if mads:
        m = np.asarray(mads)
        print(f"parity vs torchstain numpy on {len(m)} tiles: median MAD {np.median(m):.4f}, "
              f"max {m.max():.4f} grey levels, {np.mean(m <= 1.0):.0%} of tiles <= 1.0")
    print(f"load average {load1[0]:.1f} (1 min) at end; runs per row: {runs} (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
