"""tf.data input pipelines: a source split → batches of ``(uint8 images, int32 labels)``.

:func:`make_dataset` reads any :class:`~histokd.data.sources.Source`:

* **arrays** (MedMNIST, synthetic): the arrays are held once in memory; shuffling
  shuffles indices, images are gathered per element.
* **files** (folder, manifest): PNG, JPEG, BMP and GIF are decoded in graph
  (``tf.io.decode_png`` / ``tf.io.decode_image``); TIFF and anything TensorFlow
  cannot read fall back to the numpy decoder of :mod:`histokd.data.decode` via
  ``tf.numpy_function``, which holds the GIL and is slow. For real training,
  convert once with ``histokd data prepare SRC OUT`` and train on the TFRecords.
* **tfrecord** (``histokd data prepare`` output): parsed and PNG-decoded in graph.
* **mask_pairs** (``histokd masks`` output, :class:`~histokd.data.sources.MaskPairSource`):
  image/mask pairs parsed in graph; a split's examples are picked out of the shards
  by the fingerprint of their ``path`` feature before any PNG is decoded; ``x`` is
  ``{"image", "mask"}`` (or ``{"mask"}``), the mask resized with nearest neighbour
  so its type ids stay exact. Shards are checked like files (``validate``: every
  record decoded up to 2 000 examples, else the first record of each shard).

Both decoders apply the same rules (16-bit → ``round(x/257)``, grey → RGB,
alpha composited on white), so a folder read directly and its prepared TFRecords
give the same pixels (up to resizing, which ``prepare`` does with OpenCV's area
filter and the pipeline with TensorFlow's antialiased bilinear filter).

Bad images (``on_bad_image``): before building a file pipeline every file is
checked once (tqdm bar) and the result is cached on the source. ``validate="full"``
decodes every file (catches any corruption; ~1-3 ms per 224 px TIFF);
``validate="header"`` only checks the file signature and, for PNG/JPEG, the
end-of-file marker (catches truncated downloads, fast enough for 100 000 files);
``"auto"`` (default) is ``full`` up to 2 000 files and ``header`` above. With
``on_bad_image="error"`` a bad file raises :class:`BadImageError` right away; with
``"skip"`` bad files are dropped, listed in ``source.skipped`` and a warning gives
their number. A file that passes the header check but fails to decode later is
dropped by ``ignore_errors`` in ``skip`` mode and stops iteration in ``error``
mode. (The same checks run in ``prepare``, which always decodes fully.)

Example:
    >>> from histokd.data import SyntheticSource, make_dataset
    >>> ds = make_dataset(SyntheticSource(8, 32), "train", 32, batch_size=4, training=True)
    >>> x, y = next(iter(ds))
    >>> x.shape, x.dtype, y.dtype
    (TensorShape([4, 32, 32, 3]), tf.uint8, tf.int32)
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from histokd.data.decode import _HINT, check_image_header, decode_image_file
from histokd.data.records import _bounded_map, _tqdm, parse_example
from histokd.data.sources import SPLITS, Source
from histokd.errors import BadImageError, DataError

_FULL_CHECK_LIMIT = 2000
_SHUFFLE_BYTES = 512 * 2**20  # memory budget of a shuffle buffer over decoded images
CACHE_BYTES = 4 * 2**30  # cache="auto" caches a split only if its decoded images fit in this


# --------------------------------------------------------------------------- graph decoding
def _composite_on_white(tf, colour, alpha):
    c = tf.cast(colour, tf.int32)
    a = tf.cast(alpha, tf.int32)
    return tf.cast((c * a + 255 * (255 - a) + 127) // 255, tf.uint8)


def to_rgb_tf(img):
    """``[H, W, C]`` uint8 with C in 1..4 → ``[H, W, 3]`` (grey repeated, alpha on white)."""
    import tensorflow as tf

    c = tf.shape(img)[-1]
    branches = [
        lambda: tf.repeat(img[..., :1], 3, axis=-1),
        lambda: tf.repeat(_composite_on_white(tf, img[..., :1], img[..., 1:2]), 3, axis=-1),
        lambda: img[..., :3],
        lambda: _composite_on_white(tf, img[..., :3], img[..., 3:4]),
    ]
    out = tf.switch_case(tf.clip_by_value(c - 1, 0, 3), branches)
    out.set_shape([None, None, 3])
    return out


def decode_image_tf(data):
    """Decode PNG (8/16-bit), JPEG, BMP or GIF bytes in graph → uint8 ``[H, W, 3]``.

    16-bit PNG samples become ``round(x / 257)``; 8-bit PNGs are read as 16-bit too
    (libpng expands ``v`` to ``v * 257``) so one exact formula covers both. JPEGs
    use the accurate integer IDCT, which matches OpenCV bit for bit.
    Animated GIFs give their first frame (GIF transparency is ignored, unlike the
    numpy decoder).
    """
    import tensorflow as tf

    head = tf.strings.substr(data, 0, 8)
    kind = tf.where(tf.equal(head, b"\x89PNG\r\n\x1a\n"), 0,
                    tf.where(tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"), 1, 2))

    def png():
        x = tf.io.decode_png(data, channels=0, dtype=tf.uint16)
        return tf.cast((tf.cast(x, tf.int32) + 128) // 257, tf.uint8)

    def jpeg():
        # ISLOW IDCT + fancy upsampling: bit-identical to OpenCV's (libjpeg-turbo) decoder
        return tf.io.decode_jpeg(data, channels=0, dct_method="INTEGER_ACCURATE")

    def other():
        return tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)

    img = tf.switch_case(kind, [png, jpeg, other])
    return to_rgb_tf(img)


def resize_tf(img, image_size):
    """Resize ``[H, W, 3]`` uint8 to ``image_size`` (antialiased bilinear), skipped if equal."""
    import tensorflow as tf

    if image_size is None:
        return img
    size = int(image_size)
    h, w = tf.shape(img)[0], tf.shape(img)[1]

    def do():
        r = tf.image.resize(tf.cast(img, tf.float32), [size, size], method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(r), 0.0, 255.0), tf.uint8)

    out = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: img, do)
    out.set_shape([size, size, 3])
    return out


# --------------------------------------------------------------------------- file checks
def _tf_can_decode(path, fmt):
    """Whether the in-graph decoder handles this file (else numpy fallback)."""
    if fmt in ("png", "jpeg", "gif"):
        return True
    if fmt == "bmp":  # TensorFlow reads uncompressed 24/32-bit BMP only
        try:
            with open(path, "rb") as f:
                head = f.read(34)
            bits = int.from_bytes(head[28:30], "little")
            compression = int.from_bytes(head[30:34], "little")
            return bits in (24, 32) and compression == 0
        except OSError:
            return False
    return False


def check_files(source: Source, split: str, records, on_bad_image="error", validate="auto", progress=True):
    """Check the image files of a split once; returns ``(good_records, uses_tf_decoder)``.

    Results are cached on the source (``source._file_checks``), so each file is
    checked once per source object. See the module docstring for ``validate``.

    Raises:
        BadImageError: a file is bad and ``on_bad_image="error"``.
    """
    if validate not in ("auto", "full", "header"):
        raise DataError(f"validate must be 'auto', 'full' or 'header', got {validate!r}")
    mode = validate
    if mode == "auto":
        mode = "full" if len(records) <= _FULL_CHECK_LIMIT else "header"
    cache = source.__dict__.setdefault("_file_checks", {})

    def check(rec):
        key = (rec.path, mode)
        if key in cache:
            return cache[key]
        try:
            fmt = check_image_header(rec.path)
            if mode == "full":
                decode_image_file(rec.path)
            result = (_tf_can_decode(rec.path, fmt), None)
        except BadImageError as exc:
            result = (False, str(exc).split("; ")[0])
        cache[key] = result
        return result

    todo = [r for r in records if (r.path, mode) not in cache]
    if todo:
        from histokd.data.decode import quiet_opencv

        bar = _tqdm(len(todo), f"checking {split} images ({mode})", progress)
        workers = min(16, 2 * (os.cpu_count() or 1))
        with quiet_opencv():
            for _ in _bounded_map(check, todo, workers, 8 * workers):
                bar.update(1)
        bar.close()
    good, use_tf, bad = [], [], []
    for r in records:
        ok_tf, err = cache[(r.path, mode)]
        if err is None:
            good.append(r)
            use_tf.append(ok_tf)
        else:
            bad.append((r, err))
    if bad:
        if on_bad_image == "error":
            more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
            raise BadImageError(f"{bad[0][1]}{more} in split {split!r}; {_HINT}")
        known = {(d["path"], d["split"]) for d in source.skipped}
        new = [{"path": r.path, "split": split, "error": e} for r, e in bad if (r.path, split) not in known]
        source.skipped.extend(new)
        warnings.warn(f"skipped {len(bad)} undecodable image(s) of {len(records)} in split {split!r} "
                      f"(data.on_bad_image=skip); they are listed in source.skipped", stacklevel=3)
    return good, use_tf


# --------------------------------------------------------------------------- mask-pair checks
def _check_mask_shard(shard: str, mode: str, expected: list):
    """Read one ``histokd masks`` shard: ``(n_readable, bad [(path, error)], seen_paths, corruption)``."""
    import cv2
    import tensorflow as tf

    n, bad, seen, corrupt = 0, [], [], None
    try:
        for raw in tf.data.TFRecordDataset(shard):
            n += 1
            try:
                feats = tf.train.Example.FromString(raw.numpy()).features.feature
                path = feats["path"].bytes_list.value[0].decode("utf-8")
            except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt record
                bad.append((f"{os.path.basename(shard)}#{n - 1}", f"unparsable record ({exc})"))
                seen.append(None)
                continue
            seen.append(path)
            for key in ("image_png", "mask_png"):
                data = feats[key].bytes_list.value[0] if key in feats else b""
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
                if img is None:
                    bad.append((path, f"the {key[:-4]} PNG of {path!r} in {os.path.basename(shard)} cannot be "
                                      "decoded"))
                    break
            if mode == "header":
                break
    except tf.errors.OpError as exc:
        corrupt = f"{os.path.basename(shard)} is truncated or corrupt after {n} record(s) ({type(exc).__name__})"
    return n, bad, seen, corrupt


def check_mask_pairs(source: Source, split: str, plan, on_bad_image="error", validate="auto", progress=True):
    """Check the shards of a mask-pair split once; returns ``(good_records, {shard: records_to_read})``.

    ``validate="full"`` reads every record of the split's shards and decodes both
    PNGs; ``"header"`` reads the first record of each shard only; ``"auto"`` is
    ``full`` up to 2 000 examples and ``header`` above (as for image files). Both
    check that a shard holds the examples its CSV lists, in order. Results are
    cached on the :class:`~histokd.data.sources.MaskPairSource`.

    Raises:
        BadImageError: an undecodable example or a truncated shard with ``on_bad_image="error"``.
        DataError: a shard does not match its CSV (the folder was edited).
    """
    if validate not in ("auto", "full", "header"):
        raise DataError(f"validate must be 'auto', 'full' or 'header', got {validate!r}")
    pairs = plan.pairs
    shards = list(plan.shards)
    total = sum(len(pairs.shard_rows(s)) for s in shards)
    mode = validate if validate != "auto" else ("full" if total <= _FULL_CHECK_LIMIT else "header")
    cache = pairs.__dict__.setdefault("_shard_checks", {})
    todo = [s for s in shards if (s, mode) not in cache and (s, "full") not in cache]
    if todo:
        bar = _tqdm(len(todo), f"checking {split} mask shards ({mode})", progress)
        for shard in todo:
            expected = pairs.shard_rows(shard)
            n, bad, seen, corrupt = _check_mask_shard(shard, mode, expected)
            differ = [(s, w) for s, w in zip(seen, expected) if s is not None and s != w]
            if differ or len(seen) > len(expected) or (mode == "full" and corrupt is None and n != len(expected)):
                raise DataError(f"{shard} does not hold the examples its CSV {os.path.basename(shard)[:-9]}.csv "
                                f"lists ({n} record(s) read, {len(expected)} listed"
                                f"{f', first differing: {differ[0][0]!r} vs {differ[0][1]!r}' if differ else ''}); "
                                "the folder was edited: rebuild it with `histokd masks`")
            cache[(shard, mode)] = (n if corrupt else -1, bad, corrupt)
            bar.update(1)
        bar.close()
    members = {r.path for r in plan.records}
    take, bad_paths, problems = {}, {}, []
    for shard in shards:
        n, bad, corrupt = cache.get((shard, "full")) or cache[(shard, mode)]
        take[shard] = n
        for path, err in bad:
            if path in members:
                bad_paths[path] = err
                problems.append(err)
        if corrupt is not None:
            lost = [p for p in pairs.shard_rows(shard)[max(n, 0):] if p in members]
            for p in lost:
                bad_paths.setdefault(p, corrupt)
            if lost:
                problems.append(corrupt)
    if problems:
        if on_bad_image == "error":
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise BadImageError(f"{problems[0]}{more} in split {split!r} of {pairs.directory}; rebuild the mask "
                                f"dataset with `histokd masks`, or {_HINT}")
        known = {(d["path"], d["split"]) for d in source.skipped}
        source.skipped.extend({"path": p, "split": split, "error": e} for p, e in bad_paths.items()
                              if (p, split) not in known)
        warnings.warn(f"skipped {len(bad_paths)} unreadable image/mask pair(s) of {len(plan.records)} in split "
                      f"{split!r} (data.on_bad_image=skip); they are listed in source.skipped", stacklevel=3)
    good = [r for r in plan.records if r.path not in bad_paths]
    return good, take


def _parse_pair(serialized, label_field: str, with_image: bool):
    """Parse one mask-pair example without decoding: (path, label, image PNG, mask PNG)."""
    import tensorflow as tf

    spec = {"path": tf.io.FixedLenFeature([], tf.string),
            "mask_png": tf.io.FixedLenFeature([], tf.string),
            label_field: tf.io.FixedLenFeature([], tf.int64)}
    if with_image:
        spec["image_png"] = tf.io.FixedLenFeature([], tf.string)
    ex = tf.io.parse_single_example(serialized, spec)
    return ex["path"], ex[label_field], ex.get("image_png", tf.constant(b"")), ex["mask_png"]


def resize_mask_tf(mask, image_size):
    """Resize a ``[H, W, 3]`` uint8 mask with nearest neighbour (type ids stay exact), skipped if equal."""
    import tensorflow as tf

    if image_size is None:
        return mask
    size = int(image_size)
    h, w = tf.shape(mask)[0], tf.shape(mask)[1]
    out = tf.cond(tf.logical_and(tf.equal(h, size), tf.equal(w, size)), lambda: mask,
                  lambda: tf.image.resize(mask, [size, size], method="nearest"))
    out.set_shape([size, size, 3])
    return out


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
    plan = source.plan(split)
    autotune = tf.data.AUTOTUNE
    size = None if image_size is None else int(image_size)
    px_bytes = 3 * (size or 224) ** 2
    if plan.kind == "mask_pairs" and plan.pairs.input == "image":
        px_bytes *= 2  # an image and its mask
    if plan.kind != "arrays" and cache in (True, "auto"):
        need = n * px_bytes
        if cache == "auto":
            cache = need <= CACHE_BYTES
        elif need > CACHE_BYTES:
            warnings.warn(f"caching split {split!r} in memory needs ~{need / 2**30:.1f} GiB of decoded images; "
                          "use cache='auto', cache=False or a cache file path if memory is short", stacklevel=2)

    def shuffle_decoded(ds, count):
        buf = shuffle_buffer or int(max(1024, min(count, _SHUFFLE_BYTES // px_bytes)))
        return ds.shuffle(min(buf, max(count, 1)), seed=seed, reshuffle_each_iteration=True)

    def do_cache(ds):
        return ds.cache(cache) if isinstance(cache, str) else ds.cache()

    if plan.kind == "arrays":
        images = tf.constant(plan.images)
        labels = tf.constant(np.asarray(plan.labels, np.int32))
        ds = tf.data.Dataset.range(len(plan.labels))
        if training:
            ds = ds.shuffle(len(plan.labels), seed=seed, reshuffle_each_iteration=True)
        same = size is None or tuple(plan.images.shape[1:3]) == (size, size)

        def take(i):
            img = tf.gather(images, i)
            return (img if same else resize_tf(img, size)), tf.gather(labels, i)

        ds = ds.map(take, num_parallel_calls=autotune)
        count = len(plan.labels)
    elif plan.kind in ("files", "mixed"):
        records, use_tf = check_files(source, split, plan.records, on_bad_image, validate, progress)
        count = len(records)
        if count == 0:
            raise DataError(f"every image of split {split!r} was skipped as undecodable (see source.skipped)")
        paths = [r.path for r in records]
        labels = np.asarray([r.label for r in records], np.int32)
        ds = tf.data.Dataset.from_tensor_slices((paths, labels, np.asarray(use_tf, bool)))
        if training and not cache:
            ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)

        def np_decode(path):
            return decode_image_file(path.decode("utf-8"))

        def load(path, label, in_graph):
            img = tf.cond(in_graph, lambda: decode_image_tf(tf.io.read_file(path)),
                          lambda: tf.numpy_function(np_decode, [path], tf.uint8, stateful=False))
            img.set_shape([None, None, 3])
            return resize_tf(img, size), label

        ds = ds.map(load, num_parallel_calls=autotune)
        if on_bad_image == "skip":
            ds = ds.ignore_errors(log_warning=True)
        if cache:
            ds = do_cache(ds)
            if training:
                ds = shuffle_decoded(ds, count)
    elif plan.kind == "tfrecord":
        files = list(plan.shards)
        count = n
        fds = tf.data.Dataset.from_tensor_slices(files)
        if training and not cache:
            fds = fds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        if training:
            ds = fds.interleave(tf.data.TFRecordDataset, cycle_length=max(1, min(len(files), 8)),
                                num_parallel_calls=autotune, deterministic=True)
        else:  # evaluation keeps the order of records.csv
            ds = tf.data.TFRecordDataset(files, buffer_size=8 << 20)
        if training and not cache:
            # shuffle the still-encoded records: cheap, and shard shuffling adds the rest
            ds = ds.shuffle(shuffle_buffer or min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
        label_map = None if plan.label_map is None else tf.constant(np.asarray(plan.label_map, np.int64))

        def parse(serialized):
            ex = parse_example(serialized)
            label = ex["label"] if label_map is None else tf.gather(label_map, ex["label"])
            return resize_tf(ex["image"], size), tf.cast(label, tf.int32)

        ds = ds.map(parse, num_parallel_calls=autotune)
        if on_bad_image == "skip":
            ds = ds.ignore_errors(log_warning=True)
        if cache:
            ds = do_cache(ds)
            if training:
                ds = shuffle_decoded(ds, count)
    elif plan.kind == "mask_pairs":
        pairs = plan.pairs
        with_image = pairs.input == "image"
        records, take = check_mask_pairs(source, split, plan, on_bad_image, validate, progress)
        count = len(records)
        if count == 0:
            raise DataError(f"every image/mask pair of split {split!r} was skipped as unreadable "
                            "(see source.skipped)")
        keys = tf.constant(np.sort(pairs.fingerprints([r.path for r in records])))
        files = [f for f in plan.shards if take.get(f, -1) != 0]
        fds = tf.data.Dataset.from_tensor_slices((files, np.asarray([take.get(f, -1) for f in files], np.int64)))
        if training and not cache:
            fds = fds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

        def read(f, n):
            return tf.data.TFRecordDataset(f).take(n)

        if training:
            ds = fds.interleave(read, cycle_length=max(1, min(len(files), 8)), num_parallel_calls=autotune,
                                deterministic=True)
        else:  # evaluation keeps the order of the shards' CSVs
            ds = fds.flat_map(read)
        label_field = pairs.label_field
        ds = ds.map(lambda s: _parse_pair(s, label_field, with_image), num_parallel_calls=autotune)

        def in_split(path, label, image_png, mask_png):
            fp = tf.strings.to_hash_bucket_fast(path, 2**63 - 1)
            i = tf.minimum(tf.searchsorted(keys, tf.reshape(fp, [1]))[0], tf.size(keys, out_type=tf.int32) - 1)
            return tf.equal(tf.gather(keys, i), fp)

        ds = ds.filter(in_split)
        if training and not cache:  # shuffle the still-encoded pairs; shard shuffling adds the rest
            ds = ds.shuffle(shuffle_buffer or min(count, 10_000), seed=seed, reshuffle_each_iteration=True)
        label_map = None if plan.label_map is None else tf.constant(np.asarray(plan.label_map, np.int64))

        def decode(path, label, image_png, mask_png):
            if label_map is not None:
                label = tf.gather(label_map, label)
            mask = resize_mask_tf(tf.io.decode_png(mask_png, channels=3, dtype=tf.uint8), size)
            x = {"mask": mask}
            if with_image:
                x["image"] = resize_tf(tf.io.decode_png(image_png, channels=3, dtype=tf.uint8), size)
            return x, tf.cast(label, tf.int32)

        ds = ds.map(decode, num_parallel_calls=autotune)
        if on_bad_image == "skip":
            ds = ds.ignore_errors(log_warning=True)
        if cache:
            ds = do_cache(ds)
            if training:
                ds = shuffle_decoded(ds, count)
    else:
        raise DataError(f"unsupported source kind {plan.kind!r}")

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
            plan = source.plan(s)
            if plan.kind == "arrays":
                image_size = list(plan.images.shape[1:3])
            elif plan.kind == "mask_pairs":
                import tensorflow as tf

                for raw in tf.data.TFRecordDataset(plan.shards[:1]).take(1):
                    feats = tf.train.Example.FromString(raw.numpy()).features.feature
                    image_size = [int(feats["height"].int64_list.value[0]), int(feats["width"].int64_list.value[0])]
            elif plan.kind == "tfrecord":
                import tensorflow as tf

                for raw in tf.data.TFRecordDataset(plan.shards[:1]).take(1):
                    image_size = [int(v) for v in parse_example(raw)["image"].shape[:2]]
            elif plan.records:
                image_size = list(decode_image_file(plan.records[0].path).shape[:2])
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
