"""Graph mode: tf.data map, counters, on_failure, Keras layer save/reload, strategy."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from histokd.stain import MacenkoNormalization, MacenkoNormalizer, make_stain_fn
from histokd.errors import StainError

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import harness  # noqa: E402
from stain_synth import synth_he  # noqa: E402

S = 48


@pytest.fixture(scope="module")
def tiles():
    good = [synth_he(S, s) for s in range(5)]
    bg = np.full((S, S, 3), 255, np.uint8)
    return np.stack(good[:2] + [bg] + good[2:])  # 6 tiles, one background


def test_dataset_map_after_batch_matches_eager_and_counts(tiles):
    stain = make_stain_fn("macenko", "torchstain", "passthrough")
    ds = tf.data.Dataset.from_tensor_slices(tiles).batch(4).map(
        stain, num_parallel_calls=tf.data.AUTOTUNE
    )
    got = np.concatenate([b.numpy() for b in ds])
    expect = MacenkoNormalizer("torchstain")(tiles)
    np.testing.assert_array_equal(got, expect)
    assert stain.counts() == {"tiles": 6, "passed_through": 1}
    list(ds)  # a second epoch keeps counting
    assert stain.counts() == {"tiles": 12, "passed_through": 2}
    stain.reset_counts()
    assert stain.counts() == {"tiles": 0, "passed_through": 0}
    meta = stain.metadata()
    assert meta["method"] == "macenko" and meta["fit"]["source"] == "preset:torchstain"


def test_with_count_is_stateless_and_dynamic_shapes_work(tiles):
    stain = make_stain_fn("macenko", "torchstain")
    fn = tf.function(stain.with_count, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    out, n = fn(tf.constant(tiles))
    assert int(n) == 1
    # unknown tile sizes run TensorFlow's kernels instead of the XLA-compiled passes
    # of the static-size path: log/exp round differently in the last bit, which can
    # move a truncated output by one grey level
    static = MacenkoNormalizer("torchstain")(tiles)
    diff = np.abs(out.numpy().astype(int) - static)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert stain.counts()["tiles"] == 0


def test_method_none_and_bad_arguments(tiles):
    none = make_stain_fn("none")
    np.testing.assert_array_equal(none(tf.constant(tiles)).numpy(), tiles)
    assert none.counts() == {"tiles": 6, "passed_through": 0}
    assert none.metadata() == {"method": "none"} and none.layer() is None
    with pytest.raises(StainError, match="unknown stain method"):
        make_stain_fn("reinhard")
    with pytest.raises(StainError, match="on_failure"):
        make_stain_fn("macenko", on_failure="skip")
    with pytest.raises(StainError, match="uint8"):
        none(tf.zeros([1, 4, 4, 3]))


def test_on_failure_error_raises_in_pipeline(tiles):
    stain = make_stain_fn("macenko", "torchstain", on_failure="error")
    ok_ds = tf.data.Dataset.from_tensor_slices(tiles[:2]).batch(2).map(stain)
    assert len(list(ok_ds)) == 1
    bad_ds = tf.data.Dataset.from_tensor_slices(tiles).batch(3).map(stain)
    with pytest.raises(tf.errors.InvalidArgumentError, match="on_failure: passthrough"):
        list(bad_ds)


def test_keras_layer_in_saved_and_reloaded_classifier(tiles, tmp_path):
    inp = keras.Input((S, S, 3))
    x = MacenkoNormalization(fit="torchstain", name="stain")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3)(x)
    model = keras.Model(inp, out)
    xf = tiles.astype("float32") / 255.0
    harness.assert_config_roundtrip(model.get_layer("stain"))
    loaded = harness.assert_saved_model_roundtrip(model, xf, tmp_path, atol=1e-6)
    # the layer reproduces the uint8 pipeline exactly; passthrough tiles stay unchanged
    norm_out = loaded.get_layer("stain")(xf).numpy()
    expect = MacenkoNormalizer("torchstain")(tiles).astype("float32") / 255.0
    np.testing.assert_allclose(norm_out, expect, atol=1e-6)
    np.testing.assert_array_equal(norm_out[2], xf[2])
    # predict() (a tf.function) and uint8 inputs
    np.testing.assert_allclose(loaded.predict(xf, verbose=0), model.predict(xf, verbose=0), atol=1e-6)
    u8 = MacenkoNormalization()(tf.constant(tiles))
    assert u8.dtype == tf.uint8
    np.testing.assert_array_equal(u8.numpy(), MacenkoNormalizer("torchstain")(tiles))
    # TF SavedModel (``histokd export --saved-model``): the XLA-compiled passes travel
    # inside the graph and give the same outputs when served
    model.export(str(tmp_path / "sm"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    np.testing.assert_allclose(served.serve(tf.constant(xf)).numpy(), model.predict(xf, verbose=0),
                               atol=1e-6)


def test_stain_fn_layer_matches_pipeline(tiles):
    stain = make_stain_fn("macenko", "slideflow_v3")
    layer = stain.layer(value_range=(0, 255))
    got = layer(tf.constant(tiles, tf.float32)).numpy()
    np.testing.assert_array_equal(got, stain(tf.constant(tiles)).numpy().astype("float32"))


def test_counter_under_mirrored_strategy(tiles):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        stain = make_stain_fn("macenko", "torchstain")
        ds = tf.data.Dataset.from_tensor_slices(tiles).batch(6).map(stain)
    dist = strategy.experimental_distribute_dataset(ds)
    n = 0
    for batch in dist:
        n += sum(int(t.shape[0]) for t in strategy.experimental_local_results(batch))
    assert n == 6
    assert stain.counts() == {"tiles": 6, "passed_through": 1}
