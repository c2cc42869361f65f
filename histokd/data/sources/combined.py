"""Train/val from one source, test from another (an external cohort)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from histokd.data.sources.base import SPLITS, Source, _check_split
from histokd.errors import DataError


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
        return self.test_source.external_plan(self.records("test"), self.label_map)

    def labels(self, split):
        if split != "test":
            return self.main.labels(split)
        return np.concatenate([self.label_map[self.test_source.labels(s)] for s in self.test_source.splits] or
                              [np.zeros((0,), np.int64)])

    def class_counts(self, split):
        return np.bincount(self.labels(split), minlength=self.num_classes).tolist()

    def describe(self):
        return {"type": "combined", "main": self.main.describe(), "test": self.test_source.describe()}
