"""Transfer between downstream tasks: the protocol of More From Less, Table 2.

*More From Less* (Farndale, Insall, Yuan), §2.2 and §3.2, Table 2: every encoder
is frozen and a new softmax head is trained on each of two tasks labelling the
**same tiles**, the tissue type and the most-present nucleus type ("nucleus
counting", labels from HoVer-Net, ``Background`` only when a tile has no
nucleus). "Supervised tissue/nuclei encoders were trained on the tissue/nuclei
tasks respectively, and were then frozen and a new classifier head was trained
for the transfer task." The head is the linear probe of §2.2 (dense softmax,
Adam 1e-3, 100 epochs) on features extracted once per encoder, input and split.

Pieces:

* :func:`transfer_eval` — one frozen encoder, one task: features → probe → metrics.
* :class:`TransferTask` — a task = a source of tiles, its labels per split (the
  source's own labels or an integer array per split, e.g. the most-present
  nucleus type) and, for mask-reading encoders, an aligned source of masks.
* :class:`TransferEncoder` — an encoder with the input it reads (``full``
  images, ``downsampled`` images, nuclear-type ``mask`` images);
  :func:`load_run_encoders` reads them from a run's ``export/`` folder.
* :func:`train_supervised_encoder` — the supervised baseline of one task.
* :func:`table2` — every encoder × every task, as a DataFrame (rows: encoders,
  columns: tasks).
* :func:`mask_pair_tasks` — both Table 2 tasks from paired image/mask datasets
  written by ``histokd masks`` (:mod:`histokd.nuclei.masks`).

Example:
    >>> from histokd.evaluation.transfer import TransferTask, table2
    >>> tasks = {"tissue": TransferTask(source),
    ...          "nuclei": TransferTask(source, labels={"train": y_tr, "test": y_te},
    ...                                 class_names=["Background", "Neoplastic", ...])}
    >>> table2({"VICReg asymmetric": "runs/asym", "VICReg symmetric": "runs/sym"}, tasks)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from histokd.errors import ConfigError, DataError

__all__ = [
    "INPUT_KINDS",
    "TransferEncoder",
    "TransferTask",
    "load_run_encoders",
    "transfer_eval",
    "train_supervised_encoder",
    "table2",
    "mask_pair_tasks",
]

#: What an encoder reads: full-resolution images, downsampled images, nuclear-type masks.
INPUT_KINDS = ("full", "downsampled", "mask")


# --------------------------------------------------------------------------- encoders
@dataclass
class TransferEncoder:
    """A frozen encoder and the input it was trained on.

    Args:
        encoder: keras.Model. Float32 images in [0, 1] → features.
        input: str. ``full``, ``downsampled`` (images downsampled to ``downsample``
            px and resized back, More From Less §2.1) or ``mask`` (nuclear-type masks).
        downsample: int | None. Low resolution for ``input="downsampled"``.
        trained_on: str | None. Name of the task a supervised encoder was trained on
            (marks its own-task cell in :func:`table2`); None for self-supervised ones.

    Example:
        >>> TransferEncoder(enc, input="downsampled", downsample=7)
    """

    encoder: object
    input: str = "full"
    downsample: Optional[int] = None
    trained_on: Optional[str] = None

    def __post_init__(self):
        if self.input not in INPUT_KINDS:
            raise ConfigError(f"encoder input must be one of {INPUT_KINDS}, got {self.input!r}")
        if self.input == "downsampled" and not self.downsample:
            raise ConfigError("input='downsampled' needs downsample=<size in px> (e.g. 7)")

    def preprocess(self):
        """Batched float-image transform applied before the encoder (or None)."""
        if self.input != "downsampled":
            return None
        from histokd.data.views import Downsample

        return Downsample(int(self.downsample))


def _branch_input(meta: dict, branch: str):
    """(input kind, downsample) of one exported branch, from metadata.json."""
    cls = (meta.get("classifiers") or {}).get(branch)
    if cls:
        kind = cls.get("input", "full")
        return kind, (cls.get("downsample") if kind == "downsampled" else None)
    # branches without a classifier (mask encoders): the rule of histokd.data.datasets.branch_input_kinds
    r, size = meta.get("downsample"), meta.get("input_size")
    down = bool(r) and (size is None or r < size)
    views = meta.get("views")
    if (views == "mask" and branch == "a") or (views == "mask_symmetric" and branch in ("a", "b")):
        return "mask", None
    if branch in ("a", "image") and down:
        return "downsampled", r
    if branch == "b" and views == "symmetric" and down:
        return "downsampled", r
    return "full", None


def load_run_encoders(run_dir, branches: Sequence[str] | None = None) -> Dict[str, TransferEncoder]:
    """The exported encoders of a run and the input each one reads.

    Reads ``run_dir/export/metadata.json`` (``encoders``: branch → file;
    ``classifiers``: branch → ``input``/``downsample``). A file shared by two
    branches (shared weights) is loaded once.

    Args:
        run_dir: str | Path. A run directory (or its ``export/`` folder).
        branches: list[str] | None. Keep only these branches (e.g. ``["a"]``).

    Returns:
        dict branch → :class:`TransferEncoder`, in the metadata's order.

    Example:
        >>> load_run_encoders("runs/asym")["a"].input
        'downsampled'
    """
    import keras

    from histokd.registry import register_keras_objects

    register_keras_objects()

    run_dir = Path(run_dir)
    export = run_dir if (run_dir / "metadata.json").exists() else run_dir / "export"
    meta_path = export / "metadata.json"
    if not meta_path.exists():
        raise DataError(f"{run_dir} has no export/metadata.json; pass a finished run directory "
                        "(run `histokd export RUN_DIR` if the run was trained without exporting)")
    meta = json.loads(meta_path.read_text())
    files = meta.get("encoders") or {}
    if not files:
        raise DataError(f"{meta_path} lists no encoders; re-export the run with `histokd export`")
    if branches is not None:
        unknown = [b for b in branches if b not in files]
        if unknown:
            raise ConfigError(f"run {run_dir} has no branch {unknown}; its branches are {list(files)}")
        files = {b: files[b] for b in branches}
    loaded: Dict[str, object] = {}
    out = {}
    for branch, fname in files.items():
        if fname not in loaded:
            path = export / fname
            if not path.exists():
                raise DataError(f"encoder file {path} named in {meta_path} is missing; re-export the run")
            loaded[fname] = keras.saving.load_model(path)
        kind, r = _branch_input(meta, branch)
        out[branch] = TransferEncoder(loaded[fname], kind, r)
    return out


# --------------------------------------------------------------------------- tasks
@dataclass
class TransferTask:
    """One downstream task over a source of tiles.

    Args:
        source: histokd.data.Source. The tiles (``train`` and ``test`` splits).
        labels: None | dict split → int array | callable(split) → int array | str.
            None: the source's own labels (e.g. tissue type). An array per split
            labels the split's records in order (e.g. the most-present nucleus type
            of each tile). A str names a label field of a source that provides
            ``source.field_labels(field, split)`` (paired image/mask datasets).
        class_names: list[str] | None. Class names (default: the source's names for
            its own labels, else ``"0"``, ``"1"``, ...).
        masks: Source | None. Nuclear-type masks of the same tiles, record for
            record, read by encoders with ``input="mask"``.
        image_size: int | None. Working size (default: the encoder's input size).
        train_split, test_split: str. Splits the head is trained / tested on.

    Example:
        >>> TransferTask(source, labels={"train": nuc_tr, "test": nuc_te},
        ...              class_names=["Background", "Neoplastic", "Inflammatory"])
    """

    source: object
    labels: object = None
    class_names: Optional[Sequence[str]] = None
    masks: object = None
    image_size: Optional[int] = None
    train_split: str = "train"
    test_split: str = "test"

    def split_labels(self, split: str) -> np.ndarray | None:
        """Task labels of ``split`` (None when the source's own labels are used)."""
        spec = self.labels
        if spec is None:
            return None
        if isinstance(spec, str):
            fn = getattr(self.source, "field_labels", None)
            if fn is None:
                raise ConfigError(
                    f"label field {spec!r} needs a source with field_labels(field, split) (a paired "
                    f"image/mask dataset); {type(self.source).__name__} has none. Pass the labels as "
                    "an integer array per split instead: labels={'train': y_train, 'test': y_test}")
            y = fn(spec, split)
        elif callable(spec):
            y = spec(split)
        elif isinstance(spec, Mapping):
            if split not in spec:
                raise DataError(f"task labels are given for splits {sorted(spec)} but not for {split!r}")
            y = spec[split]
        else:
            raise ConfigError("TransferTask.labels must be None, a dict split -> int array, a callable "
                              f"or a field name, got {type(spec).__name__}")
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"task labels of split {split!r} must be a 1-D integer array, got "
                            f"shape {y.shape} dtype {y.dtype}")
        return y.astype(np.int64)

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is None:
            return int(self.source.num_classes)
        ys = [self.split_labels(s) for s in (self.train_split, self.test_split)]
        return int(max(int(y.max()) if y.size else 0 for y in ys)) + 1

    def names(self):
        if self.class_names is not None:
            return [str(c) for c in self.class_names]
        if self.labels is None:
            return list(self.source.class_names)
        return [str(i) for i in range(self.num_classes)]


def _as_task(name, spec) -> TransferTask:
    if isinstance(spec, TransferTask):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2:
        return TransferTask(spec[0], labels=spec[1])
    if hasattr(spec, "num_examples") and hasattr(spec, "class_names"):
        return TransferTask(spec)
    raise ConfigError(f"task {name!r} must be a TransferTask, a (source, labels) pair or a source; "
                      f"got {type(spec).__name__}")


# --------------------------------------------------------------------------- data helpers
def _input_size(encoder, default=None):
    try:
        shape = encoder.inputs[0].shape
        if shape[1] is not None:
            return int(shape[1])
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return default


def _as_dataset(data, batch_size=64):
    """A tf.data.Dataset of (uint8 images, labels) from a dataset or an (images, labels) pair."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(f"images must be [N, H, W, 3], got shape {x.shape}")
        if len(x) != len(y):
            raise DataError(f"{len(x)} images but {len(y)} labels")
        if x.dtype != np.uint8:
            raise DataError(f"images must be uint8 RGB (histokd's dataset convention), got {x.dtype}")
        return tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64))).batch(batch_size)
    raise DataError("pass a tf.data.Dataset of (uint8 images, labels) batches or an (images, labels) pair")


def _check_labels(y, k, what):
    y = np.asarray(y)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{what} labels must lie in [0, {k - 1}] for {k} classes; found {y.min()}..{y.max()}")


def _probe(tr_x, tr_y, te_x, te_y, k, names, epochs, lr, batch_size, seed):
    from histokd.evaluation.metrics import classification_metrics
    from histokd.evaluation.probe import linear_probe

    _check_labels(tr_y, k, "training")
    _check_labels(te_y, k, "test")
    head, _ = linear_probe(tr_x, tr_y, k, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    probs = head.predict(te_x, verbose=0, batch_size=max(batch_size, 256))
    return classification_metrics(te_y, probs, names), head


# --------------------------------------------------------------------------- protocol
def transfer_eval(
    encoder,
    train_ds,
    test_ds,
    num_classes: int,
    preprocess: Callable | None = None,
    epochs: int = 100,
    lr: float = 1e-3,
    *,
    batch_size: int = 256,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    progress: bool = False,
    return_head: bool = False,
):
    """Freeze ``encoder`` and train a new softmax head on another task's labels.

    More From Less, §2.2 / Table 2: the frozen encoder's features (extracted once)
    train a dense softmax layer for ``epochs`` epochs with Adam at ``lr``; the head
    is tested on the task's test split. The encoder's weights (and BatchNorm
    statistics) are left unchanged.

    Args:
        encoder: keras.Model. Float32 images in [0, 1] → features.
        train_ds: tf.data.Dataset of ``(uint8 images, labels)`` batches, or an
            ``(images, labels)`` pair of arrays. Task B's training data.
        test_ds: same, task B's test data.
        num_classes: int. Classes of task B.
        preprocess: callable | None. Batched transform of the float images before the
            encoder (e.g. ``Downsample(7)`` for a sparse-branch encoder).
        epochs: int. Probe epochs (paper: 100).
        lr: float. Probe learning rate (paper: 1e-3, Adam).
        batch_size: int. Probe batch size.
        seed: int. Probe seed.
        class_names: list[str] | None. For the metrics dict.
        progress: bool. Progress bars for the feature extraction.
        return_head: bool. Also return the trained head.

    Returns:
        dict of metrics (``accuracy``, ``balanced_accuracy``, ``macro_f1``,
        ``auc_ovr``, ``confusion_matrix``, ...); with ``return_head``,
        ``(metrics, head)``.

    Example:
        >>> m = transfer_eval(tissue_encoder, (x_tr, nuc_tr), (x_te, nuc_te), num_classes=6)
        >>> m["accuracy"]
    """
    from histokd.evaluation.probe import extract_features

    k = int(num_classes)
    if k < 2:
        raise ConfigError(f"a classification task needs >= 2 classes, got num_classes={num_classes}")
    tr_x, tr_y = extract_features(encoder, _as_dataset(train_ds), preprocess, progress, desc="transfer train")
    te_x, te_y = extract_features(encoder, _as_dataset(test_ds), preprocess, progress, desc="transfer test")
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    metrics, head = _probe(tr_x, tr_y, te_x, te_y, k, names, epochs, lr, batch_size, seed)
    return (metrics, head) if return_head else metrics


def _task_dataset(source, split, image_size, batch_size, stain=None):
    from histokd.data import make_dataset

    ds = make_dataset(source, split, image_size, batch_size, training=False, on_bad_image="error",
                      cache=False, repeat=False, drop_remainder=False, progress=False)
    if stain is not None:
        import tensorflow as tf

        ds = ds.map(lambda x, y: (stain(x), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds


def _labelled(task: TransferTask, source, split, y_source):
    """Task labels of a split, checked against the number of extracted examples."""
    y = task.split_labels(split)
    if y is None:
        if source is not task.source:
            # mask tiles: the tissue labels are those of the image source, record for record
            y = np.asarray(task.source.labels(split), np.int64)
        else:
            return y_source
    if len(y) != len(y_source):
        raise DataError(f"split {split!r} has {len(y_source)} tiles but {len(y)} task labels; give one "
                        "label per record of the source, in record order")
    return y


def train_supervised_encoder(
    encoder,
    task: TransferTask,
    *,
    task_name: str | None = None,
    input: str = "full",
    downsample: int | None = None,
    epochs: int = 100,
    lr: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
    verbose: int = 0,
) -> TransferEncoder:
    """Train ``encoder`` + a softmax head end to end on one task: a supervised baseline.

    More From Less §2.2: "We produce supervised baseline comparisons using an
    equivalent encoder and softmax classifier head, following the same training
    protocol" (Adam; the paper's runs use a warm-up cosine schedule at 1e-4,
    batch 128, 100 epochs; here a constant ``lr`` and no augmentation, which is
    enough for a baseline encoder that :func:`table2` then freezes). The
    encoder is trained in place and returned wrapped as a
    :class:`TransferEncoder` with ``trained_on=task_name``.

    Args:
        encoder: keras.Model. Float32 images in [0, 1] → features (trained in place).
        task: TransferTask. Its training split and labels are used.
        task_name: str | None. Recorded as ``trained_on``.
        input: str. ``full``, ``downsampled`` or ``mask`` (reads ``task.masks``).
        downsample: int | None. For ``input="downsampled"``.
        epochs, lr, batch_size, seed: optimisation.
        verbose: int. Keras ``fit`` verbosity.

    Returns:
        TransferEncoder.

    Example:
        >>> sup_nuclei = train_supervised_encoder(make_backbone("resnet50"), tasks["nuclei"],
        ...                                       task_name="nuclei", epochs=100)
    """
    import keras
    import tensorflow as tf

    from histokd.methods.supervised import Supervised

    spec = TransferEncoder(encoder, input, downsample, trained_on=task_name)
    task = _as_task(task_name, task)
    source = task.masks if input == "mask" else task.source
    if source is None:
        raise ConfigError("input='mask' needs a task with masks=<source of nuclear-type masks>")
    size = task.image_size or _input_size(encoder, 224)
    split = task.train_split
    n = source.num_examples(split)
    y = task.split_labels(split)
    if y is None:
        y = np.asarray(task.source.labels(split), np.int64)
    if len(y) != n:
        raise DataError(f"split {split!r} has {n} tiles but {len(y)} task labels")
    k = task.num_classes
    _check_labels(y, k, "training")
    bs = min(int(batch_size), n)
    if bs < 2:
        raise DataError(f"the training split has {n} tile(s); a supervised baseline needs at least 2")
    pre = spec.preprocess()
    images = _task_dataset(source, split, size, 256).map(lambda x, _: x).unbatch()
    ds = tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(y)))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(bs, drop_remainder=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(n // bs))  # lost by unbatch/zip

    def to_float(x, t):
        x = tf.cast(x, tf.float32) / 255.0
        return (pre(x) if pre is not None else x), t

    ds = ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    keras.utils.set_random_seed(seed)
    model = Supervised(encoder, num_classes=k, name="supervised_baseline")
    model.build()
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=False)  # XLA compiles slower than it runs on CPU
    model.fit(ds, epochs=int(epochs), verbose=verbose, shuffle=False)  # ds reshuffles itself
    return spec


def _expand_encoders(encoders: Mapping) -> Dict[str, TransferEncoder]:
    rows: Dict[str, TransferEncoder] = {}
    for name, spec in encoders.items():
        if isinstance(spec, TransferEncoder):
            rows[name] = spec
        elif isinstance(spec, (str, Path)):
            found = load_run_encoders(spec)
            usable = dict(found)
            if len(usable) == 1:
                rows[name] = next(iter(usable.values()))
            else:
                for branch, enc in usable.items():
                    rows[f"{name} [{branch}: {enc.input}]"] = enc
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (str, Path)):
            rows[name] = load_run_encoders(spec[0], [spec[1]])[spec[1]]
        elif hasattr(spec, "inputs") and callable(spec):
            rows[name] = TransferEncoder(spec)
        else:
            raise ConfigError(f"encoder {name!r} must be a run directory, (run_dir, branch), a "
                              f"TransferEncoder or a keras.Model; got {type(spec).__name__}")
    if not rows:
        raise ConfigError("table2 needs at least one encoder")
    return rows


def table2(
    encoders: Mapping,
    tasks: Mapping,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    feature_batch_size: int = 64,
    seed: int = 0,
    metric: str = "accuracy",
    stain: Callable | None = None,
    progress: bool = True,
    return_details: bool = False,
):
    """Every frozen encoder × every task (More From Less, Table 2).

    For each encoder the features of each task's train and test tiles are
    extracted once (cached across tasks that share a source), in the input kind the
    encoder was trained on (images, downsampled images or masks); a new linear
    softmax head is trained per task. Supervised encoders trained on one task
    (:func:`train_supervised_encoder`) give the baselines: their own-task cell and
    their transfer cell.

    Args:
        encoders: dict row name → run directory (every exported branch becomes a row
            ``"name [branch: input]"``, or just ``name`` if the run has one), a
            ``(run_dir, branch)`` pair, a :class:`TransferEncoder`, or a keras.Model
            (reads full images).
        tasks: dict column name → :class:`TransferTask`, a ``(source, labels)`` pair or a
            source (its own labels).
        epochs, lr, batch_size: linear probe (paper: 100 epochs, Adam 1e-3).
        feature_batch_size: int. Batch size of the feature extraction.
        seed: int. Probe seed.
        metric: str. Metric shown in the table (``accuracy`` as in Table 2,
            ``balanced_accuracy``, ``macro_f1``, ``auc_ovr``).
        stain: callable | None. Batched uint8 → uint8 stain normalisation of the
            tiles (mask tiles are never normalised).
        progress: bool. Progress bars.
        return_details: bool. Also return the long table of all metrics.

    Returns:
        pandas.DataFrame [encoders × tasks] of ``metric`` (NaN where an encoder's
        input is missing, e.g. a mask encoder on a task without masks); with
        ``return_details``, ``(table, details)`` where ``details`` has one row per
        cell: encoder, task, input, trained_on, transfer (True/False/None),
        accuracy, balanced_accuracy, macro_f1, auc_ovr, num_train, num_test.

    Example:
        >>> tbl = table2({"VICReg asym": "runs/asym_mask", "supervised tissue": sup_t},
        ...              {"tissue": TransferTask(src), "nuclei": TransferTask(src, labels=nuc)})
        >>> print(tbl.round(4))
    """
    metrics_names = ("accuracy", "balanced_accuracy", "macro_f1", "auc_ovr")
    if metric not in metrics_names:
        raise ConfigError(f"metric must be one of {metrics_names}, got {metric!r}")
    rows = _expand_encoders(encoders)
    cols = {name: _as_task(name, spec) for name, spec in tasks.items()}
    if not cols:
        raise ConfigError("table2 needs at least one task")
    from histokd.evaluation.probe import extract_features

    cache: Dict[tuple, tuple] = {}
    records = []
    warned = set()
    for rname, enc in rows.items():
        pre = enc.preprocess()
        for tname, task in cols.items():
            source = task.masks if enc.input == "mask" else task.source
            row = {"encoder": rname, "task": tname, "input": enc.input, "trained_on": enc.trained_on,
                   "transfer": None if enc.trained_on is None else enc.trained_on != tname}
            if source is None:
                if tname not in warned:
                    warnings.warn(f"task {tname!r} has no masks (TransferTask.masks); mask encoders get NaN",
                                  stacklevel=2)
                    warned.add(tname)
                records.append({**row, **{m: np.nan for m in metrics_names}, "num_train": 0, "num_test": 0})
                continue
            size = task.image_size or _input_size(enc.encoder, 224)
            feats = {}
            for split in (task.train_split, task.test_split):
                key = (id(enc.encoder), enc.input, enc.downsample, id(source), split, size)
                if key not in cache:
                    ds = _task_dataset(source, split, size, feature_batch_size,
                                       None if enc.input == "mask" else stain)
                    cache[key] = extract_features(enc.encoder, ds, pre, progress,
                                                  desc=f"{rname} {tname} {split}")
                x, y_src = cache[key]
                feats[split] = (x, _labelled(task, source, split, y_src))
            (tr_x, tr_y), (te_x, te_y) = feats[task.train_split], feats[task.test_split]
            m, _ = _probe(tr_x, tr_y, te_x, te_y, task.num_classes, task.names(), epochs, lr,
                          batch_size, seed)
            records.append({**row, **{k: m[k] for k in metrics_names},
                            "num_train": int(len(tr_y)), "num_test": int(len(te_y))})
    details = pd.DataFrame(records)
    table = details.pivot(index="encoder", columns="task", values=metric)
    table = table.reindex(index=list(rows), columns=list(cols)).astype(float)
    table.columns.name = "task"
    table.index.name = "encoder"
    return (table, details) if return_details else table


# --------------------------------------------------------------------------- mask datasets
def _read_mask_pairs(dst, image_size):
    """Arrays of one ``histokd masks`` output folder: images, masks, tissue and nucleus labels."""
    import tensorflow as tf

    from histokd.nuclei.masks import INFO_JSON, mask_dataset

    dst = Path(dst)
    info_path = dst / INFO_JSON
    if not info_path.exists():
        raise DataError(f"{dst} is not a mask dataset (no {INFO_JSON}); build it with "
                        f"`histokd masks SRC {dst} --weights PATH` (or --method classical)")
    info = json.loads(info_path.read_text())
    images, masks, tissue, nuclei = [], [], [], []
    for ex in mask_dataset(dst):
        img, msk = ex["image"], ex["mask"]
        if image_size is not None and tuple(img.shape[:2]) != (image_size, image_size):
            img = tf.cast(tf.round(tf.clip_by_value(
                tf.image.resize(img, (image_size, image_size), antialias=True), 0, 255)), tf.uint8)
            # masks hold type ids: nearest neighbour keeps them exact
            msk = tf.image.resize(msk, (image_size, image_size), method="nearest")
        images.append(np.asarray(img, np.uint8))
        masks.append(np.asarray(msk, np.uint8))
        tissue.append(int(ex["tissue_label"]))
        nuclei.append(int(ex["label"]))
    if not images:
        raise DataError(f"the mask dataset {dst} holds no examples")
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise DataError(f"the images of {dst} have different sizes {sorted(shapes)[:3]}...; pass image_size=")
    return info, np.stack(images), np.stack(masks), np.asarray(tissue), np.asarray(nuclei)


def mask_pair_tasks(train_dir, test_dir, image_size: int | None = None) -> Dict[str, TransferTask]:
    """Both Table 2 tasks from the paired image/mask datasets of ``histokd masks``.

    More From Less §2.1-2.2, Table 2: the same tiles labelled by tissue type and by
    the most-present nucleus type (HoVer-Net; ``Background`` only without nuclei),
    readable from the images or from their nuclear-type masks. ``train_dir`` and
    ``test_dir`` are two outputs of :func:`histokd.nuclei.build_mask_dataset`
    (e.g. NCT-CRC-HE-100K and CRC-VAL-HE-7K, whose class folders give the tissue
    labels). The pairs are read into memory (fine for thousands of tiles; for the
    full 100K set use a streaming source).

    Args:
        train_dir, test_dir: str | Path. Mask dataset folders (``dataset.json``,
            ``masks-*.tfrecord``).
        image_size: int | None. Resize images (antialiased) and masks (nearest) to this side.

    Returns:
        ``{"tissue": TransferTask, "nuclei": TransferTask}``, both with ``masks`` set,
        ready for :func:`table2`.

    Example:
        >>> tasks = mask_pair_tasks("masks/nct100k", "masks/crcval7k", image_size=224)
        >>> table2({"VICReg asym": "runs/vicreg_image_mask"}, tasks)
    """
    from histokd.data.sources import ArraySource

    info_tr, x_tr, m_tr, t_tr, n_tr = _read_mask_pairs(train_dir, image_size)
    info_te, x_te, m_te, t_te, n_te = _read_mask_pairs(test_dir, image_size)
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"train tiles are {x_tr.shape[1:3]} px but test tiles {x_te.shape[1:3]} px; pass image_size=")
    types = list(info_tr.get("type_names") or [])
    if types != list(info_te.get("type_names") or []):
        raise DataError(f"{train_dir} and {test_dir} were segmented with different type sets "
                        f"({types} vs {info_te.get('type_names')}); rebuild one of them")
    tissues = list(info_tr.get("tissue_names") or [])
    if (t_tr < 0).any() or (t_te < 0).any():
        raise DataError("some tiles have no tissue label (images not in class folders); build the mask "
                        "datasets from folders with one sub-folder per tissue class")
    test_names = list(info_te.get("tissue_names") or [])
    if test_names != tissues:
        # external test sets may hold fewer classes: map by name
        unknown = sorted(set(test_names) - set(tissues))
        if unknown:
            raise DataError(f"test tissue classes {unknown} do not occur in the training set {tissues}")
        t_te = np.asarray([tissues.index(test_names[i]) for i in t_te])
    images = ArraySource({"train": (x_tr, t_tr), "test": (x_te, t_te)}, tissues)
    masks = ArraySource({"train": (m_tr, t_tr), "test": (m_te, t_te)}, tissues)
    return {
        "tissue": TransferTask(images, masks=masks),
        "nuclei": TransferTask(images, labels={"train": n_tr, "test": n_te}, class_names=types, masks=masks),
    }
