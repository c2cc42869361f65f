"""Shared helpers of the nuclei tests (synthetic instance maps and stand-in models)."""

from __future__ import annotations

import numpy as np
import keras

from histokd.nuclei.targets import hv_map


def touching_discs(seed=0, size=160):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    nid = 0
    for cy in range(24, size - 20, 38):
        for cx in range(24, size - 40, 50):
            r1, r2 = rng.uniform(8, 11, 2)
            for dx, r in ((0, r1), (r1 + r2 - 2, r2)):  # two discs overlapping by 2 px
                nid += 1
                disc = (yy - cy) ** 2 + (xx - cx - dx) ** 2 <= r * r
                inst[disc & (inst == 0)] = nid
    return inst



def conv_model(input_size, seed=0):
    """A fully convolutional stand-in with HoVer-Net's 92 px shrink and real context use."""
    inp = keras.Input((input_size, input_size, 3) if input_size else (None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.DepthwiseConv2D(93, use_bias=False, depthwise_initializer=keras.initializers.RandomNormal(0, 0.01, seed=seed))(x)
    out = {"np": keras.layers.Conv2D(2, 1, kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=seed + 1))(x),
           "hv": keras.layers.Conv2D(2, 1, kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=seed + 2))(x),
           "tp": keras.layers.Conv2D(4, 1, kernel_initializer=keras.initializers.RandomNormal(0, 1, seed=seed + 3))(x)}
    model = keras.Model(inp, out)
    model.input_size, model.output_size = input_size, (input_size - 92 if input_size else None)
    return model



def decoder_model(input_size=256, border=46):
    """Reads perfect maps out of the image: R = nucleus, G/B = (HV + 1) / 2, cropped by the border."""
    inp = keras.Input((input_size, input_size, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Cropping2D(border)(x)
    np_conv = keras.layers.Conv2D(2, 1)
    hv_conv = keras.layers.Conv2D(2, 1)
    tp_conv = keras.layers.Conv2D(3, 1)
    out = {"np": np_conv(x), "hv": hv_conv(x), "tp": tp_conv(x)}
    np_conv.set_weights([np.array([[[[0, 40], [0, 0], [0, 0]]]], "float32"), np.array([0, -20], "float32")])
    hv_conv.set_weights([np.array([[[[0, 0], [2, 0], [0, 2]]]], "float32"), np.array([-1, -1], "float32")])
    tp_conv.set_weights([np.array([[[[0, 0, 20], [0, 0, 0], [0, 0, 0]]]], "float32"), np.array([0, 5, 0], "float32")])
    model = keras.Model(inp, out)
    model.input_size, model.output_size = input_size, input_size - 2 * border
    return model



def encode(inst):
    hv = hv_map(inst, min_size=1)
    img = np.stack([(inst > 0) * 255.0, (hv[..., 0] + 1) * 127.5, (hv[..., 1] + 1) * 127.5], -1)
    return np.rint(img).astype(np.uint8)
