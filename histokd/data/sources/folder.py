"""Images in one sub-folder per class (``data.source: folder``)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from histokd.data.decode import IMAGE_EXTENSIONS
from histokd.data.sources.files import FileSource
from histokd.data.sources.base import (SPLITS, _SPLIT_ALIASES, Record, Source, _check_fractions, _check_split, _get,
                                       _need_path, stratified_split)
from histokd.errors import DataError
from histokd.registry import SOURCES


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


@SOURCES.register("folder")
class FolderSource(FileSource):
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

    @classmethod
    def from_config(cls, data_cfg) -> "FolderSource":
        """Build from a ``data`` section: ``path``, ``val_fraction``, ``test_fraction``, ``seed``."""
        return cls(_need_path(data_cfg, "folder"), val_fraction=_get(data_cfg, "val_fraction", 0.2),
                   test_fraction=_get(data_cfg, "test_fraction", 0.0), seed=_get(data_cfg, "seed", 0))
