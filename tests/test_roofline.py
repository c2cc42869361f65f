"""scripts/_roofline.py: the benchmarks' kernel inventory and kernel floor.

The benchmarks quote "the step's dense kernels re-run alone take X ms"; these tests
pin down that the inventory finds exactly the kernels a step runs (forward and
gradients, unused gradients pruned), with the right shapes, attributes, counts and
float operations, and that each re-run really executes its kernel.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import _roofline  # noqa: E402


def _train_step():
    w1 = tf.Variable(tf.random.normal([3, 3, 3, 8], seed=1))
    w2 = tf.Variable(tf.random.normal([8, 5], seed=2))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            h = tf.nn.relu(tf.nn.conv2d(x, w1, strides=2, padding="SAME"))
            z = tf.matmul(tf.reduce_mean(h, axis=[1, 2]), w2)
            loss = tf.reduce_sum(tf.square(z))
        g1, g2 = tape.gradient(loss, [w1, w2])
        w1.assign_sub(0.1 * g1)
        w2.assign_sub(0.1 * g2)
        return loss

    return step


def test_inventory_of_a_training_step():
    step = _train_step()
    kernels = _roofline.dense_kernels(step, tf.TensorSpec([4, 16, 16, 3], tf.float32))
    by_type = {}
    for k in kernels:
        by_type.setdefault(k["type"], []).append(k)
    # forward conv + its filter gradient; the input-image gradient is built by the tape
    # but nothing consumes it, so the runtime prunes it and the inventory must too
    assert set(by_type) == {"Conv2D", "Conv2DBackpropFilter", "MatMul"}
    conv = by_type["Conv2D"][0]
    assert conv["shapes"] == [(4, 16, 16, 3), (3, 3, 3, 8)] and conv["count"] == 1
    assert conv["flops"] == 2 * 4 * 8 * 8 * 8 * 3 * 3 * 3  # output positions x MACs
    # forward product [4,8]x[8,5] and the weight gradient [4,8]^T x [4,5]; the
    # gradient w.r.t. the pooled features is needed for w1's gradient, so it stays
    mats = sorted((k["shapes"], k["flops"]) for k in by_type["MatMul"])
    assert len(mats) == 3
    assert all(f == 2 * 4 * 8 * 5 for _, f in mats)


def test_matmul_flops_follow_transposes_and_batch():
    a = tf.TensorSpec([6, 7, 3], tf.float32)
    b = tf.TensorSpec([6, 7, 2], tf.float32)
    fn = tf.function(lambda x, y: tf.linalg.matmul(x, y, adjoint_a=True))
    (k,) = _roofline.dense_kernels(fn, a, b)
    assert k["flops"] == 2 * 6 * 3 * 7 * 2


def test_repeated_kernels_are_counted_once_per_launch():
    fn = tf.function(lambda x: tf.matmul(tf.matmul(x, x), x) + tf.matmul(x, tf.transpose(x)))
    kernels = _roofline.dense_kernels(fn, tf.TensorSpec([16, 16], tf.float32))
    assert sum(k["count"] for k in kernels) == 3
    assert len(kernels) == 1  # same op, shapes and attributes: one distinct kernel


def test_kernel_rerun_executes_the_kernel():
    """A re-run of a bigger product must take longer: the loop really runs the kernel."""
    small = _roofline.dense_kernels(tf.function(lambda x: tf.matmul(x, x)), tf.TensorSpec([32, 32], tf.float32))
    big = _roofline.dense_kernels(tf.function(lambda x: tf.matmul(x, x)), tf.TensorSpec([1024, 1024], tf.float32))
    t_small = _roofline.time_kernel(small[0]["call"], target_s=0.02)
    t_big = _roofline.time_kernel(big[0]["call"], target_s=0.02)
    # 32768x more arithmetic: a wide margin, so a busy machine (tests run 2 at a time)
    # cannot blur it, while a loop that skipped the kernel would time both alike
    assert t_big > 20 * t_small


def test_kernel_time_sums_counts_times_and_reports_flops():
    step = _train_step()
    kt = _roofline.kernel_time(step, tf.TensorSpec([4, 16, 16, 3], tf.float32), target_s=0.01)
    assert kt["kernels"] == 5 and kt["distinct"] == 5  # the three products differ in their transposes
    assert kt["seconds"] > 0 and np.isfinite(kt["seconds"])
    assert kt["flops"] == 2 * 4 * 8 * 8 * 8 * 27 * 2 + 3 * 2 * 4 * 8 * 5
    line = _roofline.kernel_line("toy", kt, 4, "image")
    assert "5 dense kernels (5 distinct)" in line and "images/s" in line


def test_concurrent_slots_follow_the_thread_pools():
    assert _roofline.slots_for(2, 0, 0) == 1  # TensorFlow's defaults: one kernel on all cores
    assert _roofline.slots_for(2, 1, 2) == 2  # histokd train on 2 cores: a view per core
    assert _roofline.slots_for(16, 8, 2) == 2
    assert _roofline.slots_for(8, 1, 1) == 1  # one inter-op thread: kernels one at a time
    assert _roofline.slots_for(4, 1, 0) == 4
    assert _roofline.concurrent_slots() >= 1
    kt = {"kernels": 5, "distinct": 5, "seconds": 0.01, "flops": 1e9, "slots": 2}
    assert "2 at a time" in _roofline.kernel_line("toy", kt, 4, "image")


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_gradients_with_shape_inputs_are_rerun(groups):
    """Backprop ops take their sizes from Shape/ShapeN; the re-run needs their static values."""
    w = tf.Variable(tf.random.normal([3, 3, 8 // groups, 8], seed=3))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.conv2d(x, w, strides=1, padding="SAME")
            loss = tf.reduce_sum(y * y)
        gx, gw = tape.gradient(loss, [x, w])
        w.assign_sub(1e-3 * gw)
        return loss + tf.reduce_sum(gx)

    kernels = _roofline.dense_kernels(step, tf.TensorSpec([2, 8, 8, 8], tf.float32))
    assert {k["type"] for k in kernels} == {"Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"}
    for k in kernels:
        assert _roofline.time_kernel(k["call"], target_s=0.005) > 0
