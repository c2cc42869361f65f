"""Images listed in a CSV manifest, validated on load (``data.source: manifest``)."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from histokd.data.sources.files import FileSource
from histokd.data.sources.base import (SPLITS, _SPLIT_ALIASES, Record, Source, _check_fractions, _check_split, _get,
                                       _need_path, stratified_split)
from histokd.errors import DataError
from histokd.registry import SOURCES

_MAX_LISTED = 10


@SOURCES.register("manifest")
class ManifestSource(FileSource):
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

    @classmethod
    def from_config(cls, data_cfg) -> "ManifestSource":
        """Build from a ``data`` section: ``path``, ``classes``, ``val_fraction``, ``test_fraction``, ``seed``."""
        return cls(_need_path(data_cfg, "manifest"), classes=_get(data_cfg, "classes"),
                   val_fraction=_get(data_cfg, "val_fraction", 0.2),
                   test_fraction=_get(data_cfg, "test_fraction", 0.0), seed=_get(data_cfg, "seed", 0))
