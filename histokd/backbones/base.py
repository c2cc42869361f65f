"""Shared parts of every histokd backbone: the model class, input normalisation, weights.

A histokd backbone is a functional :class:`Backbone` (a ``keras.Model``) that
takes float32 images scaled to [0, 1], shaped ``[B, H, W, 3]``, normalises them
itself (an :class:`ImageNormalization` layer named ``"normalize"`` right after
the input) and returns pooled features ``[B, D]``. It records the layer names
of its stage outputs (``stage_names``) so that CKA, GradCAM and layer-wise
distillation can tap them, and it survives a ``.keras`` round trip.

Reference: Fuster et al., "More From Less: Self-Supervised Knowledge
Distillation for Routine Histopathology Data", §2.2 and Table S2 (ResNet50,
MobileNetV2, EfficientNetB0 and Xception encoders trained from random
initialisation).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import keras
import numpy as np
from keras import ops

from histokd.errors import ConfigError, WeightsError

# keras.applications preprocess_input constants (imagenet_utils).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

NORMALIZATION_MODES = ("caffe", "tf", "torch", "scale255", "none")

WEIGHT_SUFFIXES = (".weights.h5", ".h5", ".hdf5", ".keras")

# Keras only warns (and keeps fresh weights) for some mismatches; treat them as errors.
_PARTIAL_LOAD_SIGNS = ("Skipping", "could not be loaded", "freshly-initialized", "mismatch")


@keras.saving.register_keras_serializable(package="histokd")
class ImageNormalization(keras.layers.Layer):
    """Maps [0, 1] RGB images to the input range a backbone was designed for.

    The maths of ``keras.applications.*.preprocess_input``, written for inputs
    in [0, 1] instead of [0, 255]:

    * ``"caffe"`` (ResNet50): ×255, RGB→BGR, subtract the ImageNet BGR means.
    * ``"tf"`` (MobileNetV2, Xception): scale to [-1, 1].
    * ``"torch"`` (histokd ResNet-18, torchvision convention): subtract the
      ImageNet RGB mean and divide by its std.
    * ``"scale255"`` (EfficientNetB0, whose model rescales internally): ×255.
    * ``"none"``: identity.

    Computed in float32 by default (even under a mixed-precision policy) so
    that the mean subtraction on 0–255 values keeps its precision; the next
    layer casts to its own compute dtype.

    Args:
        mode: str. One of ``"caffe"``, ``"tf"``, ``"torch"``, ``"scale255"``, ``"none"``.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``).

    Example:
        >>> norm = ImageNormalization("caffe")
        >>> y = norm(np.zeros((1, 32, 32, 3), "float32"))  # == -ImageNet BGR means
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in NORMALIZATION_MODES:
            raise ConfigError(
                f"unknown image normalisation mode {mode!r}; valid modes: "
                f"{', '.join(NORMALIZATION_MODES)}"
            )
        self.mode = mode

    def build(self, input_shape):
        channels = input_shape[-1]
        if self.mode in ("caffe", "torch") and channels not in (None, 3):
            raise ConfigError(
                f"ImageNormalization(mode={self.mode!r}) needs RGB images with 3 channels, "
                f"got {channels}; repeat grey images to 3 channels first"
            )
        super().build(input_shape)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1) * 255.0
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "tf":
            return x * 2.0 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
            return (x - mean) / std
        if self.mode == "scale255":
            return x * 255.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="histokd")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training pass is one fused kernel on TensorFlow.

    Deliberately named like the Keras class: ``.weights.h5`` files address layers
    by class name, so weights saved from a model using Keras' BatchNormalization
    load into one using this layer and vice versa.

    Keras 3 computes BatchNorm in training as separate moments / normalise ops, and
    their gradients as many small element-wise ops; on CPU that is a large share of
    a ResNet training step. On the TensorFlow backend, for 4-D channels-last inputs
    in training mode, this layer calls ``FusedBatchNormV3`` (oneDNN on CPU, cuDNN on
    GPU) forward and backward instead. Results match the Keras layer: same
    normalised output, same moving-statistics update (biased batch variance, as
    Keras 3 uses). Anything else — inference, masks, ``synchronized=True`` under a
    distribution strategy, renorm, other backends or ranks — runs the Keras code.

    Args:
        **kwargs: the arguments of ``keras.layers.BatchNormalization``.

    Example:
        >>> bn = BatchNormalization(momentum=0.9, epsilon=1e-5)
        >>> y = bn(np.random.rand(8, 4, 4, 16).astype("float32"), training=True)
    """

    def _can_fuse(self, inputs, training, mask):
        return (
            bool(training) and self.trainable and mask is None
            and keras.backend.backend() == "tensorflow"
            and len(inputs.shape) == 4 and self.axis in (-1, 3)
            and not self.synchronized and not self.renorm
            and self.epsilon >= 1e-5  # cuDNN's minimum; smaller values use the Keras path
        )

    def call(self, inputs, training=None, mask=None):
        if not self._can_fuse(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = inputs
        if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            x = tf.cast(x, tf.float32)
        channels = x.shape[-1]
        scale = (tf.cast(self.gamma, tf.float32) if self.scale
                 else tf.ones((channels,), tf.float32))
        offset = (tf.cast(self.beta, tf.float32) if self.center
                  else tf.zeros((channels,), tf.float32))
        empty = tf.constant([], tf.float32)
        y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty,
            epsilon=float(self.epsilon), exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True,
        )
        # The op returns the unbiased (Bessel-corrected) variance; Keras keeps the biased
        # one: biased = unbiased * (n - 1) / n. Keras' update m * old + (1 - m) * new is
        # written old -= (1 - m) * (old - new), with the Bessel factor folded into a
        # constant when the shape is static, so each call adds few small ops. Same values
        # to float32 rounding (tested against Keras).
        rate = 1.0 - float(self.momentum)
        static_n = 1
        for d in x.shape[:-1]:
            static_n = static_n * d if (d is not None and static_n is not None) else None
        if static_n is not None:
            bessel = max(static_n - 1, 1) / static_n
        else:
            n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
            bessel = tf.maximum(n - 1.0, 1.0) / n
        self.moving_mean.assign_sub((self.moving_mean - mean) * rate)
        self.moving_variance.assign_sub(self.moving_variance * rate - variance * (bessel * rate))
        return tf.cast(y, self.compute_dtype)


# arch → stage-output layer names; lets a Backbone rebuilt by keras.models.clone_model
# (which passes only inputs, outputs and name) recover its stage_names and arch.
_STAGE_LAYOUTS: dict = {}


def register_stage_layout(arch: str, stage_names: Sequence[str]):
    """Records the stage-output layer names of a backbone family (deepest last)."""
    _STAGE_LAYOUTS[arch] = tuple(stage_names)


@keras.saving.register_keras_serializable(package="histokd")
class Backbone(keras.Model):
    """A functional image encoder: [0, 1] images ``[B, H, W, 3]`` → pooled features ``[B, D]``.

    Build one with :func:`histokd.backbones.make_backbone`; this class only adds
    bookkeeping to a functional ``keras.Model``: which layers end a stage and
    which registry name built it. Both are saved in the config, so a reloaded
    ``.keras`` backbone keeps them.

    Args:
        *args: ``inputs`` and ``outputs`` as for a functional ``keras.Model``.
        stage_names: list of str. Layer names of the stage outputs, shallow to
            deep (stem, then one per resolution).
        arch: str. Registry key that built the model (``"resnet50"``, ...).
        **kwargs: ``name``, ``trainable`` and other ``keras.Model`` arguments.

    Example:
        >>> bb = make_backbone("resnet18", 64, width=0.25, small_input=True)
        >>> bb.output_dim, bb.stage_names[-1]
        (128, 'conv5_block2_out')
        >>> feats = bb.feature_model()(images)  # {"conv1_relu": ..., ..., "pooled": ...}
    """

    #: int. Spatial dimensions of the input: 2 for images ``[B, H, W, C]``, 3 for volumes.
    spatial_rank = 2
    #: str or None. Family whose checkpoint layouts fit this model (``histokd.backbones.layouts``).
    checkpoint_family = None

    def __init__(self, *args, stage_names: Sequence[str] | None = None, arch: str | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if stage_names is None and arch is None:
            arch, stage_names = self._infer_layout()
        self.stage_names = list(stage_names or [])
        self.arch = arch
        missing = [n for n in self.stage_names if n not in {l.name for l in self.layers}]
        if missing:
            raise ConfigError(f"stage_names {missing} are not layers of backbone {self.name!r}")

    def _infer_layout(self):
        """(arch, stage_names) of a registered family whose deepest stage feeds the pooling."""
        names = {l.name for l in self.layers}
        pool = self.outputs[0]._keras_history.operation
        feeding = {
            t._keras_history.operation.name
            for node in pool._inbound_nodes[:1] for t in node.input_tensors
        }
        for arch, stages in _STAGE_LAYOUTS.items():
            if stages and stages[-1] in feeding and all(n in names for n in stages):
                return arch, list(stages)
        return None, []

    @property
    def output_dim(self) -> int:
        """int. Size D of the pooled feature vector."""
        return int(self.outputs[0].shape[-1])

    @property
    def input_size(self):
        """tuple (H, W) (or (D, H, W) for a 3-D family). Spatial input size it was built for (None = any)."""
        shape = self.inputs[0].shape
        return tuple(shape[1:1 + self.spatial_rank])

    def fit_checkpoint_weight(self, name: str, array, origin: str):
        """Adapt a converted checkpoint array whose shape differs from the model's weight ``name``.

        The default changes nothing; a family overrides it for weights that depend on the
        input size (ViT resizes its position table).

        Args:
            name: str. Canonical weight name (a key of ``canonical_weights()``).
            array: numpy array. The converted checkpoint value.
            origin: str. Checkpoint key it came from, for error messages.

        Returns:
            (array, changed): the value to load and whether it was adapted.
        """
        return array, False

    def conv_layer_names(self) -> list:
        """Names of every convolution layer, in graph order (CKA / GradCAM per layer)."""
        conv_types = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                      keras.layers.SeparableConv2D)
        return [l.name for l in self.layers if isinstance(l, conv_types)]

    def feature_model(self, names: Iterable[str] | None = None, pooled: bool = True) -> keras.Model:
        """A model sharing this backbone's weights that returns intermediate outputs.

        Args:
            names: iterable of str or None. Layer names to tap; default ``stage_names``.
            pooled: bool. Also return the pooled features under the key ``"pooled"``.

        Returns:
            keras.Model mapping images to a dict ``{layer name: output}``.
        """
        names = list(self.stage_names if names is None else names)
        known = {l.name for l in self.layers}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"{unknown} are not layers of backbone {self.name!r}; see "
                f".stage_names or .conv_layer_names() for valid names"
            )
        outputs = {n: self.get_layer(n).output for n in names}
        if pooled:
            outputs["pooled"] = self.outputs[0]
        return keras.Model(self.inputs[0], outputs, name=f"{self.name}_features")

    def get_config(self):
        config = super().get_config()
        config["stage_names"] = list(self.stage_names)
        config["arch"] = self.arch
        return config


def spatial_size(value, rank: int = 2, what: str = "input_size", allow_none: bool = False) -> tuple:
    """A spatial size as a tuple of ``rank`` ints: an int means the same size on every axis.

    For 2-D, ``(H, W)`` and the Keras-style ``(H, W, 3)`` (channels last) are accepted;
    other 3-tuples are reserved for 3-D (``rank=3``) backbones.

    Args:
        value: int or sequence of int. The size.
        rank: int. Number of spatial axes (2 for images, 3 for volumes).
        what: str. Name of the argument, for the message.
        allow_none: bool. Let entries be None (any size on that axis).

    Returns:
        tuple of ``rank`` ints (or None where allowed).

    Raises:
        ConfigError: not an int or a sequence of ``rank`` ints.

    Example:
        >>> spatial_size(224), spatial_size((256, 320))
        ((224, 224), (256, 320))
    """
    size = value
    if isinstance(size, (list, tuple)):
        if rank == 2 and len(size) == 3 and size[-1] == 3:  # (H, W, channels)
            size = tuple(size[:2])
    else:
        size = (size,) * rank
    shape_hint = "(height, width)" if rank == 2 else "(depth, height, width)"
    if len(size) != rank:
        extra = (" (a 3-tuple is a 3-D size, for volume backbones)" if rank == 2 and len(size) == 3
                 else "")
        raise ConfigError(f"{what} must be an int or {shape_hint}; got {value!r}{extra}")
    for s in size:
        if s is None and allow_none:
            continue
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ConfigError(f"{what} must be an int or {shape_hint} of ints (pixels); got {value!r}")
    return tuple(None if s is None else int(s) for s in size)


def parse_input_size(input_size, arch: str, min_size: int, rank: int = 2):
    """Validates ``input_size`` (int, a tuple of ``rank`` ints, or None) and returns the tuple.

    Args:
        input_size: int, tuple or None. None = any size.
        arch: str. Registry key, for the message.
        min_size: int. Smallest side the architecture accepts.
        rank: int. Spatial axes (2 = ``(H, W)``, 3 = ``(D, H, W)``).

    Raises:
        ConfigError: the size is not an int ≥ ``min_size`` (or None).
    """
    if input_size is None:
        return (None,) * rank
    size = spatial_size(input_size, rank, what=f"input_size for backbone {arch!r}", allow_none=True)
    for s in size:
        if s is not None and s < min_size:
            raise ConfigError(
                f"backbone {arch!r} needs input images of at least {min_size}x{min_size} px; "
                f"got input_size={input_size!r}. Resize tiles to >= {min_size} px "
                f"(downsampled views are resized back to the working size) or pick another backbone"
            )
    return size


def check_weights_arg(weights, arch: str, allow_imagenet: bool = True):
    """Validates a ``weights`` argument: None, "imagenet" or a path to a weights file.

    Returns:
        None, "imagenet" or a ``Path`` that exists and has a Keras weights suffix.

    Raises:
        WeightsError: unknown keyword, missing file or unsupported file type.
    """
    if weights is None:
        return None
    if isinstance(weights, str) and weights == "imagenet":
        if not allow_imagenet:
            raise WeightsError(
                f"backbone {arch!r} has no published ImageNet weights; pass weights=None "
                f"(random initialisation) or the path of a weights file saved from a "
                f"{arch!r} histokd backbone"
            )
        return "imagenet"
    if not isinstance(weights, (str, os.PathLike)):
        raise WeightsError(
            f"weights for backbone {arch!r} must be None, 'imagenet' or a file path; got {weights!r}"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} for backbone {arch!r} does not exist; expected a Keras "
            f"weights file ({', '.join(WEIGHT_SUFFIXES)}) saved from a {arch!r} backbone. "
            f"Check the path, or pass weights=None for random initialisation"
        )
    if not any(path.name.endswith(s) for s in WEIGHT_SUFFIXES):
        raise WeightsError(
            f"weights file {str(path)!r} for backbone {arch!r} has an unsupported type; expected "
            f"one of {', '.join(WEIGHT_SUFFIXES)} (PyTorch checkpoints must be converted first)"
        )
    return path


def load_weights_file(model: keras.Model, path: Path, arch: str, expected: str):
    """Loads a weights file into ``model``, turning Keras' errors into a WeightsError.

    Args:
        model: keras.Model. The freshly built backbone.
        path: Path. An existing ``.weights.h5`` / legacy ``.h5`` / ``.keras`` file.
        arch: str. Registry key, for the message.
        expected: str. Human description of the architecture the file must match.

    Raises:
        WeightsError: the file is unreadable or does not match the architecture.
    """
    problem = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
        except (ValueError, OSError, KeyError, TypeError, IndexError, AttributeError) as err:
            problem = err
    partial = [w for w in caught if any(s in str(w.message) for s in _PARTIAL_LOAD_SIGNS)]
    if problem is None:  # pass on unrelated warnings, once each
        seen = set()
        for w in caught:
            key = (str(w.message), w.category)
            if w not in partial and key not in seen:
                seen.add(key)
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if problem is None and not partial:
        return
    reason = " ".join(str(problem if problem is not None else partial[0].message).split())
    if len(reason) > 400:
        reason = reason[:400] + " ..."
    raise WeightsError(
        f"could not load weights file {str(path)!r} into backbone {arch!r}: expected weights "
        f"for {expected} ({len(model.weights)} tensors, {model.count_params():,} parameters). "
        f"Keras said: {reason}. Use a file saved from the same backbone with the same options "
        f"(e.g. backbone.save_weights('x.weights.h5')), or weights=None"
    ) from problem
