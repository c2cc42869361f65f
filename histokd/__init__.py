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
from histokd.registry import register_keras_objects as _register  # noqa: E402

_register()
