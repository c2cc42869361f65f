"""Linear evaluation of frozen encoders (More From Less §2.2).

"With the encoder's weights frozen, we assess model performance by training a
classifier (dense layer with softmax) for 100 epochs using an Adam optimiser and
learning rate of 10⁻³." Features are extracted once with the frozen encoder and
cached, so the 100 probe epochs cost seconds, not hours.
"""

from __future__ import annotations

import numpy as np
import keras
import tensorflow as tf
from tqdm.auto import tqdm

from histokd.errors import DataError
from histokd.layers.heads import LinearHead


def extract_features(encoder, dataset, preprocess=None, progress=True, desc="features"):
    """Run a frozen encoder over a dataset of ``(uint8 images, labels)`` batches.

    Args:
        encoder: keras.Model. Images in [0, 1] → features.
        dataset: tf.data.Dataset. Yields ``(images uint8 [B,H,W,3], labels [B])``.
        preprocess: callable. Optional batched transform of float images (e.g. ``Downsample``).
        progress: bool. Show a progress bar.

    Returns:
        (features float32 [N, D], labels int [N]).
    """
    spec = dataset.element_spec[0]
    sig = tf.TensorSpec([None] + list(spec.shape[1:]), spec.dtype)

    @tf.function(input_signature=[sig])
    def forward(x):
        x = tf.cast(x, tf.float32) / 255.0
        if preprocess is not None:
            x = preprocess(x)
        return encoder(x, training=False)

    feats, labels = [], []
    for x, y in tqdm(dataset, desc=desc, disable=not progress, leave=False):
        feats.append(forward(x).numpy())
        labels.append(np.asarray(y))
    if not feats:
        raise DataError("no images to extract features from: the split is empty")
    return np.concatenate(feats).astype("float32"), np.concatenate(labels).astype(int)


def stratified_subset(labels, fraction, seed=0):
    """Indices of a stratified, seeded subset keeping ``fraction`` of each class (≥ 1 each)."""
    labels = np.asarray(labels)
    if fraction >= 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        keep.append(rng.choice(idx, n, replace=False))
    return np.sort(np.concatenate(keep))


def linear_probe(train_x, train_y, num_classes, epochs=100, lr=1e-3, batch_size=256, seed=0,
                 val=None, verbose=0):
    """Train a softmax dense layer on cached features.

    Args:
        train_x: array [N, D]. Features. train_y: array [N]. Labels.
        num_classes: int. epochs: int (100). lr: float (1e-3, Adam). batch_size: int.
        val: optional (x, y) tuple for validation curves.

    Returns:
        (head keras.Model [D] → [K] probabilities, history dict).
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((train_x.shape[1],), name="features")
    head = keras.Model(inp, LinearHead(num_classes, name="linear_head")(inp), name="probe")
    # XLA is slower than TF's kernels for this small model on CPU (and "auto" would enable it)
    head.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                 metrics=["accuracy"], jit_compile=False)
    ds = tf.data.Dataset.from_tensor_slices((train_x, train_y)).shuffle(len(train_x), seed=seed)
    ds = ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    val_ds = None
    if val is not None:
        val_ds = tf.data.Dataset.from_tensor_slices(val).batch(batch_size)
    hist = head.fit(ds, epochs=epochs, verbose=verbose, validation_data=val_ds, shuffle=False)
    return head, hist.history
