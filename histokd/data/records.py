"""Convert any source into sharded TFRecords (``histokd data prepare``).

Training should never decode TIFF (or 16-bit, or RGBA) images in Python:
:func:`prepare` decodes every image once with the rules of
:mod:`histokd.data.decode`, optionally resizes it, and stores it as a lossless
8-bit RGB PNG inside TFRecord shards that tf.data decodes in graph with
``tf.io.decode_png``.

Output directory::

    {split}-{i:05d}-of-{n:05d}.tfrecord   features: image (PNG bytes), label (int64),
                                          height, width (int64), slide_id, patient_id,
                                          source_path (bytes), mpp (float, -1 = unknown)
    records.csv                           split, shard, position, label, class_name,
                                          slide_id, patient_id, mpp, source_path
    dataset.json                          class names, counts, image size, skipped files,
                                          source description, histokd version

Each shard is written under a temporary name and renamed when complete, and
``dataset.json`` is written last: an interrupted ``prepare`` never leaves a
directory that looks complete (:class:`~histokd.data.sources.TFRecordSource`
refuses a directory without ``dataset.json``).

Example:
    >>> from histokd.data import SyntheticSource, prepare
    >>> summary = prepare(SyntheticSource(8, 32), "/tmp/demo_records", progress=False)  # doctest: +SKIP
    >>> summary["counts"]                                                               # doctest: +SKIP
    {'train': 16, 'val': 8, 'test': 8}
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
import time
from pathlib import Path

import cv2
import numpy as np

from histokd.data.decode import decode_image_bytes, decode_image_file, quiet_opencv  # noqa: F401 (re-exported)
from histokd.data.sources import SPLITS, Source, source_from_path
from histokd.data.sources.base import _bounded_map, _tqdm  # noqa: F401 (re-exported)
from histokd.data.sources.tfrecord import parse_example  # noqa: F401 (re-exported)
from histokd.errors import BadImageError, DataError

SHARD_PATTERN = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.tfrecord$")
FORMAT_VERSION = 1
_BAD_HINT = "re-run with `--set data.on_bad_image=skip` (or on_bad_image='skip') to skip and list bad images"


def resize_image(img: np.ndarray, size) -> np.ndarray:
    """Resize an RGB uint8 image to ``size`` (int or (h, w)).

    Area interpolation when shrinking (anti-aliased, as a microscope at lower
    magnification), bilinear when enlarging; unchanged if already that size.
    """
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if img.shape[0] == h and img.shape[1] == w:
        return img
    shrink = h <= img.shape[0] and w <= img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
    """RGB uint8 → PNG bytes (lossless).

    Huffman-only deflate: on H&E tiles it is ~2x faster than zlib's default and
    ~10 % smaller (tissue texture defeats LZ77 matching anyway).
    """
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression),
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]), params)
    if not ok:  # pragma: no cover - cv2 only fails on invalid arrays
        raise DataError(f"could not PNG-encode an image of shape {img.shape}")
    return buf.tobytes()


def _example(tf, png: bytes, h: int, w: int, label: int, rec) -> bytes:
    b = lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))  # noqa: E731
    i = lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))  # noqa: E731
    feats = {
        "image": b(png),
        "label": i(label),
        "height": i(h),
        "width": i(w),
        "slide_id": b((rec.slide_id or "").encode()),
        "patient_id": b((rec.patient_id or "").encode()),
        "source_path": b((rec.path or "").encode()),
        "mpp": tf.train.Feature(float_list=tf.train.FloatList(value=[rec.mpp if rec.mpp else -1.0])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _write_json(path: Path, obj):
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _clear(out: Path):
    """Remove what a previous prepare left (dataset.json first: the directory stops looking complete)."""
    for name in ("dataset.json", "records.csv"):
        (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if SHARD_PATTERN.match(p.name) or (p.name.startswith(".") and p.name.endswith(".partial")):
            p.unlink()


def prepare(source: Source, out_dir, image_size=None, shard_size: int = 1024, on_bad_image: str = "error",
            progress: bool = True, num_workers: int | None = None, png_compression: int = 1) -> dict:
    """Write a source as sharded TFRecords of lossless PNG tiles.

    Args:
        source: Source. Any source (folder, manifest, MedMNIST, synthetic, combined).
        out_dir: str. Output directory (created; earlier shards there are replaced).
        image_size: int | (h, w) | None. Resize every image (area interpolation when
            shrinking); None keeps each image's size.
        shard_size: int. Examples per shard.
        on_bad_image: "error" | "skip". An undecodable file raises
            :class:`BadImageError` naming it, or is skipped — counted, listed in
            ``dataset.json`` and in the returned summary.
        progress: bool. Show a tqdm progress bar.
        num_workers: int | None. Decoding threads (default: CPU count).
        png_compression: int. zlib level 0-9 of the stored PNGs.

    Returns:
        Summary dict: ``out_dir``, ``counts`` per split, ``num_skipped``, ``skipped``
        (list of ``{"path", "split", "error"}``), ``shards`` per split,
        ``image_size``, ``seconds``.

    Raises:
        BadImageError: with ``on_bad_image="error"``, on the first bad image.
        DataError: the source is empty or already a TFRecord source.

    Example:
        >>> prepare(FolderSource("NCT-CRC-HE-100K"), "records/", image_size=224)  # doctest: +SKIP
    """
    import tensorflow as tf

    if on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    if int(shard_size) < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    t0 = time.time()
    splits = source.splits
    if not splits:
        raise DataError(f"{source!r} has no examples to prepare")
    # each source says how its images are read; one that cannot be prepared (already
    # TFRecords, mask pairs) refuses here, before anything is written
    readers = {split: source.prepare_reader(split) for split in splits}
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    workers = int(num_workers or os.cpu_count() or 1)
    total = sum(source.num_examples(s) for s in splits)
    counts, shards_by_split, skipped, sizes = {}, {}, [], set()
    class_counts = {}
    rows = []
    bar = _tqdm(total, "prepare", progress)
    try:
        for split in splits:
            recs, labels, load = readers[split]
            n = len(recs)
            nshards = max(1, math.ceil(n / int(shard_size)))
            names = [f"{split}-{i:05d}-of-{nshards:05d}.tfrecord" for i in range(nshards)]

            def work(i, _load=load):
                try:
                    img = _load(i)
                except BadImageError as exc:
                    return i, None, None, str(exc)
                if image_size:
                    img = resize_image(img, image_size)
                return i, img.shape[:2], encode_png(img, png_compression), None

            written = 0
            cc = np.zeros(source.num_classes, np.int64)
            writer, shard_idx, in_shard, tmp = None, -1, 0, None
            with quiet_opencv():
                for i, hw, png, err in _bounded_map(work, range(n), workers, 8 * workers):
                    bar.update(1)
                    rec = recs[i]
                    if err is not None:
                        if on_bad_image == "error":
                            raise BadImageError(f"{err.split('; ')[0]} (split {split!r}); {_BAD_HINT}")
                        skipped.append({"path": rec.path, "split": split, "error": err.split("; ")[0]})
                        continue
                    target = min(i // int(shard_size), nshards - 1)
                    if target != shard_idx:
                        if writer is not None:
                            writer.close()
                            os.replace(tmp, out / names[shard_idx])
                        shard_idx = target
                        tmp = out / f".{names[shard_idx]}.partial"
                        writer = tf.io.TFRecordWriter(str(tmp))
                        in_shard = 0
                    writer.write(_example(tf, png, hw[0], hw[1], labels[i], rec))
                    rows.append([split, names[shard_idx], in_shard, labels[i], source.class_names[labels[i]],
                                 rec.slide_id, rec.patient_id, "" if rec.mpp is None else rec.mpp, rec.path or ""])
                    in_shard += 1
                    written += 1
                    cc[labels[i]] += 1
                    sizes.add(tuple(int(v) for v in hw))
            if writer is not None:
                writer.close()
                os.replace(tmp, out / names[shard_idx])
            # shards that received no example (all their images were skipped) are still written
            for j in range(nshards):
                if not (out / names[j]).exists():
                    with tf.io.TFRecordWriter(str(out / f".{names[j]}.partial")):
                        pass
                    os.replace(out / f".{names[j]}.partial", out / names[j])
            counts[split] = written
            class_counts[split] = cc.tolist()
            shards_by_split[split] = names
    except BaseException:
        for p in out.glob(".*.partial"):
            p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    with open(out / ".records.csv.partial", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "shard", "position", "label", "class_name", "slide_id", "patient_id", "mpp",
                    "source_path"])
        w.writerows(rows)
    os.replace(out / ".records.csv.partial", out / "records.csv")
    from histokd._version import __version__

    size = [int(v) for v in next(iter(sizes))] if len(sizes) == 1 else None
    meta = {
        "format": "histokd-tfrecord",
        "format_version": FORMAT_VERSION,
        "histokd_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(source.class_names),
        "counts": {s: counts.get(s, 0) for s in SPLITS},
        "class_counts": class_counts,
        "image_size": size,
        "image_sizes_vary": len(sizes) > 1,
        "shards": shards_by_split,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "source": source.describe(),
        "features": {"image": "PNG bytes, 8-bit RGB", "label": "int64", "height": "int64", "width": "int64",
                     "slide_id": "bytes", "patient_id": "bytes", "source_path": "bytes",
                     "mpp": "float32, -1 if unknown"},
    }
    _write_json(out / "dataset.json", meta)
    return {"out_dir": str(out), "counts": meta["counts"], "num_skipped": len(skipped), "skipped": skipped,
            "shards": shards_by_split, "image_size": size, "seconds": round(time.time() - t0, 2)}


def prepare_cli(src, out, image_size=None, on_bad_image="error", shard_size=1024, val_fraction=0.2,
                test_fraction=None, seed=0, progress=True) -> dict:
    """``histokd data prepare SRC OUT``: auto-detect SRC, prepare, return the summary.

    Args:
        src: str. Image folder, manifest ``.csv``, MedMNIST ``.npz`` or "synthetic".
        out: str. Output directory.
        image_size: int | None. Resize to this size (None keeps sizes).
        on_bad_image: "error" | "skip".
        shard_size: int. Examples per shard.
        val_fraction, test_fraction, seed: split settings where SRC has no splits.
        progress: bool. Progress bar.

    Returns:
        The :func:`prepare` summary.
    """
    source = source_from_path(src, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                              image_size=image_size or 64)
    return prepare(source, out, image_size=image_size, shard_size=shard_size, on_bad_image=on_bad_image,
                   progress=progress)
