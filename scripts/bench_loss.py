#!/usr/bin/env python
"""Benchmark: the VICReg loss (value + gradients), histokd vs the textbook [D, D] form.

VICReg's covariance term (Bardes et al. 2022; More From Less §2.2) is written in the
authors' code as ``off_diagonal(zᵀz / (N−1)).pow(2).sum() / D``: a [D, D] matrix per
branch, its mask and their gradients. histokd computes the same number from the
[N, N] Gram matrix when the batch is smaller than the embedding
(``histokd.losses.vicreg._cov_sq_sum``: ||ZᵀZ||²_F = ||ZZᵀ||²_F) and takes the
diagonal from the per-dimension variances. This script times one loss evaluation
with the gradients of both embeddings, side by side in one run, for:

* ``histokd``         ``histokd.losses.vicreg_terms`` in a ``tf.function``;
* ``textbook_tf``     the authors' formula (masked [D, D] covariance) in a ``tf.function``;
* ``textbook_torch``  the authors' formula in PyTorch eager (when torch is installed).

Shapes: the CPU benchmark step (N = 32 per view, expander 2048), the paper's
(batch 128, expander 3×8192, §2.2) and a larger batch. Medians of ``--rounds``
runs; the ratio columns are textbook time / histokd time; the values agree to
float32 rounding (printed). The "[D,D] / [N,N]" column is the size of one
covariance or Gram matrix in float32.

Run:
    python scripts/bench_loss.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SHAPES = ((32, 2048), (128, 2048), (128, 8192), (256, 8192))


def _timed(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="timed runs per variant and shape (median)")
    args = p.parse_args(argv)

    import tensorflow as tf

    from histokd.losses import vicreg_terms

    try:
        import torch
    except ImportError:  # optional reference
        torch = None

    @tf.function
    def ours(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = vicreg_terms(a, b)["loss"]
        return loss, tape.gradient(loss, [a, b])

    def textbook_terms(za, zb, xp):
        """Bardes et al.'s reference code, written for TF (xp=tf) or torch (xp=torch)."""
        n, d = za.shape

        def branch(z):
            z = z - z.mean(0) if xp is torch else z - tf.reduce_mean(z, 0)
            if xp is torch:
                std = torch.sqrt(z.var(dim=0) + 1e-4)
                cov = (z.T @ z) / (n - 1)
                off = cov.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()
                return torch.mean(torch.relu(1 - std)), off.pow(2).sum() / d
            cov = tf.matmul(z, z, transpose_a=True) / (n - 1)
            std = tf.sqrt(tf.linalg.diag_part(cov) + 1e-4)
            off = cov * (1.0 - tf.eye(d))
            return tf.reduce_mean(tf.nn.relu(1 - std)), tf.reduce_sum(off ** 2) / d

        va, ca = branch(za)
        vb, cb = branch(zb)
        inv = ((za - zb) ** 2).mean() if xp is torch else tf.reduce_mean((za - zb) ** 2)
        return 25.0 * inv + 25.0 * 0.5 * (va + vb) + (ca + cb)

    @tf.function
    def textbook_tf(a, b):
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = textbook_terms(a, b, tf)
        return loss, tape.gradient(loss, [a, b])

    def textbook_torch(a, b):
        a = a.detach().requires_grad_(True)
        b = b.detach().requires_grad_(True)
        loss = textbook_terms(a, b, torch)
        loss.backward()
        return loss, (a.grad, b.grad)

    rows = []
    for n, d in SHAPES:
        rng = np.random.default_rng(0)
        za = rng.standard_normal((n, d)).astype("float32")
        zb = (0.5 * za + rng.standard_normal((n, d))).astype("float32")
        a, b = tf.constant(za), tf.constant(zb)
        res = {}
        for name, fn in (("histokd", ours), ("textbook_tf", textbook_tf)):
            out = {}

            def run(fn=fn, out=out):
                loss, grads = fn(a, b)
                out["loss"] = float(loss)
                _ = grads[0].numpy()

            res[name] = (_timed(run, args.rounds), out["loss"])
        if torch is not None:
            ta, tb = torch.from_numpy(za), torch.from_numpy(zb)
            out = {}

            def run_torch(out=out):
                loss, _ = textbook_torch(ta, tb)
                out["loss"] = loss.item()

            res["textbook_torch"] = (_timed(run_torch, args.rounds), out["loss"])
        rows.append((n, d, res))

    names = ["histokd", "textbook_tf"] + (["textbook_torch"] if torch is not None else [])
    print("# VICReg loss + gradients of both embeddings (λ=25, μ=25, ν=1); "
          f"median of {args.rounds} runs; ms per evaluation")
    head = "| N | D | " + " | ".join(f"{k} ms" for k in names) + " | × textbook_tf |"
    head += (" × textbook_torch |" if torch is not None else "") + " [D,D] / [N,N] | loss (histokd / textbook) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n, d, res in rows:
        cells = [f"{res[k][0] * 1e3:.2f}" for k in names]
        ratio = [f"{res['textbook_tf'][0] / res['histokd'][0]:.1f}"]
        if torch is not None:
            ratio.append(f"{res['textbook_torch'][0] / res['histokd'][0]:.1f}")
        size = f"{d * d * 4 / 2**20:.0f} MiB / {n * n * 4 / 2**10:.0f} KiB"
        loss = f"{res['histokd'][1]:.5f} / {res['textbook_tf'][1]:.5f}"
        print(f"| {n} | {d} | " + " | ".join(cells + ratio + [size, loss]) + " |")


if __name__ == "__main__":
    main()
