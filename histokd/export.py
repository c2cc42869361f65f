"""Export: per-branch encoders and uint8-in classifiers as ``.keras``, plus metadata.

A classifier takes uint8 RGB images of the working size and does all preprocessing
itself — scaling to [0, 1], stain normalisation when the run used it, downsampling for a
sparse-branch encoder — so ``keras.saving.load_model(path)`` after ``import histokd`` is
all a deployment needs. ``metadata.json`` records classes, input size, downsample size,
stain target and the config hash. ``export.saved_model: true`` also writes a TF
SavedModel (``model.export``) for TF Serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from histokd._version import __version__
from histokd.errors import DataError


def build_classifier(encoder, head, image_size, downsample=None, stain_layer=None, name="classifier"):
    """uint8 image → class probabilities.

    Args:
        encoder: keras.Model. Images in [0, 1] → features.
        head: keras layer or model. Features → probabilities.
        image_size: int. Input side in pixels.
        downsample: int. Downsample to this side (and back) before the encoder (sparse branch).
        stain_layer: keras layer. Optional stain normalisation on uint8 input.
    """
    from histokd.data.views import Downsample

    inp = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = inp
    if stain_layer is not None:
        x = stain_layer(x)
    x = keras.layers.Rescaling(1.0 / 255, name="to_unit_range")(x)
    if downsample and downsample < image_size:
        x = Downsample(downsample, image_size, name="downsample")(x)
    feats = encoder(x)
    probs = head(feats)
    return keras.Model(inp, probs, name=name)


def _stain_layer(stain):
    """The exported copy of the run's stain step: a :class:`MacenkoNormalization` on uint8 input."""
    if stain is None or stain.normalizer is None:
        return None
    from histokd.stain import MacenkoNormalization

    return MacenkoNormalization(fit=stain.normalizer.target_fit, name="stain_normalization",
                                **stain.normalizer.constants)


def export_run(cfg, model, heads: dict, source, run_dir, stain=None) -> dict:
    """Write ``export/encoder_<branch>.keras``, ``export/classifier_<branch>.keras`` and
    ``export/metadata.json`` for a trained run.

    Args:
        stain: the run's :class:`histokd.stain.StainFn` (or None); image classifiers get the
            same normalisation as a layer, with the fitted target stored in the metadata.
    """
    out = Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.data.image_size
    stain_layer = _stain_layer(stain)
    meta = {
        "histokd_version": __version__,
        "config_name": cfg.name,
        "config_hash": cfg.hash(),
        "method": cfg.model.method,
        "backbone": cfg.model.backbone,
        "class_names": list(source.class_names),
        "input_size": size,
        "input_dtype": "uint8",
        "downsample": cfg.views.downsample,
        "views": cfg.views.kind,
        "data_source": cfg.data.source,
        "label": cfg.data.label if cfg.data.source == "mask_pairs" else None,
        "input": cfg.data.input if cfg.data.source == "mask_pairs" else None,
        "stain": dict(vars(cfg.data.stain), **(stain.metadata() if stain is not None else {})),
        "mpp": getattr(source, "mpp", None),
        "encoders": {},
        "classifiers": {},
    }
    saved = set()
    for branch, enc in model.branch_encoders().items():
        if id(enc) in saved:
            meta["encoders"][branch] = meta["encoders"][next(b for b, e in model.branch_encoders().items() if e is enc)]
            continue
        path = out / f"encoder_{branch}.keras"
        enc.save(path)
        saved.add(id(enc))
        meta["encoders"][branch] = path.name
    for branch, info in heads.items():
        r = cfg.views.downsample if info["kind"] == "downsampled" else None
        # masks are never stain-normalised
        layer = None if info["kind"] == "mask" else stain_layer
        clf = build_classifier(info["encoder"], info["head"], size, downsample=r, stain_layer=layer,
                               name=f"classifier_{branch}")
        path = out / f"classifier_{branch}.keras"
        clf.save(path)
        meta["classifiers"][branch] = {"file": path.name, "input": info["kind"], "downsample": r}
        if cfg.export.saved_model:
            clf.export(str(out / f"saved_model_{branch}"), verbose=False)
    (out / "metadata.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_classifier(path):
    """Load an exported classifier and its metadata (``metadata.json`` beside it, if any).

    Returns:
        (keras.Model, dict metadata)
    """
    path = Path(path)
    if path.is_dir():
        meta_path = path / "metadata.json"
        if not meta_path.exists():
            raise DataError(f"{path} is not an export folder (no metadata.json); pass a .keras file "
                            "or a run's export/ directory")
        meta = json.loads(meta_path.read_text())
        first = next(iter(meta["classifiers"].values()))["file"]
        path = path / first
    if not path.exists():
        raise DataError(f"model file {path} does not exist")
    model = keras.saving.load_model(path)
    meta_path = path.parent / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return model, meta
