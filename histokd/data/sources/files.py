"""Image files on disk (folders, manifests): checked once, decoded in graph.

PNG, JPEG, BMP and GIF are decoded in graph (``tf.io.decode_png`` /
``tf.io.decode_image``); TIFF and anything TensorFlow cannot read fall back to the
numpy decoder of :mod:`histokd.data.decode` via ``tf.numpy_function``, which holds
the GIL and is slow. For real training, convert once with ``histokd data prepare SRC
OUT`` and train on the TFRecords.

Bad images: before a split is read every file is checked once (tqdm bar) and the
result is cached on the source. ``validate="full"`` decodes every file (catches any
corruption; ~1-3 ms per 224 px TIFF); ``validate="header"`` only checks the file
signature and, for PNG/JPEG, the end-of-file marker (catches truncated downloads,
fast enough for 100 000 files); ``"auto"`` (default) is ``full`` up to 2 000 files
and ``header`` above. With ``on_bad_image="error"`` a bad file raises
:class:`~histokd.errors.BadImageError` right away; with ``"skip"`` bad files are
dropped, listed in ``source.skipped`` and a warning gives their number.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from histokd.data.decode import _HINT, check_image_header, decode_image_file, decode_image_tf, resize_tf
from histokd.data.sources.base import Source, SplitPlan, _bounded_map, _check_split, _tqdm
from histokd.errors import BadImageError, DataError

_FULL_CHECK_LIMIT = 2000


class FilePlan(SplitPlan):
    """A split made of image files (the records' ``path``).

    Args:
        records: list[Record]. The split's records.
    """

    def __init__(self, records):
        super().__init__("files", list(records))

    def to_dataset(self, owner, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        import tensorflow as tf

        records, use_tf = check_files(owner, split, self.records, on_bad_image, validate, progress)
        count = len(records)
        if count == 0:
            raise DataError(f"every image of split {split!r} was skipped as undecodable (see source.skipped)")
        size = None if image_size is None else int(image_size)
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

        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE), count

    def prepare_reader(self, split):
        recs = self.records
        return [r.label for r in recs], lambda i: decode_image_file(recs[i].path)

    def stored_image_size(self):
        return list(decode_image_file(self.records[0].path).shape[:2]) if self.records else None


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


class FileSource(Source):
    """A source whose examples are image files (folders, manifests): read through :class:`FilePlan`."""

    def plan(self, split: str) -> SplitPlan:
        return FilePlan(self.records(_check_split(split)))

    def external_plan(self, records, label_map) -> SplitPlan:
        return FilePlan(list(records))
