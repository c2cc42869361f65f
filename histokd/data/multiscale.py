"""Former home of the multi-scale crops; they live in :mod:`histokd.data.views.multiscale`.

Kept so that ``from histokd.data.multiscale import multiscale_crop`` (scripts,
notebooks, user code) keeps working.
"""

from histokd.data.views.multiscale import (  # noqa: F401
    MultiScaleCrop,
    MultiscaleViewMaker,
    MultiscaleViews,
    _check,
    _hw,
    _seeds,
    _to_float,
    _uniform,
    make_multiscale_views,
    multiscale_crop,
    multiscale_pair,
    sample_multiscale_boxes,
)

__all__ = ["MultiScaleCrop", "MultiscaleViewMaker", "MultiscaleViews", "make_multiscale_views", "multiscale_crop",
           "multiscale_pair", "sample_multiscale_boxes"]
