"""In-memory array sources: the base of the MedMNIST and synthetic sources."""

from __future__ import annotations

import numpy as np

from histokd.data.sources.base import SPLITS, Record, Source, SplitPlan, _check_split
from histokd.errors import DataError


def array_to_rgb_uint8(x: np.ndarray) -> np.ndarray:
    """Stack of images ``[N,H,W]``/``[N,H,W,1|3|4]`` of any dtype → RGB uint8 ``[N,H,W,3]``.

    Same rules as :func:`histokd.data.decode.to_rgb_uint8` (16-bit / 257, alpha on white).
    """
    from histokd.data.decode import to_rgb_uint8

    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"cannot interpret an image stack of shape {x.shape} as grey/RGB/RGBA images")
    if x.dtype == np.uint8 and x.shape[-1] == 3:
        return x
    if x.dtype == np.uint8 and x.shape[-1] == 1:
        return np.repeat(x, 3, axis=-1)
    # reuse the per-image rules on the whole stack (folded into one tall image)
    n, h, w, c = x.shape
    return to_rgb_uint8(x.reshape(n * h, w, c)).reshape(n, h, w, 3)


class ArrayPlan(SplitPlan):
    """A split held in memory as arrays (MedMNIST, synthetic).

    The arrays are held once in the graph; shuffling shuffles indices and images are
    gathered per element.

    Args:
        records: list[Record]. The split's records.
        images: uint8 ``[N, H, W, 3]``.
        labels: int ``[N]``.
    """

    def __init__(self, records, images, labels):
        super().__init__("arrays", list(records), images=images, labels=labels)

    def to_dataset(self, owner, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        import tensorflow as tf

        from histokd.data.decode import resize_tf

        size = None if image_size is None else int(image_size)
        images = tf.constant(self.images)
        labels = tf.constant(np.asarray(self.labels, np.int32))
        ds = tf.data.Dataset.range(len(self.labels))
        if training:
            ds = ds.shuffle(len(self.labels), seed=seed, reshuffle_each_iteration=True)
        same = size is None or tuple(self.images.shape[1:3]) == (size, size)

        def take(i):
            img = tf.gather(images, i)
            return (img if same else resize_tf(img, size)), tf.gather(labels, i)

        return ds.map(take, num_parallel_calls=tf.data.AUTOTUNE), len(self.labels)

    def example_bytes(self, image_size):
        return None  # already in memory: caching would only copy it

    def prepare_reader(self, split):
        images = self.images
        return [int(v) for v in self.labels], lambda i: images[i]

    def stored_image_size(self):
        return list(self.images.shape[1:3])


class ArraySource(Source):
    """In-memory arrays per split (base of MedMNIST and synthetic sources).

    Args:
        split_arrays: dict split → (images ``[N,H,W(,C)]``, labels ``[N]``).
        class_names: list[str].
    """

    kind = "arrays"

    def __init__(self, split_arrays=None, class_names=None):
        super().__init__()
        self._arrays = {s: None for s in SPLITS}
        if split_arrays:
            for s, (x, y) in split_arrays.items():
                self._arrays[_check_split(s)] = (array_to_rgb_uint8(x), np.asarray(y, np.int64).reshape(-1))
        if class_names is not None:
            self.class_names = list(class_names)

    def _load(self):
        """Hook for lazy loading."""

    def arrays(self, split):
        self._load()
        item = self._arrays[_check_split(split)]
        if item is None:
            return np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int64)
        return item

    def num_examples(self, split):
        return len(self.arrays(split)[1])

    def records(self, split):
        _, y = self.arrays(split)
        return [Record(None, int(v), split, index=i) for i, v in enumerate(y)]

    def labels(self, split):
        return self.arrays(split)[1]

    def class_counts(self, split):
        return np.bincount(self.arrays(split)[1], minlength=self.num_classes).tolist()

    def plan(self, split):
        x, y = self.arrays(_check_split(split))
        return ArrayPlan(self.records(split), x, y)

    def external_plan(self, records, label_map):
        xs, ys = [], []
        for s in self.splits:
            x, y = self.arrays(s)
            xs.append(x)
            ys.append(np.asarray(label_map)[y])
        if not xs:
            return ArrayPlan(records, np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int64))
        return ArrayPlan(records, np.concatenate(xs), np.concatenate(ys))

    def describe(self):
        return {"type": "arrays"}
