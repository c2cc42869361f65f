"""histokd: self-supervised learning and knowledge distillation for medical images.

Keras 3 on the TensorFlow backend. Importing histokd registers every custom
layer, loss and model with Keras so that exported ``.keras`` files reload with
``keras.saving.load_model`` after ``import histokd``.
"""

import os as _os

_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from histokd._version import __version__  # noqa: E402

from histokd.errors import (  # noqa: E402
    BadImageError,
    CollapseError,
    ConfigError,
    DataError,
    HistokdError,
    RegistryError,
    StainError,
    WeightsError,
)

# Register every serialisable layer/model so exported .keras files reload after `import histokd`.
from histokd import layers as _layers  # noqa: E402,F401
from histokd import losses as _losses  # noqa: E402,F401
from histokd import methods as _methods  # noqa: E402,F401
from histokd import backbones as _backbones  # noqa: E402,F401
from histokd import tasks as _tasks  # noqa: E402,F401
from histokd.data import augment as _augment, views as _views  # noqa: E402,F401
from histokd import stain as _stain  # noqa: E402,F401
from histokd.nuclei import hovernet as _hovernet  # noqa: E402,F401
from histokd.losses import hovernet as _hovernet_losses  # noqa: E402,F401
