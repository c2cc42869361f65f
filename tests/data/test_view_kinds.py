"""Registered view kinds: the ViewKind interface, their outputs, multiscale augmentation."""

import numpy as np
import pytest
import tensorflow as tf

import histokd  # noqa: F401
from histokd.config import load_config
from histokd.data.datasets import make_views
from histokd.data.multiscale import make_multiscale_views
from histokd.data.views import ViewKind
from histokd.errors import ConfigError
from histokd.registry import VIEWS

S = 16


def _cfg(kind, *more):
    extra = {"identity": ["model.method=supervised", "views.downsample=null"],
             "multiscale": ["model.method=moby", "views.augment=false", "moby.queue_size=128"]}
    # mask kinds need a mask_pairs source; their maker is built without validation
    over = [f"data.image_size={S}", "views.downsample=4", *extra.get(kind, []), *more]
    if kind in ("mask", "mask_symmetric", "eval"):
        over = [o for o in over if not o.startswith("views.downsample")] + ["views.downsample=null"]
        cfg = load_config("default", over)
        cfg.views.kind = kind
        return cfg
    return load_config("default", over + [f"views.kind={kind}"])


def _batch(kind):
    img = tf.cast(tf.random.stateless_uniform([4, S, S, 3], [1, 2], maxval=256, dtype=tf.int32), tf.uint8)
    if kind in ("mask", "mask_symmetric"):
        return {"image": img, "mask": tf.zeros_like(img)}
    return img


@pytest.mark.parametrize("kind", VIEWS.names())
def test_every_registered_kind_has_the_interface_and_yields_its_outputs(kind):
    cls = VIEWS.get(kind)
    assert isinstance(cls, type) and issubclass(cls, ViewKind)
    assert isinstance(cls.outputs, tuple) and cls.outputs
    assert isinstance(cls.supports_device_augment, bool)
    cfg = _cfg(kind)
    for training in (True, False):
        vm = cls.from_run_config(cfg, training)
        views, y = vm(_batch(kind), tf.zeros([4], tf.int32))
        assert tuple(sorted(views)) == tuple(sorted(cls.outputs)), kind
        for v in views.values():
            assert v.shape == (4, S, S, 3) and v.dtype == tf.float32
    inputs = cls.branch_inputs(cfg)
    assert isinstance(inputs, dict) and set(inputs.values()) <= {"full", "downsampled", "mask"}
    if kind in ("mask", "mask_symmetric", "eval"):
        return
    cls.validate(cfg)  # a valid config passes
    # the runner's entry point is the registry look-up
    views, _ = make_views(cfg, True)(_batch(kind), tf.zeros([4], tf.int32))
    assert set(views) == set(cls.outputs)


def test_branch_inputs_per_kind():
    assert VIEWS.get("asymmetric").branch_inputs(_cfg("asymmetric")) == {"a": "downsampled", "b": "full"}
    assert VIEWS.get("symmetric").branch_inputs(_cfg("symmetric")) == {"a": "downsampled", "b": "downsampled"}
    full = _cfg("symmetric", f"views.downsample={S}")
    assert VIEWS.get("symmetric").branch_inputs(full) == {"a": "full", "b": "full"}
    assert VIEWS.get("identity").branch_inputs(_cfg("identity")) == {"image": "full"}
    assert VIEWS.get("mask").branch_inputs(_cfg("mask")) == {"a": "mask", "b": "full"}
    assert VIEWS.get("mask_symmetric").branch_inputs(_cfg("mask")) == {"a": "mask", "b": "mask"}
    assert VIEWS.get("multiscale").branch_inputs(_cfg("multiscale")) == {"a": "full", "b": "full"}
    assert VIEWS.get("multiscale").supports_device_augment is False
    assert VIEWS.get("asymmetric").supports_device_augment is True


def test_kind_validation_messages():
    with pytest.raises(ConfigError, match="data.source=mask_pairs"):
        load_config("default", ["views.kind=mask", "views.downsample=null"])
    with pytest.raises(ConfigError, match="augment_on=device"):
        load_config("default", ["views.kind=multiscale", "views.augment_on=device"])
    with pytest.raises(ConfigError, match="one of"):
        load_config("default", ["views.kind=eval"])  # registered, but not a choice of a run


def _ms_cfg(augment):
    return load_config("swinv2/moby_swinv2_tiny", [f"data.image_size={S}", "data.source=synthetic",
                                                   "data.path=null", "data.test_path=null",
                                                   "moby.queue_size=512", f"views.augment={augment}"])


def test_multiscale_augment_off_is_the_crops_and_on_differs():
    x = _batch("multiscale")
    y = tf.zeros([4], tf.int32)
    off_cfg = _ms_cfg("false")
    crops = make_multiscale_views(size=S, scale=tuple(off_cfg.views.crop_scale),
                                  magnify_prob=off_cfg.views.magnify_prob,
                                  magnification=off_cfg.views.magnification)
    seeds = [tf.constant([3, 4 + i], tf.int64) for i in range(2)]

    def crop_only(b, s):
        # the maker splits each batch's seed into the crops' seed and the two views' seeds
        return crops(b, seed=tf.unstack(tf.random.experimental.stateless_split(s, 3))[0])

    def run(fn):
        return [{k: v.numpy() for k, v in fn(x, y, s)[0].items()} for s in seeds]

    today = run(lambda b, lab, s: (crop_only(b, s), lab))
    off = run(lambda b, lab, s: VIEWS.get("multiscale").from_run_config(off_cfg, True)(b, lab, seed=s))
    on_vm = VIEWS.get("multiscale").from_run_config(_ms_cfg("true"), True)
    on = run(lambda b, lab, s: on_vm(b, lab, seed=s))
    for t, o, a in zip(today, off, on):
        for k in ("view_a", "view_b"):
            np.testing.assert_array_equal(o[k], t[k])  # augmentation off: exactly the crops
            assert a[k].shape == t[k].shape and not np.allclose(a[k], t[k])
        # independent draws per view
        assert not np.allclose(a["view_a"] - o["view_a"], a["view_b"] - o["view_b"])
    assert not np.allclose(today[0]["view_a"], today[1]["view_a"])  # another seed, other crops

    # evaluation-time view makers are not augmented
    val_vm = VIEWS.get("multiscale").from_run_config(_ms_cfg("true"), False)
    off_vm = VIEWS.get("multiscale").from_run_config(off_cfg, True)
    for s in seeds:
        v, o = val_vm(x, y, seed=s)[0], off_vm(x, y, seed=s)[0]
        np.testing.assert_array_equal(v["view_a"], o["view_a"])
