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
of a run configuration (a :data:`histokd.registry.SOURCES` look-up); :func:`source_from_path`
guesses the kind from a path.

One module per source (``folder``, ``manifest``, ``medmnist``, ``synthetic``, ``tfrecord``,
``mask_pairs``, ``combined``, ``auto``) on the shared base (:mod:`.base`: records, split plans,
the read protocol); each registered source reads itself (:meth:`Source.to_dataset`) and
validates the run configurations it is given (:meth:`Source.validate`).

Example:
    >>> from histokd.data.sources import SyntheticSource
    >>> src = SyntheticSource(n_per_class=8, image_size=32)
    >>> src.class_names, src.num_examples("train")
    (['tumour', 'stroma', 'lymphocytes', 'adipose'], 16)
"""

from __future__ import annotations

from types import SimpleNamespace

from histokd.data.sources.arrays import ArrayPlan, ArraySource, array_to_rgb_uint8
from histokd.data.sources.auto import AutoSource, _has_tissue, source_from_path
from histokd.data.sources.base import (SPLITS, _SPLIT_ALIASES, Record, Source, SplitPlan, _bounded_map,
                                       _check_fractions, _check_split, _get, _need_path, _portion, _tqdm,
                                       stratified_split)
from histokd.data.sources.combined import CombinedSource
from histokd.data.sources.files import FilePlan, FileSource, _tf_can_decode, check_files
from histokd.data.sources.folder import FolderSource, _find_images, _is_hidden, _subdirs
from histokd.data.sources.manifest import _MAX_LISTED, ManifestSource
from histokd.data.sources.mask_pairs import (_FINGERPRINT_BUCKETS, _MASK_SHARD, MASK_PAIR_INPUTS, MASK_PAIR_LABELS,
                                             MaskPairPlan, MaskPairSource, check_mask_pairs, is_mask_dataset,
                                             path_fingerprints, resize_mask_tf)
from histokd.data.sources.medmnist import MEDMNIST_LABELS, MedMNISTSource
from histokd.data.sources.synthetic import SyntheticSource
from histokd.data.sources.tfrecord import TFRecordPlan, TFRecordSource, parse_example
from histokd.registry import SOURCES

#: Former name of :data:`histokd.registry.SOURCES`.
DATASETS = SOURCES


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
        return SOURCES.get(kind).from_config(data_cfg)
    fields = ("source", "path", "val_fraction", "seed", "synthetic_per_class", "synthetic_classes",
              "image_size", "classes", "label", "input")
    shim = SimpleNamespace(**{f: _get(data_cfg, f) for f in fields})
    shim.test_fraction = 0.0
    main = SOURCES.get(kind).from_config(shim)
    seed, size = _get(data_cfg, "seed", 0), _get(data_cfg, "image_size", 64)
    test = main.external_test_source(test_path, seed=seed, image_size=size)
    if test is None:  # the default: whatever source the path holds
        import warnings

        with warnings.catch_warnings():  # an external test set may well hold a single class
            warnings.filterwarnings("ignore", message=".*single class folder")
            test = source_from_path(test_path, val_fraction=0.0, test_fraction=0.0, seed=seed, image_size=size)
    return CombinedSource(main, test)


__all__ = [
    "SPLITS", "Record", "SplitPlan", "Source", "stratified_split", "array_to_rgb_uint8",
    "ArrayPlan", "FilePlan", "FileSource", "TFRecordPlan", "MaskPairPlan", "check_files", "check_mask_pairs",
    "ArraySource", "FolderSource", "ManifestSource", "MedMNISTSource", "SyntheticSource", "TFRecordSource",
    "MaskPairSource", "CombinedSource", "AutoSource", "MEDMNIST_LABELS", "MASK_PAIR_LABELS", "MASK_PAIR_INPUTS",
    "is_mask_dataset", "path_fingerprints", "parse_example", "resize_mask_tf", "source_from_path", "build_source",
]
