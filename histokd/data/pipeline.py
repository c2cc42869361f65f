"""tf.data input pipelines: a source split → batches of ``(uint8 images, int32 labels)``.

:func:`make_dataset` reads any :class:`~histokd.data.sources.Source`: the source reads
its own split (:meth:`~histokd.data.sources.Source.to_dataset`: decoded, unbatched
``(x, y)`` elements, shuffled before decoding where that is cheap) and this module adds
what every source shares: dropping undecodable elements (``on_bad_image="skip"``),
caching decoded elements, shuffling them after the cache, batching and prefetching.
How each kind of storage is read is described with its source:

* **arrays** (MedMNIST, synthetic; :mod:`histokd.data.sources.arrays`): held once in
  memory; shuffling shuffles indices, images are gathered per element; never cached.
* **files** (folder, manifest; :mod:`histokd.data.sources.files`): checked once, then
  PNG, JPEG, BMP and GIF decoded in graph, TIFF through the numpy decoder. For real
  training, convert once with ``histokd data prepare SRC OUT`` and train on the TFRecords.
* **tfrecord** (``histokd data prepare`` output; :mod:`histokd.data.sources.tfrecord`):
  parsed and PNG-decoded in graph.
* **mask_pairs** (``histokd masks`` output; :mod:`histokd.data.sources.mask_pairs`):
  ``x`` is ``{"image", "mask"}`` (or ``{"mask"}``), the mask resized with nearest
  neighbour so its type ids stay exact.

Both decoders apply the same rules (16-bit → ``round(x/257)``, grey → RGB,
alpha composited on white), so a folder read directly and its prepared TFRecords
give the same pixels (up to resizing, which ``prepare`` does with OpenCV's area
filter and the pipeline with TensorFlow's antialiased bilinear filter).

Bad images (``on_bad_image``): with ``"error"`` a bad file raises
:class:`BadImageError` when the split is checked; with ``"skip"`` bad files are
dropped, listed in ``source.skipped`` and a warning gives their number. A file that
passes the header check but fails to decode later is dropped by ``ignore_errors`` in
``skip`` mode and stops iteration in ``error`` mode. ``validate`` (``auto``, ``full``,
``header``) chooses how thoroughly files are checked (see
:func:`histokd.data.sources.check_files`). (The same checks run in ``prepare``, which
always decodes fully.)

Example:
    >>> from histokd.data import SyntheticSource, make_dataset
    >>> ds = make_dataset(SyntheticSource(8, 32), "train", 32, batch_size=4, training=True)
    >>> x, y = next(iter(ds))
    >>> x.shape, x.dtype, y.dtype
    (TensorShape([4, 32, 32, 3]), tf.uint8, tf.int32)
"""

from __future__ import annotations

import warnings

from histokd.data.decode import _composite_on_white, decode_image_tf, resize_tf, to_rgb_tf  # noqa: F401 (re-exported)
from histokd.data.sources import SPLITS, Source
from histokd.data.sources.files import _FULL_CHECK_LIMIT, _tf_can_decode, check_files  # noqa: F401 (re-exported)
from histokd.data.sources.mask_pairs import (_check_mask_shard, _parse_pair, check_mask_pairs,  # noqa: F401
                                             resize_mask_tf)
from histokd.errors import BadImageError, DataError

_SHUFFLE_BYTES = 512 * 2**20  # memory budget of a shuffle buffer over decoded images
CACHE_BYTES = 4 * 2**30  # cache="auto" caches a split only if its decoded images fit in this


# --------------------------------------------------------------------------- datasets
def make_dataset(source: Source, split: str, image_size, batch_size: int, training: bool, seed: int = 0,
                 on_bad_image: str = "error", cache=False, repeat: bool = False, drop_remainder=None,
                 validate: str = "auto", shuffle_buffer: int | None = None, progress: bool = True):
    """Build a batched tf.data pipeline over one split of a source.

    Args:
        source: Source. Any source of :mod:`histokd.data.sources`.
        split: str. "train", "val" or "test".
        image_size: int | None. Working size; images of another size are resized
            (antialiased bilinear; non-square images are resized to a square, not
            cropped). None keeps sizes (they must then be equal).
        batch_size: int. Global batch size.
        training: bool. Shuffle (seeded, reshuffled every epoch) and, by default,
            drop the last incomplete batch.
        seed: int. Shuffle seed.
        on_bad_image: "error" | "skip". See the module docstring.
        cache: bool | "auto" | str. Cache decoded images in memory (True), in memory
            only if the decoded split fits in ``CACHE_BYTES`` (4 GiB; "auto"), or in a
            file (any other str). Ignored for array sources (already in memory).
            ``True`` on a split larger than ``CACHE_BYTES`` warns (NCT-CRC-HE-100K at
            224 px is ~15 GB decoded).
        repeat: bool. Repeat forever.
        drop_remainder: bool | None. Defaults to ``training``.
        validate: "auto" | "full" | "header". File check before reading (file sources).
        shuffle_buffer: int | None. Shuffle buffer for TFRecords / cached images
            (default: all of the split if it fits in ~512 MB of decoded images).
        progress: bool. Progress bar while checking files.

    Returns:
        ``tf.data.Dataset`` of ``(images uint8 [B, S, S, 3], labels int32 [B])``,
        prefetched. For a :class:`~histokd.data.sources.MaskPairSource` the images are
        a dict ``{"image": uint8 [B, S, S, 3], "mask": uint8 [B, S, S, 3]}`` (only
        ``"mask"`` with ``input="mask"``); masks are resized with nearest neighbour.

    Raises:
        DataError: empty split, batch larger than the split with ``drop_remainder``.
        BadImageError: a bad file with ``on_bad_image="error"``.

    Example:
        >>> ds = make_dataset(FolderSource("tiles/"), "val", 224, 64, training=False)  # doctest: +SKIP
    """
    import tensorflow as tf

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"data.on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    drop = bool(training) if drop_remainder is None else bool(drop_remainder)
    n = source.num_examples(split)
    if n == 0:
        raise DataError(f"split {split!r} of {source!r} is empty; non-empty splits: {source.splits}. "
                        "Set data.val_fraction / data.test_fraction (or data.test_path) to create it")
    autotune = tf.data.AUTOTUNE
    size = None if image_size is None else int(image_size)
    px_bytes = source.example_bytes(split, size)  # None: the split already lives in memory
    if px_bytes is None:
        cache = False
    elif cache in (True, "auto"):
        need = n * px_bytes
        if cache == "auto":
            cache = need <= CACHE_BYTES
        elif need > CACHE_BYTES:
            warnings.warn(f"caching split {split!r} in memory needs ~{need / 2**30:.1f} GiB of decoded images; "
                          "use cache='auto', cache=False or a cache file path if memory is short", stacklevel=2)
    ds, count = source.to_dataset(split, size, training, seed=seed, on_bad_image=on_bad_image, cache=bool(cache),
                                  validate=validate, shuffle_buffer=shuffle_buffer, progress=progress)
    if px_bytes is not None:
        if on_bad_image == "skip":
            ds = ds.ignore_errors(log_warning=True)
        if cache:
            ds = ds.cache(cache) if isinstance(cache, str) else ds.cache()
            if training:
                buf = shuffle_buffer or int(max(1024, min(count, _SHUFFLE_BYTES // px_bytes)))
                ds = ds.shuffle(min(buf, max(count, 1)), seed=seed, reshuffle_each_iteration=True)

    if drop and count < batch_size:
        raise DataError(f"split {split!r} has {count} examples, fewer than one batch of {batch_size}; "
                        "lower the batch size (e.g. `--set train.batch_size=...`) or use more data")
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop, num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def dataset_info(source: Source) -> dict:
    """Small JSON-able summary of a source (for ``histokd data info``).

    Returns:
        dict with ``source`` (description), ``kind``, ``class_names``, ``splits``
        (per split: ``count`` and ``class_counts``), ``image_size`` ([h, w] of the
        arrays / prepared tiles / first file, or None) and ``skipped``.

    Example:
        >>> dataset_info(SyntheticSource(4, 32))["splits"]["train"]["count"]  # doctest: +SKIP
        8
    """
    splits = {}
    for s in SPLITS:
        n = source.num_examples(s)
        splits[s] = {"count": int(n), "class_counts": [int(v) for v in source.class_counts(s)] if n else
                     [0] * source.num_classes}
    image_size = None
    try:
        for s in source.splits:
            image_size = source.stored_image_size(s)
            break
    except BadImageError:
        image_size = None
    return {"source": source.describe(), "kind": source.kind, "class_names": list(source.class_names),
            "num_classes": source.num_classes, "splits": splits, "image_size": image_size,
            "skipped": list(source.skipped)}


def format_dataset_info(info: dict) -> str:
    """Render :func:`dataset_info` as a plain-text table."""
    names = info["class_names"]
    width = max([len(c) for c in names] + [5])
    lines = [f"source: {info['source'].get('type')} ({info['kind']})",
             f"image size: {info['image_size']}", f"classes: {len(names)}",
             f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in SPLITS)]
    for i, c in enumerate(names):
        lines.append(f"{c:<{width}}  " + "  ".join(f"{info['splits'][s]['class_counts'][i]:>7}" for s in SPLITS))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{info['splits'][s]['count']:>7}" for s in SPLITS))
    if info.get("skipped"):
        lines.append(f"skipped undecodable images: {len(info['skipped'])}")
    return "\n".join(lines)
