"""Every packaged config builds its model and runs 2 training steps on tiny data."""

import numpy as np
import pytest
import keras

import histokd  # noqa: F401
from histokd.config import list_configs, load_config
from histokd import train as T


@pytest.mark.parametrize("name", list_configs())
def test_config_builds_and_trains_two_steps(name):
    base = load_config(name)
    size = 72 if base.model.backbone == "xception" else 32
    cfg = load_config(name, [
        "data.source=synthetic", "data.path=null", "data.test_path=null", f"data.image_size={size}",
        "data.synthetic_per_class=8", "data.synthetic_classes=3", "data.val_fraction=0.2",
        "data.test_fraction=0.2", "train.batch_size=4", "model.expander_dims=[16,16,16]",
    ])
    # the paper-scale choices survive the shrinking
    assert cfg.model.backbone == base.model.backbone and cfg.views == base.views
    assert cfg.model.method == base.model.method and cfg.model.shared == base.model.shared
    keras.utils.set_random_seed(0)
    source = T.build_data(cfg)
    model = T.build_method(cfg, len(source.class_names))
    views = T.make_views(cfg, training=True)
    ds = T.train_dataset(cfg, source, cfg.train.batch_size, views, T.stain_fn(cfg))
    if cfg.model.method == "supervised":
        model.compile(optimizer=T.make_optimizer(cfg, 2), loss="sparse_categorical_crossentropy",
                      run_eagerly=True)
    else:
        model.compile(optimizer=T.make_optimizer(cfg, 2), run_eagerly=True)
    hist = model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    assert np.isfinite(hist.history["loss"][-1])
