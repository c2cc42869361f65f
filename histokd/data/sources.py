"""Dataset sources: where images and labels come from.

A *source* lists :class:`Record` s per split (``train``/``val``/``test``) and knows
its class names. Five kinds of storage are behind the same interface:

* **files**: :class:`FolderSource` (one sub-folder per class) and
  :class:`ManifestSource` (a CSV ``path,label,split,slide_id,patient_id,mpp``);
* **arrays**: :class:`MedMNISTSource` (MedMNIST ``.npz``) and
  :class:`SyntheticSource` (the procedural H&E demo set, embedded);
* **tfrecord**: :class:`TFRecordSource` (a directory written by
  :func:`histokd.data.records.prepare`, i.e. ``histokd data prepare``);
* **mask pairs**: :class:`MaskPairSource` (H&E image / nuclear-type mask pairs
  written by ``histokd masks``, labelled by tissue or most-present nucleus type);

and :class:`CombinedSource` puts an external test set beside a training source
(e.g. CRC-VAL-HE-7K beside NCT-CRC-HE-100K, as in "More From Less", Farndale,
Insall & Yuan, §2.3). :func:`build_source` builds one from the ``data`` section
of a run configuration; :func:`source_from_path` guesses the kind from a path.

Example:
    >>> from histokd.data.sources import SyntheticSource
    >>> src = SyntheticSource(n_per_class=8, image_size=32)
    >>> src.class_names, src.num_examples("train")
    (['tumour', 'stroma', 'lymphocytes', 'adipose'], 16)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from histokd.data.decode import IMAGE_EXTENSIONS
from histokd.errors import ConfigError, DataError
from histokd.registry import DATASETS

#: Split names, in order.
SPLITS = ("train", "val", "test")

_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Record:
    """One example.

    Args:
        path: str | None. Image file (None for array-backed sources).
        label: int. Class index into the source's ``class_names``.
        split: str. "train", "val" or "test".
        slide_id: str. Whole-slide image the tile comes from ("" if unknown).
        patient_id: str. Patient ("" if unknown); a patient never spans two splits.
        mpp: float | None. Microns per pixel, if known.
        index: int | None. Row in the split's arrays for array-backed sources.
    """

    path: str | None
    label: int
    split: str
    slide_id: str = ""
    patient_id: str = ""
    mpp: float | None = None
    index: int | None = None


@dataclass
class SplitPlan:
    """How to read one split (used by the tf.data pipeline and by ``prepare``).

    Attributes:
        kind: "arrays", "files", "tfrecord" or "mask_pairs".
        records: the split's records.
        images, labels: uint8 ``[N,H,W,3]`` / int ``[N]`` for ``kind="arrays"``.
        shards: TFRecord files for ``kind="tfrecord"`` and ``kind="mask_pairs"``.
        label_map: optional int array mapping stored labels to this source's labels
            (TFRecord shards of an external test set).
        pairs: the :class:`MaskPairSource` owning the shards for ``kind="mask_pairs"``
            (the records' ``path`` names the examples of the split).
    """

    kind: str
    records: list
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    shards: list | None = None
    label_map: np.ndarray | None = None
    pairs: object | None = None


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


class Source:
    """Base class of every dataset source.

    Subclasses set ``class_names`` and ``kind`` and implement :meth:`records` (and
    :meth:`arrays` for array-backed sources, :meth:`plan` for TFRecords).

    Attributes:
        class_names: list[str]. Label ``i`` is ``class_names[i]``.
        kind: str. "files", "arrays" or "tfrecord".
        skipped: list[dict]. Undecodable images skipped so far (``path``, ``split``,
            ``error``), filled by :func:`histokd.data.pipeline.make_dataset` and
            :func:`histokd.data.records.prepare` with ``on_bad_image="skip"``.
    """

    kind = "files"

    def __init__(self):
        self.class_names: list[str] = []
        self.skipped: list[dict] = []

    # -- interface ----------------------------------------------------------
    def records(self, split: str) -> list[Record]:
        """Records of one split (in a fixed order)."""
        raise NotImplementedError

    def num_examples(self, split: str) -> int:
        """Number of examples in a split."""
        return len(self.records(split))

    def arrays(self, split: str):
        """``(uint8 [N,H,W,3], int64 [N])`` for array-backed sources."""
        raise DataError(f"{type(self).__name__} is not array-backed (its images are {self.kind}); "
                        "use histokd.data.make_dataset(source, split, ...) to read it")

    def plan(self, split: str) -> SplitPlan:
        """How the pipeline reads ``split`` (see :class:`SplitPlan`)."""
        _check_split(split)
        if self.kind == "arrays":
            x, y = self.arrays(split)
            return SplitPlan("arrays", self.records(split), images=x, labels=y)
        return SplitPlan(self.kind, self.records(split))

    def describe(self) -> dict:
        """A JSON-able description (type and arguments) stored with prepared data."""
        return {"type": type(self).__name__}

    # -- conveniences ---------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def splits(self) -> list[str]:
        """Non-empty splits, in train/val/test order."""
        return [s for s in SPLITS if self.num_examples(s) > 0]

    def class_counts(self, split: str) -> list[int]:
        """Examples per class in ``split``."""
        labels = [r.label for r in self.records(split)]
        return np.bincount(np.asarray(labels, dtype=np.int64), minlength=self.num_classes).tolist()

    def labels(self, split: str) -> np.ndarray:
        """Labels of ``split`` in record order (int64)."""
        return np.asarray([r.label for r in self.records(split)], dtype=np.int64)

    def __repr__(self):
        counts = ", ".join(f"{s}={self.num_examples(s)}" for s in SPLITS)
        return f"{type(self).__name__}({self.num_classes} classes; {counts})"


# --------------------------------------------------------------------------- splitting
def _check_fractions(val_fraction, test_fraction):
    v, t = float(val_fraction), float(test_fraction)
    if v < 0 or t < 0 or v + t >= 1:
        raise ConfigError(f"data.val_fraction={v} and data.test_fraction={t} must be >= 0 and sum "
                          "to less than 1 (the rest is the training split)")
    return v, t


def stratified_split(labels, val_fraction=0.2, test_fraction=0.0, seed=0, groups=None):
    """Assign each example to train/val/test, stratified by label and seeded.

    With ``groups`` (e.g. patient ids), whole groups are assigned (stratified by
    each group's majority label) so that no group spans two splits.

    Args:
        labels: array-like of int. One label per example.
        val_fraction: float. Fraction of each class for validation.
        test_fraction: float. Fraction of each class for test.
        seed: int. Random seed.
        groups: optional array-like of str. Group id per example ("" = own group).

    Returns:
        numpy array of split names, one per example.

    Example:
        >>> stratified_split([0, 0, 0, 0, 1, 1, 1, 1], 0.25, 0.25).tolist().count("train")
        4
    """
    v, t = _check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty(len(labels), dtype=object)
    if groups is not None:
        groups = np.asarray([g if g else f"\x00{i}" for i, g in enumerate(groups)], dtype=object)
        uniq, inverse = np.unique(groups.astype(str), return_inverse=True)
        glabel = np.zeros(len(uniq), dtype=np.int64)
        for gi in range(len(uniq)):
            glabel[gi] = np.bincount(labels[inverse == gi]).argmax()
        gsplit = stratified_split(glabel, v, t, seed)
        return gsplit[inverse]
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = _portion(n, t)
        n_val = _portion(n, v)
        while n_test + n_val >= n and n_test + n_val > 0:  # keep at least one training example
            if n_val >= n_test and n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        out[idx[:n_test]] = "test"
        out[idx[n_test:n_test + n_val]] = "val"
        out[idx[n_test + n_val:]] = "train"
    return out


def _portion(n, frac):
    if frac <= 0 or n == 0:
        return 0
    k = int(round(n * frac))
    return max(k, 1) if n >= 3 else k


# --------------------------------------------------------------------------- files
def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX") or name == "__pycache__"


def _find_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for f in sorted(filenames):
            if not _is_hidden(f) and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, f))
    return found


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not _is_hidden(p.name))


class FolderSource(Source):
    """Images in one sub-folder per class (searched recursively).

    Layouts::

        root/<class>/**/*.png|jpg|jpeg|tif|tiff|bmp|gif      → seeded stratified split
        root/train|val|test/<class>/**/<image>               → the given splits

    (``valid``/``validation`` are accepted for ``val``.) Class names are the
    sorted folder names, e.g. ``ADI BACK DEB LYM MUC MUS NORM STR TUM`` for
    NCT-CRC-HE-100K.

    Args:
        path: str. Root folder.
        val_fraction: float. Validation fraction per class (when no split folders).
        test_fraction: float. Test fraction per class (when no split folders).
        seed: int. Split seed.
        class_names: optional list[str]. Fix the class order (folders not listed
            raise an error; listed classes may be absent).

    Example:
        >>> src = FolderSource("NCT-CRC-HE-100K", val_fraction=0.1)  # doctest: +SKIP
        >>> src.class_names[:3]                                       # doctest: +SKIP
        ['ADI', 'BACK', 'DEB']
    """

    kind = "files"

    def __init__(self, path, val_fraction=0.2, test_fraction=0.0, seed=0, class_names=None):
        super().__init__()
        self.path = Path(path).expanduser()
        self.val_fraction, self.test_fraction = _check_fractions(val_fraction, test_fraction)
        self.seed = int(seed)
        expected = (f"expected {self.path}/<class name>/<images> (one sub-folder per class, images "
                    f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) or {self.path}/train|val|test/<class name>/<images>")
        if not self.path.is_dir():
            raise DataError(f"image folder {str(self.path)!r} does not exist or is not a folder; {expected}")
        subdirs = _subdirs(self.path)
        names = {d.name.lower() for d in subdirs}
        self.has_split_folders = bool(subdirs) and "train" in names and names <= set(_SPLIT_ALIASES)
        by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}  # (class, path)
        if self.has_split_folders:
            for d in subdirs:
                split = _SPLIT_ALIASES[d.name.lower()]
                by_split[split] += self._scan_classes(d, expected)
        else:
            by_split["train"] = self._scan_classes(self.path, expected)
        found = sorted({c for items in by_split.values() for c, _ in items})
        if not found:
            loose = [f for f in self.path.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)]
            hint = (f" ({len(loose)} images lie directly in the folder: move them into class sub-folders)"
                    if loose else "")
            raise DataError(f"no images found under {str(self.path)!r}{hint}; {expected}")
        if class_names is not None:
            unknown = sorted(set(found) - set(class_names))
            if unknown:
                raise DataError(f"folders {unknown} under {str(self.path)!r} are not among the expected "
                                f"classes {list(class_names)}; rename or remove them")
            self.class_names = list(class_names)
        else:
            self.class_names = found
        if len(self.class_names) == 1:
            warnings.warn(f"{self.path} has a single class folder ({self.class_names[0]!r}); "
                          "classification needs one sub-folder per class", stacklevel=2)
        index = {c: i for i, c in enumerate(self.class_names)}
        self._records: dict[str, list[Record]] = {s: [] for s in SPLITS}
        if self.has_split_folders:
            for split, items in by_split.items():
                self._records[split] = [Record(p, index[c], split) for c, p in items]
        else:
            items = by_split["train"]
            labels = [index[c] for c, _ in items]
            assign = stratified_split(labels, self.val_fraction, self.test_fraction, self.seed)
            for (c, p), s in zip(items, assign):
                self._records[s].append(Record(p, index[c], s))

    @staticmethod
    def _scan_classes(root: Path, expected: str):
        items = []
        for d in _subdirs(root):
            items += [(d.name, p) for p in _find_images(d)]
        return items

    def records(self, split):
        return list(self._records[_check_split(split)])

    def describe(self):
        return {"type": "folder", "path": str(self.path), "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction, "seed": self.seed,
                "split_folders": self.has_split_folders}


# --------------------------------------------------------------------------- manifest
_MAX_LISTED = 10


class ManifestSource(Source):
    """Images listed in a CSV manifest, validated on load.

    Columns: ``path`` and ``label`` (required); ``split``, ``slide_id``,
    ``patient_id``, ``mpp`` (optional). ``path`` may be relative to the CSV's
    folder. ``label`` is a class name, or an integer index into ``classes``
    (integers without ``classes`` become class names "0".."k-1"). Without a
    ``split`` column (or with empty values everywhere) a seeded split is made,
    stratified by label and grouped by ``patient_id`` when patients are given.

    Validation collects every problem and raises ONE :class:`DataError` naming
    the rows (CSV line numbers and values, first 10 of each kind): missing
    files, unknown labels, duplicate paths, a patient present in two splits,
    invalid split names, bad ``mpp`` values.

    Args:
        csv_path: str. The manifest.
        classes: optional list[str]. Allowed class names, in label order.
        val_fraction, test_fraction, seed: used only when no split is given.
        check_files: bool. Check that every file exists (default True).

    Example:
        >>> src = ManifestSource("tiles.csv", classes=["TUM", "STR"])  # doctest: +SKIP
    """

    kind = "files"
    REQUIRED = ("path", "label")
    OPTIONAL = ("split", "slide_id", "patient_id", "mpp")

    def __init__(self, csv_path, classes=None, val_fraction=0.2, test_fraction=0.0, seed=0,
                 check_files=True):
        super().__init__()
        self.csv_path = Path(csv_path).expanduser()
        self.val_fraction, self.test_fraction = _check_fractions(val_fraction, test_fraction)
        self.seed = int(seed)
        if not self.csv_path.is_file():
            raise DataError(f"manifest {str(self.csv_path)!r} does not exist")
        with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        missing = [c for c in self.REQUIRED if c not in header]
        if missing:
            raise DataError(f"manifest {str(self.csv_path)!r} lacks column(s) {missing}; found {header}. "
                            f"Required: {', '.join(self.REQUIRED)}; optional: {', '.join(self.OPTIONAL)}")
        if not rows:
            raise DataError(f"manifest {str(self.csv_path)!r} has a header but no rows")
        base = self.csv_path.parent
        problems: dict[str, list[str]] = {}

        def report(kind, line, text):
            problems.setdefault(kind, []).append(f"line {line}: {text}")

        # labels
        raw = [r["label"] for r in rows]
        all_int = all(re.fullmatch(r"-?\d+", x) for x in raw if x)
        if classes is not None:
            self.class_names = [str(c) for c in classes]
        elif all_int:
            k = max([int(x) for x in raw if x] + [0]) + 1
            self.class_names = [str(i) for i in range(k)]
        else:
            self.class_names = sorted({x for x in raw if x})
        name_index = {c: i for i, c in enumerate(self.class_names)}
        labels = []
        for i, x in enumerate(raw):
            line = i + 2
            if x in name_index:
                labels.append(name_index[x])
            elif all_int and x and 0 <= int(x) < len(self.class_names):
                labels.append(int(x))
            else:
                labels.append(-1)
                report("unknown label", line, f"label={x!r}")
        # paths
        paths, seen = [], {}
        for i, r in enumerate(rows):
            line = i + 2
            p = r["path"]
            if not p:
                report("empty path", line, "path is empty")
                paths.append("")
                continue
            full = Path(p).expanduser()
            if not full.is_absolute():
                full = base / full
            full = os.path.normpath(str(full))
            paths.append(full)
            if full in seen:
                report("duplicate path", line, f"path={p!r} (also on line {seen[full]})")
            else:
                seen[full] = line
            if check_files and not os.path.isfile(full):
                report("missing file", line, f"path={p!r} → {full}")
        # splits
        given = [r.get("split", "") for r in rows]
        has_split = any(given)
        splits = []
        for i, s in enumerate(given):
            if not has_split:
                splits.append("")
                continue
            s2 = _SPLIT_ALIASES.get(s.lower())
            if s2 is None:
                report("invalid split", i + 2, f"split={s!r}")
            splits.append(s2 or "")
        # mpp
        mpps = []
        for i, r in enumerate(rows):
            x = r.get("mpp", "")
            if not x:
                mpps.append(None)
                continue
            try:
                v = float(x)
                if not v > 0:
                    raise ValueError
                mpps.append(v)
            except ValueError:
                report("invalid mpp", i + 2, f"mpp={x!r}")
                mpps.append(None)
        patients = [r.get("patient_id", "") for r in rows]
        if has_split:
            first: dict[str, tuple[str, int]] = {}
            for i, (pid, s) in enumerate(zip(patients, splits)):
                if not pid or not s:
                    continue
                if pid not in first:
                    first[pid] = (s, i + 2)
                elif first[pid][0] != s:
                    report("patient in two splits", i + 2,
                           f"patient_id={pid!r} in split {s!r} but in {first[pid][0]!r} on line {first[pid][1]}")
        if problems:
            fixes = {
                "missing file": "fix the path (relative paths are resolved against the CSV's folder) or remove the row",
                "unknown label": f"use one of the classes {self.class_names}" if classes is not None
                else "give every row a label",
                "duplicate path": "list each image once",
                "patient in two splits": "put all tiles of a patient in one split (splitting by patient "
                                         "avoids leakage)",
                "invalid split": f"use one of {', '.join(SPLITS)} (or leave the split column empty in every row "
                                 "for a seeded split)",
                "invalid mpp": "give microns per pixel as a positive number, or leave it empty",
                "empty path": "give every row a path",
            }
            lines = [f"manifest {str(self.csv_path)!r} has {sum(map(len, problems.values()))} problem(s):"]
            for kind, items in problems.items():
                lines.append(f"- {kind} ({len(items)} row(s); fix: {fixes[kind]}):")
                lines += [f"    {t}" for t in items[:_MAX_LISTED]]
                if len(items) > _MAX_LISTED:
                    lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
            raise DataError("\n".join(lines))
        if not has_split:
            groups = patients if any(patients) else None
            splits = list(stratified_split(labels, self.val_fraction, self.test_fraction, self.seed, groups))
        self.has_split_column = has_split
        self._records = {s: [] for s in SPLITS}
        for r, p, y, s, mpp in zip(rows, paths, labels, splits, mpps):
            self._records[s].append(Record(p, y, s, r.get("slide_id", ""), r.get("patient_id", ""), mpp))

    def records(self, split):
        return list(self._records[_check_split(split)])

    def describe(self):
        return {"type": "manifest", "path": str(self.csv_path), "split_column": self.has_split_column,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed}


# --------------------------------------------------------------------------- arrays
def array_to_rgb_uint8(x: np.ndarray) -> np.ndarray:
    """Stack of images ``[N,H,W]``/``[N,H,W,1|3|4]`` of any dtype → RGB uint8 ``[N,H,W,3]``.

    Same rules as :func:`histokd.data.decode.to_rgb_uint8` (16-bit / 257, alpha on white).
    """
    from histokd.data.decode import to_rgb_uint8

    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"cannot interpret an image stack of shape {x.shape} as grey/RGB/RGBA images")
    if x.dtype == np.uint8 and x.shape[-1] == 3:
        return x
    if x.dtype == np.uint8 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    # reuse the per-image rules on the whole stack (folded into one tall image)
    n, h, w, c = x.shape
    return to_rgb_uint8(x.reshape(n * h, w, c)).reshape(n, h, w, 3)


class ArraySource(Source):
    """In-memory arrays per split (base of MedMNIST and synthetic sources).

    Args:
        split_arrays: dict split → (images ``[N,H,W(,C)]``, labels ``[N]``).
        class_names: list[str].
    """

    kind = "arrays"

    def __init__(self, split_arrays=None, class_names=None):
        super().__init__()
        self._arrays = {s: None for s in SPLITS}
        if split_arrays:
            for s, (x, y) in split_arrays.items():
                self._arrays[_check_split(s)] = (array_to_rgb_uint8(x), np.asarray(y, np.int64).reshape(-1))
        if class_names is not None:
            self.class_names = list(class_names)

    def _load(self):
        """Hook for lazy loading."""

    def arrays(self, split):
        self._load()
        item = self._arrays[_check_split(split)]
        if item is None:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int64)
        return item

    def num_examples(self, split):
        return len(self.arrays(split)[1])

    def records(self, split):
        _, y = self.arrays(split)
        return [Record(None, int(v), split, index=i) for i, v in enumerate(y)]

    def labels(self, split):
        return self.arrays(split)[1]

    def class_counts(self, split):
        return np.bincount(self.arrays(split)[1], minlength=self.num_classes).tolist()

    def describe(self):
        return {"type": "arrays"}


#: Label names of a few 2-D MedMNIST v2 datasets (from the MedMNIST INFO table).
MEDMNIST_LABELS = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
}


class MedMNISTSource(ArraySource):
    """A MedMNIST v2 ``.npz`` (2-D): ``{train,val,test}_images`` / ``_labels``.

    Images ``[N,H,W]`` (grey) or ``[N,H,W,3]`` become RGB uint8; labels ``[N,1]``
    or ``[N]``. Multi-label files (``[N,K]`` labels, e.g. ChestMNIST) and 3-D
    volumes (``[N,D,H,W]``, the ``*mnist3d`` files) are rejected with a message.

    Args:
        npz_path: str. The ``.npz`` file.
        class_names: optional list[str]. Overrides names from ``info`` / the file name.
        info: optional MedMNIST INFO entry (``{"label": {"0": "normal", ...}}``), a
            mapping label → name, or a list of names.

    Example:
        >>> src = MedMNISTSource("pneumoniamnist.npz")  # doctest: +SKIP
        >>> src.class_names                              # doctest: +SKIP
        ['normal', 'pneumonia']
    """

    def __init__(self, npz_path, class_names=None, info=None):
        super().__init__()
        self.npz_path = Path(npz_path).expanduser()
        if not self.npz_path.is_file():
            raise DataError(f"MedMNIST file {str(self.npz_path)!r} does not exist")
        try:
            with np.load(self.npz_path, allow_pickle=False) as z:
                keys = set(z.files)
                shapes = {k: z[k].shape for k in keys if k.endswith(("_images", "_labels"))}
        except Exception as exc:  # zipfile/ValueError/OSError: not an npz
            raise DataError(f"cannot read {str(self.npz_path)!r} as a MedMNIST .npz: {exc}") from None
        if "train_images" not in keys or "train_labels" not in keys:
            raise DataError(f"{str(self.npz_path)!r} is not in the MedMNIST layout: expected arrays "
                            f"train_images/train_labels (and val_*, test_*), found {sorted(keys)}")
        for s in SPLITS:
            if f"{s}_images" in keys and f"{s}_labels" not in keys:
                raise DataError(f"{str(self.npz_path)!r} has {s}_images but no {s}_labels")
            if f"{s}_images" not in keys:
                continue
            xs, ys = shapes[f"{s}_images"], shapes[f"{s}_labels"]
            is_3d = len(xs) == 5 or (len(xs) == 4 and xs[-1] not in (1, 3, 4))
            if is_3d:
                raise DataError(f"{str(self.npz_path)!r} holds 3-D volumes ({s}_images shape {xs}); "
                                "MedMNISTSource reads 2-D images only — use the 3-D data path "
                                "(SwinFUSE, *mnist3d) for volumes")
            if len(xs) not in (3, 4):
                raise DataError(f"{s}_images of {str(self.npz_path)!r} has shape {xs}; expected [N,H,W] or [N,H,W,3]")
            if len(ys) == 2 and ys[1] > 1:
                raise DataError(f"{str(self.npz_path)!r} is multi-label ({s}_labels shape {ys}); only "
                                "single-label classification is supported")
            if ys[0] != xs[0]:
                raise DataError(f"{str(self.npz_path)!r}: {s}_images has {xs[0]} images but {s}_labels "
                                f"has {ys[0]} labels")
        self._shapes = shapes
        self._loaded = False
        self._names_arg = class_names
        self._info = info
        self._load()

    def _load(self):
        if self._loaded:
            return
        with np.load(self.npz_path, allow_pickle=False) as z:
            for s in SPLITS:
                if f"{s}_images" in z.files:
                    x = array_to_rgb_uint8(z[f"{s}_images"])
                    y = np.asarray(z[f"{s}_labels"]).reshape(-1).astype(np.int64)
                    self._arrays[s] = (x, y)
        self._loaded = True
        all_y = np.concatenate([a[1] for a in self._arrays.values() if a is not None])
        if all_y.size and all_y.min() < 0:
            raise DataError(f"{str(self.npz_path)!r} has negative labels")
        k = int(all_y.max()) + 1 if all_y.size else 0
        self.class_names = self._resolve_names(k)

    def _resolve_names(self, k):
        names = None
        if self._names_arg is not None:
            names = [str(c) for c in self._names_arg]
        elif self._info is not None:
            info = self._info.get("label", self._info) if isinstance(self._info, Mapping) else self._info
            if isinstance(info, Mapping):
                names = [str(info.get(str(i), info.get(i, i))) for i in range(max(k, len(info)))]
            else:
                names = [str(c) for c in info]
        else:
            m = re.match(r"([a-z]+mnist)(?:_|$)", self.npz_path.stem.lower())
            if m and m.group(1) in MEDMNIST_LABELS and len(MEDMNIST_LABELS[m.group(1)]) >= k:
                names = list(MEDMNIST_LABELS[m.group(1)])
        if names is None:
            names = [str(i) for i in range(k)]
        if len(names) < k:
            raise DataError(f"{str(self.npz_path)!r} has labels up to {k - 1} but only {len(names)} class "
                            f"names were given: {names}")
        return names

    def describe(self):
        return {"type": "medmnist", "path": str(self.npz_path)}


class SyntheticSource(ArraySource):
    """The procedural H&E demo set (see :mod:`histokd.data.synthetic`), split stratified.

    Args:
        n_per_class: int. Images per class (all splits together).
        image_size: int. Tile side in pixels.
        seed: int. Generator and split seed.
        num_classes: int. 1..6 tissue classes.
        val_fraction, test_fraction: float. Split fractions per class.

    Example:
        >>> src = SyntheticSource(n_per_class=10, image_size=32, num_classes=6)
        >>> src.arrays("val")[0].shape
        (12, 32, 32, 3)
    """

    def __init__(self, n_per_class=96, image_size=64, seed=0, num_classes=4, val_fraction=0.2,
                 test_fraction=0.2):
        super().__init__()
        from histokd.data.synthetic import CLASS_NAMES

        self.n_per_class, self.image_size = int(n_per_class), int(image_size)
        self.seed, self.n_classes = int(seed), int(num_classes)
        if not 1 <= self.n_classes <= len(CLASS_NAMES):
            raise ConfigError(f"data.synthetic_classes must be 1..{len(CLASS_NAMES)} "
                              f"({', '.join(CLASS_NAMES)}), got {num_classes}")
        self.val_fraction, self.test_fraction = _check_fractions(val_fraction, test_fraction)
        self.class_names = list(CLASS_NAMES[: self.n_classes])
        self._loaded = False

    def _load(self):
        if self._loaded:
            return
        from histokd.data.synthetic import make_synthetic_he

        x, y, _ = make_synthetic_he(self.n_per_class, self.image_size, self.seed, self.n_classes)
        assign = stratified_split(y, self.val_fraction, self.test_fraction, self.seed)
        for s in SPLITS:
            m = assign == s
            self._arrays[s] = (x[m], y[m]) if m.any() else None
        self._loaded = True

    def num_examples(self, split):
        if not self._loaded:  # the counts are known without rendering anything
            _check_split(split)
            y = np.repeat(np.arange(self.n_classes), self.n_per_class)
            return int(np.sum(stratified_split(y, self.val_fraction, self.test_fraction, self.seed) == split))
        return super().num_examples(split)

    def describe(self):
        return {"type": "synthetic", "n_per_class": self.n_per_class, "image_size": self.image_size,
                "seed": self.seed, "num_classes": self.n_classes, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction}


# --------------------------------------------------------------------------- tfrecord
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
        return SplitPlan("tfrecord", [], shards=self.shards(split))

    def describe(self):
        return {"type": "tfrecord", "path": str(self.directory), "prepared_from": self.meta.get("source")}


# --------------------------------------------------------------------------- mask pairs
#: Labels a :class:`MaskPairSource` can train on (``data.label``).
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
        return SplitPlan("mask_pairs", self.records(split), shards=self.shard_paths(), pairs=self)

    def describe(self):
        return {"type": "mask_pairs", "path": str(self.directory), "label": self.label, "input": self.input,
                "val_fraction": self.val_fraction, "test_fraction": self.test_fraction, "seed": self.seed,
                "method": self.meta.get("method"), "type_names": self.type_names}


# --------------------------------------------------------------------------- combined
class CombinedSource(Source):
    """Train/val from one source, test from another (an external cohort).

    Every record of ``test_source`` (whatever its own split) becomes a ``test``
    record; its labels are mapped onto ``main``'s class names by name. The test
    split of ``main`` (if any) is not used.

    Args:
        main: Source. Provides ``train`` and ``val``.
        test_source: Source. Provides ``test``.

    Example:
        >>> src = CombinedSource(FolderSource("NCT-CRC-HE-100K", test_fraction=0.0),
        ...                      FolderSource("CRC-VAL-HE-7K", 0.0, 0.0))  # doctest: +SKIP
    """

    def __init__(self, main: Source, test_source: Source):
        super().__init__()
        self.main, self.test_source = main, test_source
        self.class_names = list(main.class_names)
        self.kind = main.kind if main.kind == test_source.kind else "mixed"
        index = {c: i for i, c in enumerate(self.class_names)}
        unknown = [c for c in test_source.class_names if c not in index]
        if unknown:
            raise DataError(f"the test set has classes {unknown} that the training data does not have "
                            f"(training classes: {self.class_names}); class names must match by name")
        self.label_map = np.asarray([index[c] for c in test_source.class_names], dtype=np.int64)
        if main.num_examples("test"):
            warnings.warn(f"data.test_path is set: the {main.num_examples('test')} test examples of the main "
                          "source are not used (set data.test_fraction=0 to keep them in training)", stacklevel=2)

    def records(self, split):
        _check_split(split)
        if split != "test":
            return self.main.records(split)
        out = []
        for s in self.test_source.splits:
            for r in self.test_source.records(s):
                out.append(dataclasses.replace(r, label=int(self.label_map[r.label]), split="test"))
        return out

    def num_examples(self, split):
        _check_split(split)
        if split != "test":
            return self.main.num_examples(split)
        return sum(self.test_source.num_examples(s) for s in SPLITS)

    def arrays(self, split):
        if split != "test":
            return self.main.arrays(split)
        xs, ys = [], []
        for s in self.test_source.splits:
            x, y = self.test_source.arrays(s)
            xs.append(x)
            ys.append(self.label_map[y])
        if not xs:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int64)
        return np.concatenate(xs), np.concatenate(ys)

    def plan(self, split):
        _check_split(split)
        if split != "test":
            return self.main.plan(split)
        kind = self.test_source.kind
        if kind == "arrays":
            x, y = self.arrays("test")
            return SplitPlan("arrays", self.records("test"), images=x, labels=y)
        if kind == "tfrecord":
            shards = [p for s in self.test_source.splits for p in self.test_source.plan(s).shards]
            return SplitPlan("tfrecord", [], shards=shards, label_map=self.label_map)
        if kind == "mask_pairs":
            return SplitPlan("mask_pairs", self.records("test"), shards=self.test_source.shard_paths(),
                             label_map=self.label_map, pairs=self.test_source)
        return SplitPlan(kind, self.records("test"))

    def labels(self, split):
        if split != "test":
            return self.main.labels(split)
        return np.concatenate([self.label_map[self.test_source.labels(s)] for s in self.test_source.splits] or
                              [np.zeros((0,), np.int64)])

    def class_counts(self, split):
        return np.bincount(self.labels(split), minlength=self.num_classes).tolist()

    def describe(self):
        return {"type": "combined", "main": self.main.describe(), "test": self.test_source.describe()}


# --------------------------------------------------------------------------- factories
def _get(cfg, name, default=None):
    if isinstance(cfg, Mapping):
        value = cfg.get(name, default)
    else:
        value = getattr(cfg, name, default)
    return default if value is None else value


def _need_path(cfg, kind):
    path = _get(cfg, "path")
    if not path:
        raise ConfigError(f"data.source={kind!r} needs data.path (e.g. `--set data.path=/data/{kind}`)")
    return str(path)


@DATASETS.register("synthetic")
def _build_synthetic(cfg) -> Source:
    return SyntheticSource(n_per_class=_get(cfg, "synthetic_per_class", 96), image_size=_get(cfg, "image_size", 64),
                           seed=_get(cfg, "seed", 0), num_classes=_get(cfg, "synthetic_classes", 4),
                           val_fraction=_get(cfg, "val_fraction", 0.2), test_fraction=_get(cfg, "test_fraction", 0.2))


@DATASETS.register("folder")
def _build_folder(cfg) -> Source:
    return FolderSource(_need_path(cfg, "folder"), val_fraction=_get(cfg, "val_fraction", 0.2),
                        test_fraction=_get(cfg, "test_fraction", 0.0), seed=_get(cfg, "seed", 0))


@DATASETS.register("manifest")
def _build_manifest(cfg) -> Source:
    return ManifestSource(_need_path(cfg, "manifest"), classes=_get(cfg, "classes"),
                          val_fraction=_get(cfg, "val_fraction", 0.2),
                          test_fraction=_get(cfg, "test_fraction", 0.0), seed=_get(cfg, "seed", 0))


@DATASETS.register("medmnist")
def _build_medmnist(cfg) -> Source:
    return MedMNISTSource(_need_path(cfg, "medmnist"))


@DATASETS.register("tfrecord")
def _build_tfrecord(cfg) -> Source:
    return TFRecordSource(_need_path(cfg, "tfrecord"))


@DATASETS.register("mask_pairs")
def _build_mask_pairs(cfg) -> Source:
    return MaskPairSource(_need_path(cfg, "mask_pairs"), label=_get(cfg, "label", "tissue"),
                          input=_get(cfg, "input", "image"), val_fraction=_get(cfg, "val_fraction", 0.2),
                          test_fraction=_get(cfg, "test_fraction", 0.0), seed=_get(cfg, "seed", 0))


@DATASETS.register("auto")
def _build_auto(cfg) -> Source:
    return source_from_path(_need_path(cfg, "auto"), val_fraction=_get(cfg, "val_fraction", 0.2),
                            test_fraction=_get(cfg, "test_fraction", 0.0), seed=_get(cfg, "seed", 0),
                            image_size=_get(cfg, "image_size", 64))


def source_from_path(path, val_fraction=0.2, test_fraction=None, seed=0, image_size=64,
                     synthetic_per_class=96, synthetic_classes=4) -> Source:
    """Build a source from a path, guessing its kind.

    ``"synthetic"`` → :class:`SyntheticSource`; a ``histokd masks`` folder →
    :class:`MaskPairSource` (tissue labels when the images had class folders, else
    nucleus types); another folder with ``dataset.json`` → :class:`TFRecordSource`;
    another folder → :class:`FolderSource`; ``*.csv`` →
    :class:`ManifestSource`; ``*.npz`` → :class:`MedMNISTSource`.

    Args:
        path: str. See above.
        val_fraction, test_fraction, seed: split settings (folders, manifests
            without a split column, synthetic). ``test_fraction=None`` means 0.2 for
            synthetic data and 0 otherwise.
        image_size, synthetic_per_class, synthetic_classes: for "synthetic".

    Returns:
        A :class:`Source`.

    Example:
        >>> source_from_path("synthetic", image_size=32, synthetic_per_class=4).num_classes
        4
    """
    p = str(path)
    if p.lower() in ("synthetic", "demo"):
        return SyntheticSource(synthetic_per_class, image_size, seed, synthetic_classes, val_fraction,
                               0.2 if test_fraction is None else test_fraction)
    test_fraction = 0.0 if test_fraction is None else test_fraction
    q = Path(p).expanduser()
    if q.is_dir():
        if is_mask_dataset(q):
            return MaskPairSource(q, label="tissue" if _has_tissue(q) else "nucleus_type",
                                  val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
        if (q / "dataset.json").is_file():
            return TFRecordSource(q)
        return FolderSource(q, val_fraction, test_fraction, seed)
    if q.suffix.lower() == ".csv":
        return ManifestSource(q, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if q.suffix.lower() == ".npz":
        return MedMNISTSource(q)
    if not q.exists():
        raise DataError(f"data source {p!r} does not exist (expected an image folder, a manifest .csv, a "
                        "MedMNIST .npz, a prepared TFRecord folder or 'synthetic')")
    raise DataError(f"cannot tell what kind of data source {p!r} is; give an image folder, a manifest .csv, "
                    "a MedMNIST .npz, a folder written by `histokd data prepare`, or 'synthetic'")


def _has_tissue(path) -> bool:
    try:
        with open(Path(path) / "dataset.json") as f:
            return bool(json.load(f).get("tissue_names"))
    except (OSError, ValueError):
        return False


def build_source(data_cfg) -> Source:
    """Build the dataset source described by a run's ``data`` configuration.

    Reads (with defaults) ``source`` (synthetic|folder|manifest|medmnist|tfrecord|mask_pairs|auto),
    ``path``, ``test_path``, ``val_fraction``, ``test_fraction``, ``seed``,
    ``synthetic_per_class``, ``synthetic_classes``, ``image_size``, ``label`` and
    ``input`` (mask_pairs) from any object with those attributes (or a mapping).
    For ``mask_pairs`` the ``test_path`` must be another ``histokd masks`` folder
    (e.g. the masks of CRC-VAL-HE-7K), read with the same ``label`` and ``input``. With ``test_path`` the result is a
    :class:`CombinedSource`: train/val from ``path`` (built with
    ``test_fraction=0``), test = every image under ``test_path``, like
    CRC-VAL-HE-7K as the external test set of NCT-CRC-HE-100K in "More From
    Less" §2.3.

    Args:
        data_cfg: object or mapping. The ``data`` section of a config.

    Returns:
        A :class:`Source`.

    Example:
        >>> from types import SimpleNamespace
        >>> build_source(SimpleNamespace(source="synthetic", synthetic_per_class=4, image_size=32)).num_classes
        4
    """
    kind = str(_get(data_cfg, "source", "synthetic")).lower()
    test_path = _get(data_cfg, "test_path")
    if not test_path:
        return DATASETS.get(kind)(data_cfg)
    fields = ("source", "path", "val_fraction", "seed", "synthetic_per_class", "synthetic_classes",
              "image_size", "classes", "label", "input")
    shim = SimpleNamespace(**{f: _get(data_cfg, f) for f in fields})
    shim.test_fraction = 0.0
    main = DATASETS.get(kind)(shim)
    if kind == "mask_pairs":
        if not is_mask_dataset(test_path):
            raise DataError(f"data.source=mask_pairs needs data.test_path to be a `histokd masks` folder too "
                            f"(image/mask pairs), got {str(test_path)!r}; build it with "
                            f"`histokd masks TEST_IMAGES {test_path} ...`")
        test = MaskPairSource(test_path, label=main.label, input=main.input, val_fraction=0.0,
                              test_fraction=0.0, seed=_get(data_cfg, "seed", 0))
        if main.label == "nucleus_type" and test.type_names != main.type_names:
            raise DataError(f"{main.directory} and {test_path} were segmented with different nuclear type sets "
                            f"({main.type_names} vs {test.type_names}); rebuild one with the same "
                            "`histokd masks --method/--weights`")
        return CombinedSource(main, test)
    with warnings.catch_warnings():  # an external test set may well hold a single class
        warnings.filterwarnings("ignore", message=".*single class folder")
        test = source_from_path(test_path, val_fraction=0.0, test_fraction=0.0, seed=_get(data_cfg, "seed", 0),
                                image_size=_get(data_cfg, "image_size", 64))
    return CombinedSource(main, test)
