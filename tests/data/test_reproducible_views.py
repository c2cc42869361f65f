"""Training views are a function of the run's seed: two pipelines built from the same
config (after the runner's seeding) give the same batches although views are made in a
parallel map."""

import keras
import numpy as np
import pytest

import histokd  # noqa: F401
from histokd.config import load_config
from histokd.data.datasets import build_data, make_views, train_dataset

TINY = ["data.image_size=32", "data.synthetic_per_class=8", "data.synthetic_classes=2", "train.batch_size=4"]


@pytest.mark.parametrize("over", [
    ["model.method=moby", "views.kind=multiscale", "views.downsample=null", "moby.queue_size=8"],
    ["views.kind=asymmetric", "views.downsample=8"],
])
def test_two_pipelines_of_one_config_give_the_same_views(over):
    cfg = load_config("default", TINY + over)
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(cfg.train.seed)  # what histokd.train.run does first
        ds = train_dataset(cfg, build_data(cfg), cfg.train.batch_size, make_views(cfg, training=True))
        runs.append([{k: v.numpy() for k, v in x.items()} for x, _ in ds.take(8)])
    for a, b in zip(*runs):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(runs[0][0]["view_a"], runs[0][1]["view_a"])  # fresh views every batch
