"""Sharded TFRecords written by ``histokd data prepare`` (``data.source: tfrecord``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from histokd.data.sources.base import SPLITS, Record, Source, SplitPlan, _check_split, _need_path
from histokd.errors import DataError
from histokd.registry import SOURCES


def parse_example(serialized):
    """Parse one serialized example written by :func:`prepare` (graph-mode).

    Returns:
        dict with ``image`` (uint8 ``[H, W, 3]``), ``label`` (int64) and the other features.
    """
    import tensorflow as tf

    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "height": tf.io.FixedLenFeature([], tf.int64, default_value=0),
        "width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
        "slide_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "patient_id": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "source_path": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "mpp": tf.io.FixedLenFeature([], tf.float32, default_value=-1.0),
    }
    ex = tf.io.parse_single_example(serialized, spec)
    ex["image"] = tf.io.decode_png(ex["image"], channels=3, dtype=tf.uint8)
    return ex


class TFRecordPlan(SplitPlan):
    """A split stored as TFRecord shards of PNG tiles (``histokd data prepare`` output).

    Parsed and PNG-decoded in graph. Training interleaves shuffled shards and shuffles
    the still-encoded records (cheap; shard shuffling adds the rest); evaluation keeps
    the order of ``records.csv``.

    Args:
        shards: list[str]. Shard files, in order.
        label_map: optional int array mapping stored labels onto the reading source's.
    """

    def __init__(self, shards, label_map=None):
        super().__init__("tfrecord", [], shards=list(shards), label_map=label_map)

    def to_dataset(self, owner, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        import tensorflow as tf

        from histokd.data.decode import resize_tf

        autotune = tf.data.AUTOTUNE
        size = None if image_size is None else int(image_size)
        files = list(self.shards)
        count = owner.num_examples(split)
        fds = tf.data.Dataset.from_tensor_slices(files)
        if training and not cache:
            fds = fds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        if training:
            ds = fds.interleave(tf.data.TFRecordDataset, cycle_length=max(1, min(len(files), 8)),
                                num_parallel_calls=autotune, deterministic=True)
        else:  # evaluation keeps the order of records.csv
            ds = tf.data.TFRecordDataset(files, buffer_size=8 << 20)
        if training and not cache:
            # shuffle the still-encoded records: cheap, and shard shuffling adds the rest
            ds = ds.shuffle(shuffle_buffer or min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
        label_map = None if self.label_map is None else tf.constant(np.asarray(self.label_map, np.int64))

        def parse(serialized):
            ex = parse_example(serialized)
            label = ex["label"] if label_map is None else tf.gather(label_map, ex["label"])
            return resize_tf(ex["image"], size), tf.cast(label, tf.int32)

        return ds.map(parse, num_parallel_calls=autotune), count

    def stored_image_size(self):
        import tensorflow as tf

        for raw in tf.data.TFRecordDataset(self.shards[:1]).take(1):
            return [int(v) for v in parse_example(raw)["image"].shape[:2]]
        return None


@SOURCES.register("tfrecord")
class TFRecordSource(Source):
    """A directory written by :func:`histokd.data.records.prepare` (``histokd data prepare``).

    Holds ``{split}-{i:05d}-of-{n:05d}.tfrecord`` shards (PNG-encoded uint8 images),
    ``records.csv`` (one row per example) and ``dataset.json`` (class names,
    counts, skipped files). ``dataset.json`` is written last, so a directory
    without it is an interrupted ``prepare`` and is refused.

    Args:
        directory: str. The prepared directory.

    Example:
        >>> src = TFRecordSource("records/")  # doctest: +SKIP
    """

    kind = "tfrecord"

    def __init__(self, directory):
        super().__init__()
        self.directory = Path(directory).expanduser()
        meta_path = self.directory / "dataset.json"
        if not meta_path.is_file():
            hint = (" (it holds .tfrecord files but no dataset.json: an interrupted `histokd data prepare`? "
                    "run it again)") if self.directory.is_dir() and any(self.directory.glob("*.tfrecord")) else ""
            raise DataError(f"{str(self.directory)!r} is not a prepared TFRecord dataset{hint}; create one with "
                            f"`histokd data prepare SRC {self.directory}`")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.class_names = list(self.meta["class_names"])
        self.image_size = self.meta.get("image_size")
        self._records = None
        for split, names in self.meta.get("shards", {}).items():
            for n in names:
                if not (self.directory / n).is_file():
                    raise DataError(f"shard {n!r} listed in {meta_path} is missing; run "
                                    "`histokd data prepare` again")

    def num_examples(self, split):
        return int(self.meta.get("counts", {}).get(_check_split(split), 0))

    def shards(self, split) -> list[str]:
        """Shard files of a split, in order."""
        return [str(self.directory / n) for n in self.meta.get("shards", {}).get(_check_split(split), [])]

    def records(self, split):
        _check_split(split)
        if self._records is None:
            self._records = {s: [] for s in SPLITS}
            path = self.directory / "records.csv"
            if path.is_file():
                with open(path, newline="") as f:
                    for r in csv.DictReader(f):
                        mpp = float(r["mpp"]) if r.get("mpp") else None
                        s = r["split"]
                        self._records[s].append(Record(r.get("source_path") or None, int(r["label"]), s,
                                                       r.get("slide_id", ""), r.get("patient_id", ""), mpp,
                                                       index=len(self._records[s])))
        return list(self._records[split])

    def labels(self, split):
        return np.asarray([r.label for r in self.records(split)], dtype=np.int64)

    def class_counts(self, split):
        cc = self.meta.get("class_counts", {}).get(split)
        return list(cc) if cc is not None else super().class_counts(split)

    def plan(self, split):
        return TFRecordPlan(self.shards(split))

    def external_plan(self, records, label_map):
        shards = [p for s in self.splits for p in self.shards(s)]
        return TFRecordPlan(shards, label_map=label_map)

    def prepare_reader(self, split):
        raise DataError(f"{self.directory} is already a prepared TFRecord dataset; read it directly")

    @classmethod
    def from_config(cls, data_cfg) -> "TFRecordSource":
        """Build from a ``data`` section: ``path`` (the prepared directory)."""
        return cls(_need_path(data_cfg, "tfrecord"))

    def describe(self):
        return {"type": "tfrecord", "path": str(self.directory), "prepared_from": self.meta.get("source")}
