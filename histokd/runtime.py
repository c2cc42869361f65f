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


# ---------------------------------------------------------------------------------------
# XLA:CPU
# ---------------------------------------------------------------------------------------
#: The XLA:CPU option set by :func:`prefer_sequential_xla_cpu`.
XLA_CPU_SEQUENTIAL_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
#: Set to 1 / true to keep XLA's default scheduling (:func:`prefer_sequential_xla_cpu` then adds nothing).
XLA_CPU_OPT_OUT_ENV = "HISTOKD_XLA_CPU_CONCURRENCY"
_XLA_CPU_CHECKED = False


def _tensorflow_dir():
    """The installed TensorFlow package folder, found without importing TensorFlow (or None)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("tensorflow")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _xla_knows_flag(name: str) -> bool:
    """Whether the installed TensorFlow's XLA defines the debug option ``name``.

    XLA aborts the whole process on an unknown flag in ``XLA_FLAGS``, so a flag is only
    ever added after this check: the option's name must appear in TensorFlow's shared
    libraries.

    Args:
        name: str. The option, without the leading ``--``.
    """
    import glob
    import mmap

    root = _tensorflow_dir()
    if root is None:
        return False
    paths = sorted(glob.glob(os.path.join(root, "libtensorflow_cc*"))
                   + glob.glob(os.path.join(root, "libtensorflow_framework*"))
                   + glob.glob(os.path.join(root, "python", "_pywrap_tensorflow_internal*")))
    needle = name.encode()
    for path in paths:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(needle) >= 0:
                    return True
        except (OSError, ValueError):
            continue
    return False


def prefer_sequential_xla_cpu() -> bool:
    """Ask XLA:CPU to run each compiled kernel's steps on the calling thread.

    Adds ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` to ``XLA_FLAGS``;
    returns whether the option is in ``XLA_FLAGS`` afterwards. ``histokd normalize`` and
    ``histokd train`` call it at start-up; importing histokd or building a normaliser
    or model never does. In a notebook or script, call it first, before anything is
    XLA-compiled (XLA reads ``XLA_FLAGS`` once per process, at its first compilation):

        >>> from histokd import runtime
        >>> runtime.prefer_sequential_xla_cpu()

    Why: by default XLA:CPU runs independent steps of a kernel concurrently on
    TensorFlow's intra-op pool. Jobs that already keep every core busy with
    independent chains of kernels (the Macenko transform's chunks of tiles in
    flight, one per core) then make those chains' kernels queue for the same pool;
    run sequentially, each chain keeps its core. The option changes how XLA:CPU
    schedules the steps of a kernel, never what they compute. Figures:
    docs/benchmarks.md.

    Adds nothing when the user's ``XLA_FLAGS`` already sets the option (their
    choice), when ``HISTOKD_XLA_CPU_CONCURRENCY=1`` (keep XLA's default), or when the
    installed XLA does not know the option (XLA would abort on it). The check runs
    once per process. TensorFlow is not imported.

    Returns:
        bool. True if ``XLA_FLAGS`` holds the option (set now, earlier or by the user).
    """
    global _XLA_CPU_CHECKED
    flags = os.environ.get("XLA_FLAGS", "")
    if _XLA_CPU_CHECKED or XLA_CPU_SEQUENTIAL_FLAG in flags:
        return XLA_CPU_SEQUENTIAL_FLAG in flags
    _XLA_CPU_CHECKED = True
    keep = os.environ.get(XLA_CPU_OPT_OUT_ENV, "").strip().lower()
    if keep in ("1", "true", "yes", "on") or not _xla_knows_flag(XLA_CPU_SEQUENTIAL_FLAG):
        return False
    os.environ["XLA_FLAGS"] = (flags + f" --{XLA_CPU_SEQUENTIAL_FLAG}=false").strip()
    return True


__all__ += ["XLA_CPU_SEQUENTIAL_FLAG", "prefer_sequential_xla_cpu"]
