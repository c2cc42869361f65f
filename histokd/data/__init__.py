"""Data layer: sources → records/TFRecords → tf.data pipelines.

See :mod:`histokd.data.sources` (folder, manifest CSV, MedMNIST, synthetic,
TFRecord sources), :mod:`histokd.data.synthetic` (the procedural H&E demo set),
:mod:`histokd.data.records` (``histokd data prepare``),
:mod:`histokd.data.pipeline` (tf.data) and :mod:`histokd.data.download`
(``histokd data fetch``). TensorFlow is imported lazily, inside the functions
that need it.
"""

from histokd.data.decode import decode_image_bytes, decode_image_file
from histokd.data.download import available_datasets, fetch
from histokd.data.pipeline import dataset_info, format_dataset_info, make_dataset
from histokd.data.records import prepare, prepare_cli
from histokd.data.sources import (
    CombinedSource,
    FolderSource,
    ManifestSource,
    MaskPairSource,
    MedMNISTSource,
    Record,
    Source,
    SyntheticSource,
    TFRecordSource,
    build_source,
    is_mask_dataset,
    source_from_path,
    stratified_split,
)
from histokd.data.synthetic import make_synthetic_he

__all__ = [
    "Record", "Source", "FolderSource", "ManifestSource", "MedMNISTSource", "SyntheticSource",
    "TFRecordSource", "CombinedSource", "MaskPairSource", "is_mask_dataset", "build_source", "source_from_path", "stratified_split",
    "make_synthetic_he", "prepare", "prepare_cli", "make_dataset", "dataset_info", "format_dataset_info",
    "fetch", "available_datasets", "decode_image_file", "decode_image_bytes",
]
