"""Arithmetic-rate helpers shared by the benchmarks (scripts only; not part of the library).

A benchmark that reports only "x items/s, y× the reference" cannot say how much
faster the step *could* be on the machine at hand. These helpers add the two
numbers that answer it:

* :func:`graph_flops` — floating-point operations of one call of a
  ``tf.function``, counted by TensorFlow's profiler on the traced graph
  (convolutions, matrix products and, for a training step, their gradient ops;
  element-wise ops count one per element). The same count applies to a PyTorch
  implementation of the same model, so both sides get a GFLOP/s figure.
* :func:`gemm_rate` — GFLOP/s of one large float32 matrix product (4096 × 4096 ×
  4096) in TensorFlow on this machine, median of several runs, measured in the
  same process as the benchmark. It is the practical peak of the dense kernels
  (oneDNN / Eigen) that convolutions and matrix products run on; a step that
  already runs at a large fraction of it can only get faster by doing less
  arithmetic or by using lower precision.

Example:
    >>> flops = graph_flops(tf.function(model), tf.TensorSpec([4, 256, 256, 3], tf.uint8))
    >>> peak = gemm_rate()
    >>> print(format_rate(flops / 4, items_per_s=0.6, peak=peak))
"""

from __future__ import annotations

import statistics
import time


def graph_flops(fn, *input_signature) -> int:
    """Floating-point operations of one call of ``fn`` (a ``tf.function``) on inputs of ``input_signature``.

    Args:
        fn: ``tf.function``.
        *input_signature: ``tf.TensorSpec`` (or tensors) for its positional arguments.

    Returns:
        int. Total float operations of the traced graph (TensorFlow profiler).
    """
    from tensorflow.python.profiler import model_analyzer, option_builder

    graph = fn.get_concrete_function(*input_signature).graph
    builder = option_builder.ProfileOptionBuilder
    opts = builder(builder.float_operation()).with_empty_output().build()
    return int(model_analyzer.profile(graph, options=opts).total_float_ops)


def gemm_rate(n: int = 4096, runs: int = 5) -> float:
    """Median GFLOP/s of an ``n × n × n`` float32 matrix product in TensorFlow (after one warm-up)."""
    import tensorflow as tf

    a = tf.random.normal([n, n], seed=1)
    b = tf.random.normal([n, n], seed=2)
    mm = tf.function(tf.linalg.matmul)
    mm(a, b).numpy()
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mm(a, b).numpy()
        rates.append(2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def format_rate(flops_per_item: float, items_per_s: float, peak: float) -> str:
    """``"123 GFLOP/s (61 % of GEMM)"`` for a rate of ``items_per_s`` items of ``flops_per_item`` each."""
    rate = flops_per_item * items_per_s / 1e9
    return f"{rate:.0f} GFLOP/s ({100.0 * rate / peak:.0f} % of GEMM)"


def ceiling_line(what: str, flops_per_item: float, peak: float, unit: str) -> str:
    """One line: the work per item and the rate at 100 % of the GEMM rate."""
    return (f"{what}: {flops_per_item / 1e9:.2f} GFLOP per {unit} (TensorFlow profiler); float32 GEMM "
            f"on this machine {peak:.0f} GFLOP/s (TF, 4096², median of 5) -> at most "
            f"{peak * 1e9 / flops_per_item:.2f} {unit}s/s at 100 % of it")
