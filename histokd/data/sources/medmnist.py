"""MedMNIST v2 ``.npz`` files, 2-D (``data.source: medmnist``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from histokd.data.sources.arrays import ArraySource, array_to_rgb_uint8
from histokd.data.sources.base import SPLITS, _need_path
from histokd.errors import DataError
from histokd.registry import SOURCES

MEDMNIST_LABELS = {
    "pneumoniamnist": ["normal", "pneumonia"],
    "breastmnist": ["malignant", "normal, benign"],
    "pathmnist": ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma", "colorectal adenocarcinoma epithelium"],
    "bloodmnist": ["basophil", "eosinophil", "erythroblast", "immature granulocytes", "lymphocyte",
                   "monocyte", "neutrophil", "platelet"],
}


@SOURCES.register("medmnist")
class MedMNISTSource(ArraySource):
    """A MedMNIST v2 ``.npz`` (2-D): ``{train,val,test}_images`` / ``_labels``.

    Images ``[N,H,W]`` (grey) or ``[N,H,W,3]`` become RGB uint8; labels ``[N,1]``
    or ``[N]``. Multi-label files (``[N,K]`` labels, e.g. ChestMNIST) and 3-D
    volumes (``[N,D,H,W]``, the ``*mnist3d`` files) are rejected with a message.

    Args:
        npz_path: str. The ``.npz`` file.
        class_names: optional list[str]. Overrides names from ``info`` / the file name.
        info: optional MedMNIST INFO entry (``{"label": {"0": "normal", ...}}``), a
            mapping label → name, or a list of names.

    Example:
        >>> src = MedMNISTSource("pneumoniamnist.npz")  # doctest: +SKIP
        >>> src.class_names                              # doctest: +SKIP
        ['normal', 'pneumonia']
    """

    def __init__(self, npz_path, class_names=None, info=None):
        super().__init__()
        self.npz_path = Path(npz_path).expanduser()
        if not self.npz_path.is_file():
            raise DataError(f"MedMNIST file {str(self.npz_path)!r} does not exist")
        try:
            with np.load(self.npz_path, allow_pickle=False) as z:
                keys = set(z.files)
                shapes = {k: z[k].shape for k in keys if k.endswith(("_images", "_labels"))}
        except Exception as exc:  # zipfile/ValueError/OSError: not an npz
            raise DataError(f"cannot read {str(self.npz_path)!r} as a MedMNIST .npz: {exc}") from None
        if "train_images" not in keys or "train_labels" not in keys:
            raise DataError(f"{str(self.npz_path)!r} is not in the MedMNIST layout: expected arrays "
                            f"train_images/train_labels (and val_*, test_*), found {sorted(keys)}")
        for s in SPLITS:
            if f"{s}_images" in keys and f"{s}_labels" not in keys:
                raise DataError(f"{str(self.npz_path)!r} has {s}_images but no {s}_labels")
            if f"{s}_images" not in keys:
                continue
            xs, ys = shapes[f"{s}_images"], shapes[f"{s}_labels"]
            is_3d = len(xs) == 5 or (len(xs) == 4 and xs[-1] not in (1, 3, 4))
            if is_3d:
                raise DataError(f"{str(self.npz_path)!r} holds 3-D volumes ({s}_images shape {xs}); "
                                "MedMNISTSource reads 2-D images only — use the 3-D data path "
                                "(SwinFUSE, *mnist3d) for volumes")
            if len(xs) not in (3, 4):
                raise DataError(f"{s}_images of {str(self.npz_path)!r} has shape {xs}; expected [N,H,W] or [N,H,W,3]")
            if len(ys) == 2 and ys[1] > 1:
                raise DataError(f"{str(self.npz_path)!r} is multi-label ({s}_labels shape {ys}); only "
                                "single-label classification is supported")
            if ys[0] != xs[0]:
                raise DataError(f"{str(self.npz_path)!r}: {s}_images has {xs[0]} images but {s}_labels "
                                f"has {ys[0]} labels")
        self._shapes = shapes
        self._loaded = False
        self._names_arg = class_names
        self._info = info
        self._load()

    def _load(self):
        if self._loaded:
            return
        with np.load(self.npz_path, allow_pickle=False) as z:
            for s in SPLITS:
                if f"{s}_images" in z.files:
                    x = array_to_rgb_uint8(z[f"{s}_images"])
                    y = np.asarray(z[f"{s}_labels"]).reshape(-1).astype(np.int64)
                    self._arrays[s] = (x, y)
        self._loaded = True
        all_y = np.concatenate([a[1] for a in self._arrays.values() if a is not None])
        if all_y.size and all_y.min() < 0:
            raise DataError(f"{str(self.npz_path)!r} has negative labels")
        k = int(all_y.max()) + 1 if all_y.size else 0
        self.class_names = self._resolve_names(k)

    def _resolve_names(self, k):
        names = None
        if self._names_arg is not None:
            names = [str(c) for c in self._names_arg]
        elif self._info is not None:
            info = self._info.get("label", self._info) if isinstance(self._info, Mapping) else self._info
            if isinstance(info, Mapping):
                names = [str(info.get(str(i), info.get(i, i))) for i in range(max(k, len(info)))]
            else:
                names = [str(c) for c in info]
        else:
            m = re.match(r"([a-z]+mnist)(?:_|$)", self.npz_path.stem.lower())
            if m and m.group(1) in MEDMNIST_LABELS and len(MEDMNIST_LABELS[m.group(1)]) >= k:
                names = list(MEDMNIST_LABELS[m.group(1)])
        if names is None:
            names = [str(i) for i in range(k)]
        if len(names) < k:
            raise DataError(f"{str(self.npz_path)!r} has labels up to {k - 1} but only {len(names)} class "
                            f"names were given: {names}")
        return names

    def describe(self):
        return {"type": "medmnist", "path": str(self.npz_path)}

    @classmethod
    def from_config(cls, data_cfg) -> "MedMNISTSource":
        """Build from a ``data`` section: ``path`` (the ``.npz``)."""
        return cls(_need_path(data_cfg, "medmnist"))
