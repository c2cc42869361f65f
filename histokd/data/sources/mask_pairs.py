"""Paired H&E image / nuclear-type mask examples written by ``histokd masks``
(``data.source: mask_pairs``)."""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

from histokd.data.decode import _HINT
from histokd.data.sources.base import (SPLITS, Record, Source, SplitPlan, _check_fractions, _check_split, _get,
                                       _need_path, _tqdm, stratified_split)
from histokd.data.sources.files import _FULL_CHECK_LIMIT
from histokd.errors import BadImageError, ConfigError, DataError
from histokd.registry import SOURCES

MASK_PAIR_LABELS = ("tissue", "nucleus_type")
#: What a :class:`MaskPairSource` yields as ``x`` (``data.input``).
MASK_PAIR_INPUTS = ("image", "mask")
_MASK_SHARD = re.compile(r"^masks-(\d{5})\.tfrecord$")
_FINGERPRINT_BUCKETS = 2**63 - 1


def path_fingerprints(paths) -> np.ndarray:
    """64-bit fingerprints of example paths, equal to the in-graph ``tf.strings.to_hash_bucket_fast``.

    The tf.data pipeline selects a split's examples by looking the fingerprint of
    each example's ``path`` feature up in the sorted fingerprints of the split.
    """
    import tensorflow as tf

    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0,), np.int64)
    return tf.strings.to_hash_bucket_fast(tf.constant(paths), _FINGERPRINT_BUCKETS).numpy().astype(np.int64)


def is_mask_dataset(path) -> bool:
    """Whether ``path`` is a folder written by ``histokd masks`` (:func:`histokd.nuclei.build_mask_dataset`)."""
    q = Path(path).expanduser()
    meta = q / "dataset.json"
    if not q.is_dir():
        return False
    if meta.is_file():
        try:
            with open(meta) as f:
                return "type_names" in json.load(f)
        except (OSError, ValueError):
            return False
    return any(_MASK_SHARD.match(p.name) for p in q.iterdir())


class MaskPairPlan(SplitPlan):
    """A split of a ``histokd masks`` folder: image/mask pairs parsed in graph.

    A split's examples are picked out of the shards by the fingerprint of their
    ``path`` feature before any PNG is decoded; ``x`` is ``{"image", "mask"}`` (or
    ``{"mask"}``), the mask resized with nearest neighbour so its type ids stay
    exact. Shards are checked like files (:func:`check_mask_pairs`).

    Args:
        records: list[Record]. The split's records (their ``path`` names the examples).
        shards: list[str]. Committed shard files.
        pairs: MaskPairSource. The folder the shards belong to.
        label_map: optional int array mapping stored labels onto the reading source's.
    """

    def __init__(self, records, shards, pairs, label_map=None):
        super().__init__("mask_pairs", list(records), shards=list(shards), label_map=label_map, pairs=pairs)

    def example_bytes(self, image_size):
        px = 3 * (image_size or 224) ** 2
        return 2 * px if self.pairs.input == "image" else px  # an image and its mask

    def to_dataset(self, owner, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        import tensorflow as tf

        from histokd.data.decode import resize_tf

        autotune = tf.data.AUTOTUNE
        size = None if image_size is None else int(image_size)
        pairs = self.pairs
        with_image = pairs.input == "image"
        records, take = check_mask_pairs(owner, split, self, on_bad_image, validate, progress)
        count = len(records)
        if count == 0:
            raise DataError(f"every image/mask pair of split {split!r} was skipped as unreadable "
                            "(see source.skipped)")
        keys = tf.constant(np.sort(pairs.fingerprints([r.path for r in records])))
        files = [f for f in self.shards if take.get(f, -1) != 0]
        fds = tf.data.Dataset.from_tensor_slices((files, np.asarray([take.get(f, -1) for f in files], np.int64)))
        if training and not cache:
            fds = fds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

        def read(f, n):
            return tf.data.TFRecordDataset(f).take(n)

        if training:
            ds = fds.interleave(read, cycle_length=max(1, min(len(files), 8)), num_parallel_calls=autotune,
                                deterministic=True)
        else:  # evaluation keeps the order of the shards' CSVs
            ds = fds.flat_map(read)
        label_field = pairs.label_field
        ds = ds.map(lambda s: _parse_pair(s, label_field, with_image), num_parallel_calls=autotune)

        def in_split(path, label, image_png, mask_png):
            fp = tf.strings.to_hash_bucket_fast(path, 2**63 - 1)
            i = tf.minimum(tf.searchsorted(keys, tf.reshape(fp, [1]))[0], tf.size(keys, out_type=tf.int32) - 1)
            return tf.equal(tf.gather(keys, i), fp)

        ds = ds.filter(in_split)
        if training and not cache:  # shuffle the still-encoded pairs; shard shuffling adds the rest
            ds = ds.shuffle(shuffle_buffer or min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
        label_map = None if self.label_map is None else tf.constant(np.asarray(self.label_map, np.int64))

        def decode(path, label, image_png, mask_png):
            if label_map is not None:
                label = tf.gather(label_map, label)
            mask = resize_mask_tf(tf.io.decode_png(mask_png, channels=3, dtype=tf.uint8), size)
            x = {"mask": mask}
            if with_image:
                x["image"] = resize_tf(tf.io.decode_png(image_png, channels=3, dtype=tf.uint8), size)
            return x, tf.cast(label, tf.int32)

        return ds.map(decode, num_parallel_calls=autotune), count

    def stored_image_size(self):
        import tensorflow as tf

        for raw in tf.data.TFRecordDataset(self.shards[:1]).take(1):
            feats = tf.train.Example.FromString(raw.numpy()).features.feature
            return [int(feats["height"].int64_list.value[0]), int(feats["width"].int64_list.value[0])]
        return None


def _check_mask_shard(shard: str, mode: str, expected: list):
    """Read one ``histokd masks`` shard: ``(n_readable, bad [(path, error)], seen_paths, corruption)``."""
    import cv2
    import tensorflow as tf

    n, bad, seen, corrupt = 0, [], [], None
    try:
        for raw in tf.data.TFRecordDataset(shard):
            n += 1
            try:
                feats = tf.train.Example.FromString(raw.numpy()).features.feature
                path = feats["path"].bytes_list.value[0].decode("utf-8")
            except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt record
                bad.append((f"{os.path.basename(shard)}#{n - 1}", f"unparsable record ({exc})"))
                seen.append(None)
                continue
            seen.append(path)
            for key in ("image_png", "mask_png"):
                data = feats[key].bytes_list.value[0] if key in feats else b""
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
                if img is None:
                    bad.append((path, f"the {key[:-4]} PNG of {path!r} in {os.path.basename(shard)} cannot be "
                                      "decoded"))
                    break
            if mode == "header":
                break
    except tf.errors.OpError as exc:
        corrupt = f"{os.path.basename(shard)} is truncated or corrupt after {n} record(s) ({type(exc).__name__})"
    return n, bad, seen, corrupt


def check_mask_pairs(source: Source, split: str, plan, on_bad_image="error", validate="auto", progress=True):
    """Check the shards of a mask-pair split once; returns ``(good_records, {shard: records_to_read})``.

    ``validate="full"`` reads every record of the split's shards and decodes both
    PNGs; ``"header"`` reads the first record of each shard only; ``"auto"`` is
    ``full`` up to 2 000 examples and ``header`` above (as for image files). Both
    check that a shard holds the examples its CSV lists, in order. Results are
    cached on the :class:`~histokd.data.sources.MaskPairSource`.

    Raises:
        BadImageError: an undecodable example or a truncated shard with ``on_bad_image="error"``.
        DataError: a shard does not match its CSV (the folder was edited).
    """
    if validate not in ("auto", "full", "header"):
        raise DataError(f"validate must be 'auto', 'full' or 'header', got {validate!r}")
    pairs = plan.pairs
    shards = list(plan.shards)
    total = sum(len(pairs.shard_rows(s)) for s in shards)
    mode = validate if validate != "auto" else ("full" if total <= _FULL_CHECK_LIMIT else "header")
    cache = pairs.__dict__.setdefault("_shard_checks", {})
    todo = [s for s in shards if (s, mode) not in cache and (s, "full") not in cache]
    if todo:
        bar = _tqdm(len(todo), f"checking {split} mask shards ({mode})", progress)
        for shard in todo:
            expected = pairs.shard_rows(shard)
            n, bad, seen, corrupt = _check_mask_shard(shard, mode, expected)
            differ = [(s, w) for s, w in zip(seen, expected) if s is not None and s != w]
            if differ or len(seen) > len(expected) or (mode == "full" and corrupt is None and n != len(expected)):
                raise DataError(f"{shard} does not hold the examples its CSV {os.path.basename(shard)[:-9]}.csv "
                                f"lists ({n} record(s) read, {len(expected)} listed"
                                f"{f', first differing: {differ[0][0]!r} vs {differ[0][1]!r}' if differ else ''}); "
                                "the folder was edited: rebuild it with `histokd masks`")
            cache[(shard, mode)] = (n if corrupt else -1, bad, corrupt)
            bar.update(1)
        bar.close()
    members = {r.path for r in plan.records}
    take, bad_paths, problems = {}, {}, []
    for shard in shards:
        n, bad, corrupt = cache.get((shard, "full")) or cache[(shard, mode)]
        take[shard] = n
        for path, err in bad:
            if path in members:
                bad_paths[path] = err
                problems.append(err)
        if corrupt is not None:
            lost = [p for p in pairs.shard_rows(shard)[max(n, 0):] if p in members]
            for p in lost:
                bad_paths.setdefault(p, corrupt)
            if lost:
                problems.append(corrupt)
    if problems:
        if on_bad_image == "error":
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise BadImageError(f"{problems[0]}{more} in split {split!r} of {pairs.directory}; rebuild the mask "
                                f"dataset with `histokd masks`, or {_HINT}")
        known = {(d["path"], d["split"]) for d in source.skipped}
        source.skipped.extend({"path": p, "split": split, "error": e} for p, e in bad_paths.items()
                              if (p, split) not in known)
        warnings.warn(f"skipped {len(bad_paths)} unreadable image/mask pair(s) of {len(plan.records)} in split "
                      f"{split!r} (data.on_bad_image=skip); they are listed in source.skipped", stacklevel=3)
    good = [r for r in plan.records if r.path not in bad_paths]
    return good, take


def _parse_pair(serialized, label_field: str, with_image: bool):
    """Parse one mask-pair example without decoding: (path, label, image PNG, mask PNG)."""
    import tensorflow as tf

    spec = {"path": tf.io.FixedLenFeature([], tf.string),
            "mask_png": tf.io.FixedLenFeature([], tf.string),
            label_field: tf.io.FixedLenFeature([], tf.int64)}
    if with_image:
        spec["image_png"] = tf.io.FixedLenFeature([], tf.string)
    ex = tf.io.parse_single_example(serialized, spec)
    return ex["path"], ex[label_field], ex.get("image_png", tf.constant(b"")), ex["mask_png"]


def resize_mask_tf(mask, image_size):
    """Resize a ``[H, W, 3]`` uint8 mask with nearest neighbour (type ids stay exact), skipped if equal."""
    import tensorflow as tf

    if image_size is None:
        return mask
    size = int(image_size)
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    out = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: mask,
                  lambda: tf.image.resize(mask, [size, size], method="nearest"))
    out.set_shape([size, size, 3])
    return out


@SOURCES.register("mask_pairs")
class MaskPairSource(Source):
    """Paired H&E image / nuclear-type mask examples written by ``histokd masks``.

    "More From Less" (Farndale, Insall & Yuan), §2.1 "Tissue-Nuclei Distillation"
    and Table 2: every tile is paired with the mask of its nuclei coloured by type
    (the type id repeated to 3 channels), and labelled by tissue class (the
    image's class folder) or by the "cell type most present in each image"
    (``Background`` only when the tile holds no nucleus).

    Reads a folder made by :func:`histokd.nuclei.build_mask_dataset`:
    ``dataset.json`` (type names, tissue names, method), committed shards
    ``masks-NNNNN.tfrecord`` with their ``masks-NNNNN.csv`` (one row per example,
    in shard order). The split is seeded and stratified by the joint (tissue,
    most-present type) label, so it is the *same* for ``label="tissue"`` and
    ``label="nucleus_type"``: an encoder trained on one task is never tested on
    its training tiles in the other (the Table 2 transfer).

    :func:`histokd.data.make_dataset` yields ``({"image", "mask"}, label)``
    batches (``input="image"``) or ``({"mask"}, label)`` (``input="mask"``: the
    H&E PNGs are not decoded): images resized with antialiased bilinear
    interpolation, masks with nearest neighbour (type ids stay exact).

    Args:
        directory: str. The ``histokd masks`` output folder.
        label: str. ``tissue`` (class names: the tissue folder names) or
            ``nucleus_type`` (class names: the segmenter's type names).
        input: str. ``image`` (pairs) or ``mask`` (masks only).
        val_fraction, test_fraction: float. Split fractions.
        seed: int. Split seed.

    Raises:
        DataError: not a mask dataset, no committed shard, tissue labels asked for
            images that were not in class folders, duplicate or out-of-range rows.

    Example:
        >>> src = MaskPairSource("masks/nct_crc_he_100k", label="nucleus_type")  # doctest: +SKIP
        >>> src.class_names                                                       # doctest: +SKIP
        ['Background', 'Neoplastic', 'Inflammatory', 'Connective', 'Dead', 'Non-Neoplastic Epithelial']
    """

    kind = "mask_pairs"

    def __init__(self, directory, label="tissue", input="image", val_fraction=0.2, test_fraction=0.0, seed=0):
        super().__init__()
        if label not in MASK_PAIR_LABELS:
            raise ConfigError(f"data.label must be one of {list(MASK_PAIR_LABELS)} for mask_pairs data, got {label!r}")
        if input not in MASK_PAIR_INPUTS:
            raise ConfigError(f"data.input must be one of {list(MASK_PAIR_INPUTS)}, got {input!r}")
        self.directory = Path(directory).expanduser()
        self.label, self.input = label, input
        self.val_fraction, self.test_fraction = _check_fractions(val_fraction, test_fraction)
        self.seed = int(seed)
        build = f"build one with `histokd masks SRC {self.directory} --weights PATH` (or --method classical)"
        if not self.directory.is_dir():
            raise DataError(f"mask dataset folder {str(self.directory)!r} does not exist; {build}")
        meta_path = self.directory / "dataset.json"
        if not meta_path.is_file():
            raise DataError(f"{str(self.directory)!r} is not a mask dataset (no dataset.json); {build}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
        except ValueError as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); {build}") from None
        if "type_names" not in self.meta:
            raise DataError(f"{str(self.directory)!r} holds a dataset.json without type_names: it is not a "
                            f"`histokd masks` output (a `histokd data prepare` folder is data.source=tfrecord); "
                            f"{build}")
        self.type_names = [str(t) for t in self.meta["type_names"]]
        self.tissue_names = [str(t) for t in self.meta.get("tissue_names") or []]
        self.mpp = self.meta.get("mpp")
        shards, uncommitted = [], []
        for p in sorted(self.directory.iterdir()):
            if _MASK_SHARD.match(p.name):
                (shards if p.with_suffix(".csv").is_file() else uncommitted).append(p)
        if not shards:
            raise DataError(f"no committed shards (masks-NNNNN.tfrecord + masks-NNNNN.csv) in "
                            f"{str(self.directory)!r}: `histokd masks` has not finished a shard yet; run or "
                            f"resume it: `histokd masks SRC {self.directory} ...`")
        if uncommitted or any(self.directory.glob("*.tmp")) or not (self.directory / "counts.csv").is_file():
            warnings.warn(f"{self.directory} looks like an interrupted `histokd masks` run (uncommitted shards or "
                          "no counts.csv); only its committed shards are read. Rerun the same command to "
                          "finish it", stacklevel=2)
        self._shards = [str(p) for p in shards]
        paths, tissue, types, shard_of = [], [], [], []
        for si, p in enumerate(shards):
            with open(p.with_suffix(".csv"), newline="") as f:
                for line, row in enumerate(csv.DictReader(f), start=2):
                    try:
                        paths.append(row["path"])
                        tissue.append(int(row["tissue_label"]))
                        types.append(int(row["label"]))
                    except (KeyError, TypeError, ValueError):
                        raise DataError(f"{p.with_suffix('.csv')} line {line} lacks path/tissue_label/label "
                                        "values; the folder was edited or written by another tool: rebuild "
                                        "it with `histokd masks`") from None
                    shard_of.append(si)
        self._paths = paths
        self._shard_rows = {s: [] for s in self._shards}
        for path, si in zip(paths, shard_of):
            self._shard_rows[self._shards[si]].append(path)
        seen, dup = set(), []
        for path in paths:
            if path in seen:
                dup.append(path)
            seen.add(path)
        if dup:
            raise DataError(f"{len(dup)} image(s) appear twice in {self.directory} (e.g. {dup[:3]}); the folder "
                            "mixes two `histokd masks` runs: rebuild it into an empty folder")
        tissue = np.asarray(tissue, np.int64)
        types = np.asarray(types, np.int64)
        if (types < 0).any() or (types >= len(self.type_names)).any():
            raise DataError(f"nucleus-type labels of {self.directory} fall outside the {len(self.type_names)} "
                            f"type names {self.type_names}; rebuild it with `histokd masks`")
        has_tissue = bool(self.tissue_names) and bool((tissue >= 0).all()) and bool(
            (tissue < len(self.tissue_names)).all())
        if label == "tissue":
            if not has_tissue:
                n_missing = int((tissue < 0).sum())
                raise DataError(f"data.label=tissue, but {n_missing} of {len(tissue)} images of {self.directory} "
                                "have no tissue class (they were not in class sub-folders when `histokd masks` "
                                "ran). Build the mask dataset from a folder with one sub-folder per tissue "
                                "class (SRC/<class>/<images>), or set data.label=nucleus_type")
            self.class_names = list(self.tissue_names)
            labels = tissue
        else:
            self.class_names = list(self.type_names)
            labels = types
        self._tissue, self._types = tissue, types
        strata = tissue * len(self.type_names) + types if has_tissue else types
        assign = stratified_split(strata, self.val_fraction, self.test_fraction, self.seed)
        self._records = {s: [] for s in SPLITS}
        for i, (path, y, s) in enumerate(zip(paths, labels, assign)):
            self._records[s].append(Record(path, int(y), s, mpp=self.mpp, index=i))
        self._field_index = {s: np.asarray([r.index for r in self._records[s]], np.int64) for s in SPLITS}
        self._fingerprints = None

    @property
    def label_field(self) -> str:
        """The TFRecord feature holding this source's labels (``tissue_label`` or ``label``)."""
        return "tissue_label" if self.label == "tissue" else "label"

    def records(self, split):
        return list(self._records[_check_split(split)])

    def shard_paths(self) -> list[str]:
        """Committed shard files, in order."""
        return list(self._shards)

    def shard_rows(self, shard: str) -> list[str]:
        """Example paths of one shard, in the order the shard holds them (its CSV)."""
        return list(self._shard_rows[shard])

    def fingerprints(self, paths) -> np.ndarray:
        """Fingerprints of some of this dataset's example paths (see :func:`path_fingerprints`)."""
        if self._fingerprints is None:
            fp = path_fingerprints(self._paths)
            if len(np.unique(fp)) != len(fp):  # pragma: no cover - 2^-64 per pair
                raise DataError(f"two example paths of {self.directory} share a 64-bit fingerprint; rename one")
            self._fingerprints = dict(zip(self._paths, fp.tolist()))
        return np.asarray([self._fingerprints[p] for p in paths], np.int64)

    def field_labels(self, field: str, split: str) -> np.ndarray:
        """Labels of ``split`` (record order) for ``field`` ``tissue`` or ``nucleus_type``.

        Both tasks of Table 2 label the same tiles; this gives the other task's labels
        (e.g. for :class:`histokd.evaluation.transfer.TransferTask`).
        """
        idx = self._field_index[_check_split(split)]
        if field == "nucleus_type":
            return self._types[idx]
        if field == "tissue":
            if (self._tissue[idx] < 0).any():
                raise DataError(f"the images of {self.directory} have no tissue classes (no class folders)")
            return self._tissue[idx]
        raise DataError(f"unknown label field {field!r}; mask datasets have {list(MASK_PAIR_LABELS)}")

    def field_class_names(self, field: str) -> list[str]:
        """Class names of a label field (``tissue`` or ``nucleus_type``)."""
        if field not in MASK_PAIR_LABELS:
            raise DataError(f"unknown label field {field!r}; mask datasets have {list(MASK_PAIR_LABELS)}")
        return list(self.tissue_names if field == "tissue" else self.type_names)

    def plan(self, split):
        return MaskPairPlan(self.records(split), self.shard_paths(), self)

    def external_plan(self, records, label_map):
        return MaskPairPlan(records, self.shard_paths(), self, label_map=label_map)

    def external_test_source(self, test_path, seed=0, image_size=64):
        """Another ``histokd masks`` folder (e.g. the masks of CRC-VAL-HE-7K), read with the
        same ``label`` and ``input``."""
        if not is_mask_dataset(test_path):
            raise DataError(f"data.source=mask_pairs needs data.test_path to be a `histokd masks` folder too "
                            f"(image/mask pairs), got {str(test_path)!r}; build it with "
                            f"`histokd masks TEST_IMAGES {test_path} ...`")
        test = MaskPairSource(test_path, label=self.label, input=self.input, val_fraction=0.0,
                              test_fraction=0.0, seed=seed)
        if self.label == "nucleus_type" and test.type_names != self.type_names:
            raise DataError(f"{self.directory} and {test_path} were segmented with different nuclear type sets "
                            f"({self.type_names} vs {test.type_names}); rebuild one with the same "
                            "`histokd masks --method/--weights`")
        return test

    @classmethod
    def from_config(cls, data_cfg) -> "MaskPairSource":
        """Build from a ``data`` section: ``path``, ``label``, ``input``, ``val_fraction``,
        ``test_fraction``, ``seed``."""
        return cls(_need_path(data_cfg, "mask_pairs"), label=_get(data_cfg, "label", "tissue"),
                   input=_get(data_cfg, "input", "image"), val_fraction=_get(data_cfg, "val_fraction", 0.2),
                   test_fraction=_get(data_cfg, "test_fraction", 0.0), seed=_get(data_cfg, "seed", 0))

    @classmethod
    def validate(cls, cfg):
        """``data.path`` is needed, and masks-only batches (``data.input: mask``) hold no
        H&E image to stain-normalise."""
        from histokd.stain import stain_normalizes

        d = cfg.data
        if d.input == "mask" and stain_normalizes(d.stain.method):
            raise ConfigError("data.input=mask reads no H&E images, so nothing can be stain-normalised: set "
                              "data.stain.method=none")
        if not d.path:
            raise ConfigError(f"data.source={d.source} needs data.path (the folder, CSV or file to read)")

    def describe(self):
        return {"type": "mask_pairs", "path": str(self.directory), "label": self.label, "input": self.input,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed,
                "method": self.meta.get("method"), "type_names": self.type_names}
