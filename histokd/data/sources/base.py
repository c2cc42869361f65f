"""Base of every dataset source: records, split plans, the read protocol, splitting.

A *source* lists :class:`Record` s per split (``train``/``val``/``test``), knows its
class names and reads itself: :meth:`Source.to_dataset` gives the decoded
``tf.data`` elements of a split (:func:`histokd.data.pipeline.make_dataset` adds the
shared shuffling, caching, batching and prefetching), :meth:`Source.prepare_reader`
what ``histokd data prepare`` encodes, :meth:`Source.stored_image_size` what
``histokd data info`` reports. By default these delegate to the split's
:class:`SplitPlan`, one subclass per storage (arrays, image files, TFRecords, mask
pairs), so a source over existing storage only lists records; a source over new
storage overrides :meth:`Source.to_dataset` (see ``tests/data/test_sources_plugin.py``).

Each concrete source lives in its own module of :mod:`histokd.data.sources` and
registers itself in :data:`histokd.registry.SOURCES` under its ``data.source`` name,
with :meth:`Source.from_config` (build from the ``data`` section) and
:meth:`Source.validate` (reject run configurations it cannot serve).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from histokd.errors import ConfigError, DataError

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
    """How to read one split; subclasses read one kind of storage.

    Used by the default :meth:`Source.to_dataset`, :meth:`Source.prepare_reader` and
    :meth:`Source.stored_image_size`, so the tf.data pipeline and ``prepare`` never
    branch on the kind of storage.

    Attributes:
        kind: "arrays", "files", "tfrecord" or "mask_pairs" (descriptive only).
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

    def to_dataset(self, owner, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        """Unbatched decoded ``(x, y)`` elements of the split and their number.

        Args:
            owner: Source. The source being read: file checks are cached on it and
                skipped files listed in its ``skipped``.
            split: str. The split's name (for messages).
            image_size: int | None. Working size (None keeps sizes).
            training: bool. Shuffle (before decoding when ``cache`` is false).
            seed: int. Shuffle seed.
            on_bad_image: str. "error" or "skip".
            cache: bool. Whether ``make_dataset`` caches the decoded elements (it then
                shuffles after the cache, so nothing is shuffled here).
            validate: str. "auto", "full" or "header" (file checks).
            shuffle_buffer: int | None. Buffer of a pre-decode shuffle.
            progress: bool. Progress bar while checking files.

        Returns:
            ``(tf.data.Dataset of (x uint8 [S,S,3] or dict, y int32), count)``.
        """
        raise DataError(f"unsupported source kind {self.kind!r}")

    def example_bytes(self, image_size) -> int | None:
        """Bytes of one decoded example at ``image_size``; None when the split already
        lives in memory (caching it would only copy it)."""
        return 3 * (image_size or 224) ** 2

    def prepare_reader(self, split):
        """``(labels, load)`` for ``histokd data prepare``: ``load(i)`` gives record ``i`` as
        RGB uint8 ``[H, W, 3]`` or raises :class:`~histokd.errors.BadImageError`."""
        raise DataError(f"cannot prepare split {split!r} of kind {self.kind!r}")

    def stored_image_size(self):
        """``[h, w]`` of the split's first stored image, or None."""
        return None


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


class Source:
    """Base class of every dataset source.

    Subclasses set ``class_names`` and ``kind`` and implement :meth:`records` (and
    :meth:`arrays` for array-backed sources, :meth:`plan` for other storage). A
    source registered in :data:`histokd.registry.SOURCES` also gives
    :meth:`from_config` and, if it has constraints of its own, :meth:`validate`.

    Attributes:
        class_names: list[str]. Label ``i`` is ``class_names[i]``.
        kind: str. "files", "arrays", "tfrecord", "mask_pairs" (or "mixed" for a
            :class:`CombinedSource` of two kinds); descriptive, never dispatched on.
        skipped: list[dict]. Undecodable images skipped so far (``path``, ``split``,
            ``error``), filled by :func:`histokd.data.pipeline.make_dataset` and
            :func:`histokd.data.records.prepare` with ``on_bad_image="skip"``.
    """

    kind = "files"

    def __init__(self):
        self.class_names: list[str] = []
        self.skipped: list[dict] = []

    # -- registry interface ---------------------------------------------------
    @classmethod
    def from_config(cls, data_cfg) -> "Source":
        """Build the source from a run's ``data`` section (an object or a mapping)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a configuration")

    @classmethod
    def validate(cls, cfg):
        """Reject a run configuration this source cannot serve.

        The base rules: ``data.label`` and ``data.input`` other than their defaults
        need ``data.source: mask_pairs``, and ``data.path`` must be set.

        Args:
            cfg: RunConfig. The whole run configuration.

        Raises:
            ConfigError: with what to change.
        """
        d = cfg.data
        if d.label != "tissue":
            raise ConfigError(f"data.label={d.label} needs data.source=mask_pairs (nucleus-type labels come "
                              "from `histokd masks`); other sources use their own labels")
        if d.input != "image":
            raise ConfigError(f"data.input={d.input} needs data.source=mask_pairs (masks come from `histokd masks`)")
        if not d.path:
            raise ConfigError(f"data.source={d.source} needs data.path (the folder, CSV or file to read)")

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
        """How ``split`` is read (see :class:`SplitPlan`)."""
        raise NotImplementedError(f"{type(self).__name__} must say how its splits are read (plan); "
                                  "file-backed sources derive from histokd.data.sources.files.FileSource")

    def external_plan(self, records, label_map) -> SplitPlan:
        """A plan reading every split of this source as another source's test split.

        Args:
            records: list[Record]. Those splits' records, relabelled for the other source.
            label_map: int array. This source's label ``i`` is the other's ``label_map[i]``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot serve as an external test set (external_plan)")

    def external_test_source(self, test_path, seed=0, image_size=64) -> "Source | None":
        """The source of ``data.test_path`` (an external test set) beside this one, or None
        for the default: the source detected at that path (:func:`build_source`)."""
        return None

    # -- reading (histokd.data.pipeline / records call these) ---------------------
    def to_dataset(self, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        """Unbatched decoded ``(x, y)`` elements of ``split`` and their number.

        :func:`histokd.data.pipeline.make_dataset` calls this and adds what every
        source shares (skipping undecodable elements, caching, shuffling decoded
        elements, batching, prefetching). Arguments as :meth:`SplitPlan.to_dataset`.

        Returns:
            ``(tf.data.Dataset, int)``: elements ``(x, y int32)``, ``x`` uint8
            ``[S, S, 3]`` (or a dict of such images), shuffled when ``training`` and
            not ``cache``; and the number of elements.
        """
        return self.plan(_check_split(split)).to_dataset(
            self, split, image_size, training, seed=seed, on_bad_image=on_bad_image, cache=cache,
            validate=validate, shuffle_buffer=shuffle_buffer, progress=progress)

    def example_bytes(self, split, image_size) -> int | None:
        """Bytes of one decoded example of ``split``; None if it already lives in memory
        (or the source reads itself without a plan and cannot tell)."""
        plan = self._plan_or_none(split)
        return None if plan is None else plan.example_bytes(image_size)

    def prepare_reader(self, split):
        """``(records, labels, load)`` of ``split`` for ``histokd data prepare``.

        ``load(i)`` returns record ``i`` as RGB uint8 ``[H, W, 3]`` or raises
        :class:`~histokd.errors.BadImageError`.
        """
        plan = self.plan(_check_split(split))
        labels, load = plan.prepare_reader(split)
        return plan.records, labels, load

    def stored_image_size(self, split):
        """``[h, w]`` of the first stored image of ``split`` (None if unknown)."""
        plan = self._plan_or_none(split)
        return None if plan is None else plan.stored_image_size()

    def _plan_or_none(self, split):
        # a source that overrides to_dataset need not have a plan
        try:
            return self.plan(_check_split(split))
        except NotImplementedError:
            return None

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


# --------------------------------------------------------------------------- config access
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


# --------------------------------------------------------------------------- shared helpers
def _tqdm(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None if enabled else True, leave=False)


def _bounded_map(fn, items, workers, window):
    """Ordered ``map`` on a thread pool with at most ``window`` tasks in flight."""
    if workers <= 1:
        for it in items:
            yield fn(it)
        return
    with cf.ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for it in items:
            pending.append(pool.submit(fn, it))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
