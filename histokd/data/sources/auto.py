"""Guess a source's kind from a path (``data.source: auto``, ``histokd data prepare SRC``)."""

from __future__ import annotations

import json
from pathlib import Path

from histokd.data.sources.base import Source, _get, _need_path
from histokd.data.sources.folder import FolderSource
from histokd.data.sources.manifest import ManifestSource
from histokd.data.sources.mask_pairs import MaskPairSource, is_mask_dataset
from histokd.data.sources.medmnist import MedMNISTSource
from histokd.data.sources.synthetic import SyntheticSource
from histokd.data.sources.tfrecord import TFRecordSource
from histokd.errors import DataError
from histokd.registry import SOURCES


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


@SOURCES.register("auto")
class AutoSource:
    """Registry entry ``auto``: the source :func:`source_from_path` detects at ``data.path``.

    Not a source itself: :meth:`from_config` returns the detected source.
    """

    @classmethod
    def from_config(cls, data_cfg):
        """The source at ``data.path`` (folder, manifest, ``.npz``, prepared or mask folder)."""
        return source_from_path(_need_path(data_cfg, "auto"), val_fraction=_get(data_cfg, "val_fraction", 0.2),
                                test_fraction=_get(data_cfg, "test_fraction", 0.0), seed=_get(data_cfg, "seed", 0),
                                image_size=_get(data_cfg, "image_size", 64))

    @classmethod
    def validate(cls, cfg):
        """The rules of :meth:`Source.validate` (``data.path`` is needed: the kind is read off it)."""
        Source.validate(cfg)
