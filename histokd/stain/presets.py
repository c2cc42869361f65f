"""Macenko targets: named presets and resolution of user-given targets.

A target is what the normaliser maps every tile to: a stain matrix (H and E
OD vectors) and the 99th-percentile max concentrations. Users give it as a
preset name, an image file (fitted on load), a JSON fit file, a dict or a
:class:`~histokd.stain.macenko.MacenkoFit`.

Presets:
    torchstain: torchstain's default HERef / maxCRef (from schaugf/HEnorm_python),
        the de-facto reference target (default).
    slideflow_v3: slideflow's default ("v3") Macenko target. slideflow fits it
        with Io=255 and a brightness standardisation; here it is used with this
        normaliser's own Io, so colours differ slightly from slideflow's.

Example:
    >>> from histokd.stain.presets import resolve_target
    >>> resolve_target("torchstain").max_concentrations
    (1.9705, 1.0308)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import numpy as np

from histokd.errors import StainError
from histokd.stain.macenko import MacenkoFit, fit_macenko

PRESETS: Dict[str, MacenkoFit] = {
    "torchstain": MacenkoFit(
        [[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]],
        [1.9705, 1.0308],
        source="preset:torchstain",
    ),
    "slideflow_v3": MacenkoFit(
        [[0.5063, 0.2219], [0.7532, 0.8652], [0.4069, 0.4224]],
        [1.7657, 1.2797],
        source="preset:slideflow_v3",
    ),
}


def preset_names():
    """Names accepted as ``target``."""
    return sorted(PRESETS)


def resolve_target(target: Any = "torchstain", **constants) -> MacenkoFit:
    """Turn a user-given target into a :class:`MacenkoFit`.

    Args:
        target: None or a preset name; a path to an image (PNG/JPEG/TIFF; fitted
            with ``constants``) or to a ``.json`` fit; a MacenkoFit; a dict as
            written by ``MacenkoFit.to_dict``; or uint8 image array(s) to fit.
        **constants: Macenko constants used when fitting an image.

    Returns:
        MacenkoFit.

    Raises:
        StainError: unknown name, missing file, or an image without usable tissue.
    """
    if target is None:
        target = "torchstain"
    if isinstance(target, MacenkoFit):
        return target
    if isinstance(target, dict):
        return MacenkoFit.from_dict(target)
    if isinstance(target, (str, os.PathLike)):
        name = str(target)
        if name.lower() in PRESETS:
            return PRESETS[name.lower()]
        p = Path(name).expanduser()
        if p.is_file():
            if p.suffix.lower() == ".json":
                fit = MacenkoFit.from_json(str(p))
                return MacenkoFit(fit.stain_matrix, fit.max_concentrations,
                                  fit.source or f"json:{p}", fit.extra)
            from histokd.stain.io import read_rgb

            fit = fit_macenko(read_rgb(p), **constants)
            return MacenkoFit(fit.stain_matrix, fit.max_concentrations, f"image:{p}", fit.extra)
        raise StainError(
            f"unknown stain target {name!r}: not a preset ({', '.join(preset_names())}) and "
            "not an existing image or .json file; pass a preset name or a path to a target image"
        )
    if isinstance(target, (np.ndarray, list, tuple)) or hasattr(target, "numpy"):
        fit = fit_macenko(target, **constants)
        return MacenkoFit(fit.stain_matrix, fit.max_concentrations, "images", fit.extra)
    raise StainError(
        f"cannot use {type(target).__name__} as a stain target; pass a preset name, a path, "
        "a MacenkoFit, a dict or an image array"
    )
