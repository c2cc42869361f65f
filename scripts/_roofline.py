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
* :func:`kernel_time` — the time the step's own dense kernels take alone: every
  matrix product and convolution of the traced graph (forward and gradient ops,
  with their real shapes, transposes, strides and groups) is re-run in isolation,
  one after another, with this machine's TensorFlow kernels, and the times are
  summed over the step. Where the 4096² GEMM rate is an optimistic peak (small or
  thin products run slower), this is the practical floor of *this* step: whatever
  the framework does around the kernels, a step that runs its kernels one by one
  takes at least this long. When the process runs kernels side by side
  (``histokd train``'s thread plan on a CPU: intra-op ``cores // 2``, inter-op 2,
  one encoder chain per view), the kernels are timed with those smaller pools and
  the sum is divided by the number of kernels that can run at once
  (:func:`concurrent_slots`): the floor of a perfectly overlapped step.

Example:
    >>> flops = graph_flops(tf.function(model), tf.TensorSpec([4, 256, 256, 3], tf.uint8))
    >>> peak = gemm_rate()
    >>> print(format_rate(flops / 4, items_per_s=0.6, peak=peak))
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Dict, List, Tuple

# Dense kernels re-timed by kernel_time: matrix products and convolutions with their gradients.
DENSE_OPS = (
    "MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum",
    "Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter",
    "DepthwiseConv2dNative", "DepthwiseConv2dNativeBackpropInput",
    "DepthwiseConv2dNativeBackpropFilter",
    "Conv3D", "Conv3DBackpropInputV2", "Conv3DBackpropFilterV2",
)


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


def concurrent_slots() -> int:
    """Kernels this process can run at once: cores // intra-op threads, at most the
    inter-op threads (1 with TensorFlow's default pools); ``histokd.methods.base.kernel_slots``."""
    from histokd.runtime import kernel_slots

    return kernel_slots()


def slots_for(cores: int, intra: int, inter: int) -> int:
    """:func:`concurrent_slots` for given pool sizes (0 = TensorFlow's default: all cores)."""
    from histokd.runtime import kernel_slots

    return kernel_slots(cores, intra, inter)


def gemm_rate(n: int = 4096, runs: int = 5) -> float:
    """Median GFLOP/s of an ``n × n × n`` float32 matrix product in TensorFlow (after one
    warm-up), times :func:`concurrent_slots` (the machine's rate when the process runs
    single-pool products side by side)."""
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
    return statistics.median(rates) * concurrent_slots()


def format_rate(flops_per_item: float, items_per_s: float, peak: float) -> str:
    """``"123 GFLOP/s (61 % of GEMM)"`` for a rate of ``items_per_s`` items of ``flops_per_item`` each."""
    rate = flops_per_item * items_per_s / 1e9
    return f"{rate:.0f} GFLOP/s ({100.0 * rate / peak:.0f} % of GEMM)"


def ceiling_line(what: str, flops_per_item: float, peak: float, unit: str) -> str:
    """One line: the work per item and the rate at 100 % of the GEMM rate."""
    return (f"{what}: {flops_per_item / 1e9:.2f} GFLOP per {unit} (TensorFlow profiler); float32 GEMM "
            f"on this machine {peak:.0f} GFLOP/s (TF, 4096², median of 5) -> at most "
            f"{peak * 1e9 / flops_per_item:.2f} {unit}s/s at 100 % of it")


def _graph_of(fn, *input_signature):
    return fn.get_concrete_function(*input_signature).graph


def dense_kernels(fn, *input_signature) -> List[Dict]:
    """The distinct dense kernels (:data:`DENSE_OPS`) of one call of ``fn``, with how often each runs.

    Args:
        fn: ``tf.function`` (its graph, gradient ops included when it computes gradients,
            is traced for ``input_signature``).
        *input_signature: ``tf.TensorSpec`` (or tensors) for its positional arguments.

    Returns:
        list of dicts ``{"type", "shapes", "count", "flops", "call"}``: ``call`` is a
        zero-argument ``tf.function`` that runs the kernel once on random inputs of the
        same shapes with the same attributes; ``flops`` the registered float operations
        of one run (TensorFlow's statistics, 2·m·k·n for products). Kernels whose input
        shapes are not static are skipped.
    """
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework import ops as tf_ops

    graph = _graph_of(fn, *input_signature)
    live = _live_ops(graph)
    found: Dict[Tuple, Dict] = {}
    for op in graph.get_operations():
        if op.type not in DENSE_OPS:
            continue
        if op.name not in live:
            continue
        shapes, consts = [], []
        for t in op.inputs:
            value = None
            if t.dtype.is_integer:  # sizes (input_sizes, filter_sizes): need their static value
                value = _static_int(t)
                if value is None:
                    break
            elif not t.shape.is_fully_defined():
                break
            shapes.append(tuple(t.shape.as_list()) if value is None else ("const", tuple(np.ravel(value))))
            consts.append(value)
        else:
            op_def = op.op_def
            inferred = {a for arg in op_def.input_arg for a in (arg.type_attr, arg.number_attr, arg.type_list_attr) if a}
            attrs = {}
            for name in sorted(op.node_def.attr):
                if name.startswith("_") or name in inferred:
                    continue
                value = op.get_attr(name)
                if isinstance(value, bytes):
                    value = value.decode()
                elif isinstance(value, list):
                    value = [v.decode() if isinstance(v, bytes) else v for v in value]
                attrs[name] = value
            key = (op.type, tuple(shapes), repr(sorted(attrs.items())))
            entry = found.get(key)
            if entry is None:
                flops = _matmul_flops(op) if "MatMul" in op.type else None
                if flops is None:
                    try:
                        flops = int(tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value or 0)
                    except (ValueError, KeyError, TypeError):
                        flops = 0
                entry = found[key] = {
                    "type": op.type,
                    "shapes": [s for s in shapes if s and s[0] != "const"],
                    "count": 0,
                    "flops": flops,
                    "call": _kernel_call(op.type, [a.name for a in op_def.input_arg],
                                         [t.dtype for t in op.inputs], shapes, consts, attrs),
                }
            entry["count"] += 1
    return list(found.values())


def _matmul_flops(op):
    """2·batch·m·k·n of a (batched) matrix product, transposes/adjoints included."""
    a, b = (t.shape.as_list() for t in op.inputs[:2])
    ta = op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
    tb = op.get_attr("transpose_b" if op.type == "MatMul" else "adj_y")
    m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
    n = b[-2] if tb else b[-1]
    batch = max(math.prod(a[:-2]), math.prod(b[:-2])) if len(a) > 2 or len(b) > 2 else 1
    return 2 * batch * m * k * n


def _static_int(t):
    """Static value of an integer tensor, including ``Shape``/``ShapeN`` of a static-shape tensor."""
    import numpy as np
    import tensorflow as tf

    if t.op.type in ("Shape", "ShapeN"):
        src = t.op.inputs[t.value_index if t.op.type == "ShapeN" else 0]
        if src.shape.is_fully_defined():
            return np.asarray(src.shape.as_list(), dtype=t.dtype.as_numpy_dtype)
    return tf.get_static_value(t)


def _live_ops(graph) -> set:
    """Names of the ops a call really runs: those the outputs or a stateful op (variable
    update, optimizer step) depend on. The traced graph also holds gradient ops nobody
    consumes (e.g. the gradient w.r.t. the input images), which the runtime prunes."""
    roots = [t.op for t in graph.outputs] + list(getattr(graph, "control_outputs", []))
    roots += [op for op in graph.get_operations()
              if op.op_def.is_stateful and op.type not in ("ReadVariableOp", "VarHandleOp", "Placeholder")]
    live, stack = set(), list(roots)
    while stack:
        op = stack.pop()
        if op.name in live:
            continue
        live.add(op.name)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return live


def _kernel_call(op_type, arg_names, dtypes, shapes, consts, attrs):
    """A ``tf.function`` that runs ``tf.raw_ops.<op_type>`` ``reps`` times one after another."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    inputs = {}
    for name, dtype, shape, const in zip(arg_names, dtypes, shapes, consts):
        if const is not None:
            inputs[name] = tf.constant(const, dtype=dtype)
        else:
            inputs[name] = tf.constant(rng.standard_normal(shape).astype(dtype.as_numpy_dtype))
    raw = getattr(tf.raw_ops, op_type)

    @tf.function(autograph=False)
    def call(reps):
        # one element of each result is carried to the next run: a data dependency, so
        # the runs go one after another and none can be pruned or hoisted
        def body(i, acc):
            out = raw(**inputs, **attrs)
            return i + 1, acc + tf.cast(tf.reshape(out, [-1])[0], tf.float32)

        return tf.while_loop(lambda i, acc: i < reps, body, (tf.constant(0), tf.constant(0.0)),
                             parallel_iterations=1)[1]

    return call


def time_kernel(call, target_s: float = 0.1, repeats: int = 3) -> float:
    """Median seconds of one run of a :func:`dense_kernels` ``call`` (runs batched so that
    one timed call lasts about ``target_s``; the loop adds a few microseconds per run)."""
    import tensorflow as tf

    call(tf.constant(1)).numpy()  # trace + warm-up
    t0 = time.perf_counter()
    call(tf.constant(1)).numpy()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(math.ceil(target_s / one), 3), 500))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call(tf.constant(reps)).numpy()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def kernel_time(fn, *input_signature, target_s: float = 0.1, verbose: bool = False) -> Dict:
    """Seconds per call of ``fn`` spent in its dense kernels when each runs alone (see module doc).

    Returns:
        dict with ``seconds`` (sum over kernels of count × isolated time, divided by
        :func:`concurrent_slots`), ``flops`` (their float operations), ``kernels``
        (number of kernel launches), ``distinct`` and ``slots``.
    """
    kernels = dense_kernels(fn, *input_signature)
    total = flops = launches = 0
    for k in kernels:
        t = time_kernel(k["call"], target_s)
        total += k["count"] * t
        flops += k["count"] * k["flops"]
        launches += k["count"]
        if verbose:
            rate = k["flops"] / t / 1e9 if k["flops"] else float("nan")
            print(f"  {k['type']:<28} {str(k['shapes']):<44} x{k['count']:<3} {t * 1e3:8.3f} ms {rate:6.0f} GFLOP/s")
    slots = concurrent_slots()
    return {"seconds": total / slots, "flops": flops, "kernels": launches, "distinct": len(kernels),
            "slots": slots}


def kernel_line(what: str, kt: Dict, items_per_call: float, unit: str) -> str:
    """One line: the kernels' time per call and the rate it allows."""
    rate = kt["flops"] / kt["seconds"] / 1e9 if kt["seconds"] else float("nan")
    alone = "each re-run alone" if kt.get("slots", 1) == 1 else (
        f"each re-run alone on this process's intra-op pool, {kt['slots']} at a time")
    return (f"{what}: its {kt['kernels']} dense kernels ({kt['distinct']} distinct), {alone}, take "
            f"{kt['seconds'] * 1e3:.0f} ms per call ({rate:.0f} GFLOP/s) -> at most "
            f"{items_per_call / kt['seconds']:.2f} {unit}s/s with nothing else in the step")
