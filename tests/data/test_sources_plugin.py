"""A source defined outside histokd joins through the registry and reads itself."""

from types import SimpleNamespace

import numpy as np
import tensorflow as tf

import histokd  # noqa: F401
from histokd.data import build_source, make_dataset
from histokd.data.sources import Record, Source
from histokd.registry import SOURCES


class _CheckerSource(Source):
    """Toy storage no built-in plan knows: checkerboards generated in graph."""

    kind = "checkers"

    def __init__(self, n=12):
        super().__init__()
        self.class_names = ["even", "odd"]
        self.n = n

    def records(self, split):
        count = self.n if split == "train" else 0
        return [Record(None, i % 2, split, index=i) for i in range(count)]

    def to_dataset(self, split, image_size, training, seed=0, on_bad_image="error", cache=False,
                   validate="auto", shuffle_buffer=None, progress=True):
        n = self.num_examples(split)
        size = int(image_size)

        def make(i):
            grid = (tf.range(size)[:, None] + tf.range(size)[None, :] + tf.cast(i, tf.int32)) % 2
            img = tf.cast(tf.repeat(grid[..., None] * 255, 3, axis=-1), tf.uint8)
            return img, tf.cast(i % 2, tf.int32)

        ds = tf.data.Dataset.range(n)
        if training and not cache:
            ds = ds.shuffle(n, seed=seed)
        return ds.map(make), n

    @classmethod
    def from_config(cls, data_cfg):
        return cls(n=getattr(data_cfg, "synthetic_per_class", 12))

    @classmethod
    def validate(cls, cfg):
        pass


def test_registered_toy_source_is_read_by_make_dataset():
    SOURCES.register("checkers", _CheckerSource)
    try:
        src = build_source(SimpleNamespace(source="checkers", synthetic_per_class=8))
        assert isinstance(src, _CheckerSource)
        for cache in (False, True):
            batches = list(make_dataset(src, "train", 6, batch_size=4, training=True, cache=cache))
            assert len(batches) == 2
            x, y = batches[0]
            assert x.shape == (4, 6, 6, 3) and x.dtype == tf.uint8 and y.dtype == tf.int32
            # the label is the parity of the first pixel: the source's own decoding ran
            np.testing.assert_array_equal(x[:, 0, 0, 0].numpy() // 255, y.numpy())
    finally:
        SOURCES.unregister("checkers")
