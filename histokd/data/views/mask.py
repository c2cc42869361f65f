"""Mask view kinds: tissue/nuclei distillation (More From Less §2.1, Table 2).

``mask`` pairs the 3-channel nuclear-type mask (``view_a``, geometric augmentation
only, nearest-neighbour sampling so the type colours stay exact) with its H&E image
(``view_b``, the full Table S1 augmentation): Table 2 "asymmetric".
``mask_symmetric`` makes two independently augmented views of the mask: Table 2
"symmetric". Both read batches of a ``data.source: mask_pairs`` source at full
resolution. The view making itself is :func:`histokd.data.views.base.make_views`.
"""

from __future__ import annotations

from histokd.data.views.base import ViewKind
from histokd.errors import ConfigError
from histokd.registry import VIEWS


class _MaskKind(ViewKind):
    @classmethod
    def validate(cls, cfg):
        kind = cfg.views.kind
        if cfg.data.source != "mask_pairs":
            raise ConfigError(f"views.kind={kind} makes views from nuclear-type masks: set data.source=mask_pairs "
                              "and data.path to a folder written by `histokd masks`")
        if cfg.views.downsample is not None:
            raise ConfigError(f"views.kind={kind} uses full-resolution masks: set views.downsample=null")
        super().validate(cfg)


@VIEWS.register("mask")
class MaskViews(_MaskKind):
    """``view_a`` = geometric augment(mask), ``view_b`` = augment(image) (Table 2 "asymmetric")."""

    name = "mask"

    @classmethod
    def branch_inputs(cls, cfg):
        return {"a": "mask", "b": "full"}


@VIEWS.register("mask_symmetric")
class MaskSymmetricViews(_MaskKind):
    """``view_a``, ``view_b`` = two independent geometric augment(mask) (Table 2 "symmetric")."""

    name = "mask_symmetric"
    reads_images = False

    @classmethod
    def branch_inputs(cls, cfg):
        return {"a": "mask", "b": "mask"}
