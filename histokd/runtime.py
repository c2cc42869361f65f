"""Process-level settings: CPU thread pools, distribution strategies.

These change the whole process, so the library never sets them as a side effect of
importing a module or building a model: the ``histokd`` commands call them (``histokd
train`` sizes the thread pools per ``train.cpu_threads`` before TensorFlow's first op
and picks the strategy per ``train.strategy``), and notebook users call them
explicitly, first thing:

    >>> from histokd import runtime
    >>> runtime.apply_cpu_threads("auto", streams=2)   # before any TensorFlow op
    >>> strategy = runtime.make_strategy("auto")

TensorFlow is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import warnings

from histokd.errors import ConfigError


def parse_cpu_threads(setting) -> "tuple[int, int] | str":
    """``train.cpu_threads`` → ``"auto"``, ``"default"`` or ``(intra, inter)``.

    Raises:
        ConfigError: anything else, with the accepted forms.
    """
    text = str(setting).strip().lower()
    if text in ("auto", "default"):
        return text
    parts = text.replace(" ", "").split(",")
    if len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]), int(parts[1])
    raise ConfigError(
        f"the CPU thread setting (train.cpu_threads, histokd normalize --cpu-threads) must be "
        f"'auto', 'default' or 'INTRA,INTER' (two positive integers, e.g. '1,2'), got {setting!r}")


# ---------------------------------------------------------------------------------------
# CPU thread pools
# ---------------------------------------------------------------------------------------
def available_cpus() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def kernel_slots(cores=None, intra=None, inter=None) -> int:
    """How many kernels TensorFlow's pools run at once on this CPU process:
    cores // intra-op threads, at most the inter-op threads (1 with TensorFlow's default
    pools, 2 with ``histokd train``'s plan for two-view methods on a CPU, see
    :func:`cpu_thread_plan`).

    Args:
        cores, intra, inter: int. Overrides of the process's values; 0 = TF's default
            (all cores).
    """
    import tensorflow as tf

    if cores is None:
        cores = available_cpus()
    if intra is None:
        intra = tf.config.threading.get_intra_op_parallelism_threads()
    if inter is None:
        inter = tf.config.threading.get_inter_op_parallelism_threads()
    intra = intra or cores
    inter = inter or cores
    return max(1, min(inter, cores // max(intra, 1)))


def kernels_side_by_side(cores=None, intra=None, inter=None) -> bool:
    """Whether the pools run kernels side by side (:func:`kernel_slots` >= 2), each
    view's chain on its own cores.

    Args:
        cores, intra, inter: as for :func:`kernel_slots`.
    """
    return kernel_slots(cores, intra, inter) >= 2


def method_streams(method: str | None) -> int:
    """Independent kernel chains of a method's training step (its ``cpu_streams``:
    2 for two-view methods whose per-view encoder chains share no op until the loss)."""
    if method is None:
        return 1
    from histokd.registry import METHODS

    return int(getattr(METHODS.get(method), "cpu_streams", 1))


def cpu_thread_plan(setting, method: str | None = None, cpus: int | None = None, gpus: int = 0,
                    streams: int | None = None):
    """TensorFlow thread-pool sizes ``(intra_op, inter_op)`` for a job, or None (TF's defaults).

    ``auto`` on a machine without GPUs, for a job made of ``streams`` ≥ 2 independent
    chains of kernels — a two-view method's training step (one encoder chain per view),
    the Macenko transform (two chunks of tiles in flight): inter-op ``streams`` and
    intra-op ``cpus // streams``, one group of cores per chain, so each chain runs on its
    own cores instead of every kernel being split over all cores while the other chain's
    kernels compete for them (figures: docs/benchmarks.md). One-chain jobs and GPU
    machines keep TensorFlow's defaults.

    Args:
        setting: ``"auto"``, ``"default"`` or ``"INTRA,INTER"`` (``train.cpu_threads``).
        method: str. A registered method name; sets ``streams`` from its ``cpu_streams``.
        cpus: int. Cores available (default: :func:`available_cpus`).
        gpus: int. Visible GPUs.
        streams: int. Independent chains of the job (overrides ``method``).
    """
    plan = parse_cpu_threads(setting)
    if isinstance(plan, tuple):
        return plan
    if streams is None:
        streams = method_streams(method)
    if plan == "default" or gpus > 0 or streams < 2:
        return None
    if cpus is None:
        cpus = available_cpus()
    if cpus < streams:
        return None
    return max(1, cpus // streams), streams


def apply_cpu_threads(setting, method: str | None = None, streams: int | None = None):
    """Set TensorFlow's thread pools per :func:`cpu_thread_plan`; returns what was set.

    The pools can only be sized before TensorFlow runs its first op. When it already
    has (a notebook that ran TensorFlow code first), an explicit ``INTRA,INTER`` warns
    and ``auto`` quietly keeps the pools as they are.
    """
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    plan = cpu_thread_plan(setting, method, gpus=gpus, streams=streams)
    if plan is None:
        return None
    intra, inter = plan
    threading_cfg = tf.config.threading
    if (threading_cfg.get_intra_op_parallelism_threads() == intra
            and threading_cfg.get_inter_op_parallelism_threads() == inter):
        return plan
    try:
        threading_cfg.set_intra_op_parallelism_threads(intra)
        threading_cfg.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        if parse_cpu_threads(setting) != "auto":
            warnings.warn(
                f"cpu threads {setting!r} not applied: TensorFlow was already running in "
                "this process (thread pools are fixed at its first op); run the histokd "
                "command in a fresh process to use it", stacklevel=2)
        return None
    return plan


def thread_pools() -> dict:
    """TensorFlow's current pool sizes (0 = TensorFlow's default), as recorded in metrics.json."""
    import tensorflow as tf

    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


# ---------------------------------------------------------------------------------------
# distribution strategies
# ---------------------------------------------------------------------------------------
_KEY_BASES = iter(range(10_000, 10**9, 100_000))


def mirrored_strategy(devices=None):
    """A ``MirroredStrategy`` whose collective keys cannot collide with earlier ones.

    Every MirroredStrategy made in one process starts its collective group keys at the
    same number; a second strategy that runs a different program (a notebook that
    pre-trains, then distils) then fails on the runtime's cached collective parameters
    ("Collective instance ... expected type"). Giving each strategy its own key range
    avoids it.

    Args:
        devices: list of str. Devices to mirror over (default: all local GPUs, else CPU).
    """
    import tensorflow as tf

    cls = tf.distribute.MirroredStrategy
    old = cls._collective_key_base
    cls._collective_key_base = next(_KEY_BASES)
    try:
        return cls(devices)
    finally:
        cls._collective_key_base = old


def make_strategy(name: str = "auto"):
    """Choose a ``tf.distribute`` strategy.

    ``auto``: MultiWorkerMirrored when ``TF_CONFIG`` lists several workers, Mirrored over
    all GPUs when there are 2+, else the default strategy. ``one_device``: the first GPU or
    the CPU. ``mirrored``: all local GPUs (or CPUs). ``multi_worker``: from ``TF_CONFIG``.

    Args:
        name: str. ``train.strategy``.
    """
    import tensorflow as tf

    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if len(workers) > 1:
            return tf.distribute.MultiWorkerMirroredStrategy()
        if len(gpus) > 1:
            return mirrored_strategy()
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return mirrored_strategy()
    if name == "multi_worker":
        if not workers:
            raise ConfigError("train.strategy=multi_worker needs TF_CONFIG naming the cluster's workers "
                              "(see README: multi-worker training)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ConfigError(f"unknown train.strategy {name!r}")


__all__ = ["apply_cpu_threads", "available_cpus", "cpu_thread_plan", "kernel_slots", "kernels_side_by_side",
           "make_strategy", "method_streams", "mirrored_strategy", "parse_cpu_threads", "thread_pools"]
