"""View kinds: how a batch becomes the views a method trains on.

One module per registered family of view kinds, each kind a :class:`ViewKind`
subclass registered in :data:`histokd.registry.VIEWS` under its ``views.kind`` name:

* :mod:`.downsample`: ``asymmetric``, ``symmetric``, ``identity``, ``eval``
  (More From Less §2.1, multi-magnification distillation);
* :mod:`.mask`: ``mask``, ``mask_symmetric`` (More From Less §2.1, Table 2,
  tissue/nuclei distillation);
* :mod:`.multiscale`: ``multiscale`` (MoBY pre-training in the Swin V2 paper, §III-A).

:mod:`.base` holds the shared machinery: the batched view maker
(:func:`make_view_maker`, :class:`ViewMaker`, :class:`ViewMakerLayer`), downsampling
(:class:`Downsample`, :func:`downsample_batch`, :func:`separable_resize`,
:func:`resize_matrix`) and the :class:`ViewKind` base.

Example:
    >>> from histokd.registry import VIEWS
    >>> VIEWS.get("asymmetric").outputs
    ('view_a', 'view_b')
"""

from histokd.data.views.base import (  # noqa: F401
    KINDS,
    MASK_KINDS,
    Downsample,
    ViewKind,
    ViewMaker,
    ViewMakerLayer,
    _check,
    _hw,
    _image_of,
    _mask_of,
    _prepare,
    _small,
    _split_mask_inputs,
    _to_float,
    downsample_batch,
    make_view_maker,
    make_views,
    resize_matrix,
    separable_resize,
)
from histokd.data.views.downsample import AsymmetricViews, EvalView, IdentityView, SymmetricViews
from histokd.data.views.mask import MaskSymmetricViews, MaskViews
from histokd.data.views.multiscale import (  # noqa: F401
    MultiScaleCrop,
    MultiscaleViewMaker,
    MultiscaleViews,
    make_multiscale_views,
    multiscale_crop,
    multiscale_pair,
    sample_multiscale_boxes,
)

__all__ = [
    "KINDS", "MASK_KINDS", "Downsample", "ViewKind", "ViewMaker", "ViewMakerLayer", "make_view_maker", "make_views",
    "downsample_batch", "separable_resize", "resize_matrix",
    "AsymmetricViews", "SymmetricViews", "IdentityView", "EvalView", "MaskViews", "MaskSymmetricViews",
    "MultiscaleViews", "MultiscaleViewMaker", "MultiScaleCrop", "make_multiscale_views", "multiscale_crop",
    "multiscale_pair", "sample_multiscale_boxes",
]
