"""Image view kinds: asymmetric / symmetric downsampling, one view, evaluation.

*More From Less* (Farndale, Insall & Yuan), §2.1: "the first image in an asymmetric
pair might always be a lower resolution than the second image, while in a symmetric
pair, both images would be the same resolution"; downsampled images are resized back
to the working size with linear interpolation and then augmented (Table S1). The
supervised baseline reads one (optionally downsampled) view, ``identity``; feature
extraction reads one un-augmented view, ``eval``. The view making itself is
:func:`histokd.data.views.base.make_views`.
"""

from __future__ import annotations

from histokd.data.views.base import ViewKind, _down
from histokd.errors import ConfigError
from histokd.registry import VIEWS


@VIEWS.register("asymmetric")
class AsymmetricViews(ViewKind):
    """``view_a`` = augment(downsample(x, r)), ``view_b`` = augment(x) (More From Less §2.1)."""

    name = "asymmetric"

    @classmethod
    def branch_inputs(cls, cfg):
        return {"a": _down(cfg), "b": "full"}


@VIEWS.register("symmetric")
class SymmetricViews(ViewKind):
    """``view_a``, ``view_b`` = two independent augment(downsample(x, r)) (More From Less §2.1)."""

    name = "symmetric"

    @classmethod
    def branch_inputs(cls, cfg):
        down = _down(cfg)
        return {"a": down, "b": down}


@VIEWS.register("identity")
class IdentityView(ViewKind):
    """``image`` = augment(downsample(x, r)): the supervised baseline's one view.

    On a masks-only mask_pairs source (``data.input: mask``) it reads the masks,
    geometrically augmented (supervised training on masks, More From Less Table 2).
    """

    name = "identity"
    outputs = ("image",)
    reads_images = False

    @classmethod
    def branch_inputs(cls, cfg):
        return {"image": "mask" if getattr(cfg.data, "input", "image") == "mask" else _down(cfg)}

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        d = cfg.data
        if d.source == "mask_pairs" and d.input == "mask" and cfg.views.downsample is not None:
            raise ConfigError("data.input=mask trains on full-resolution masks: set views.downsample=null")


@VIEWS.register("eval")
class EvalView(IdentityView):
    """``image`` = downsample(x, r), never augmented (feature extraction, prediction)."""

    name = "eval"
