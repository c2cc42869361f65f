"""Nuclear-type masks for tissue/nuclei distillation and the paired image/mask dataset.

More From Less §2.1 ("Tissue-Nuclei Distillation"): every image is segmented with
HoVer-Net and only "the mask of the nuclei, coloured by their predicted types
(Background, Neoplastic, Inflammatory, Connective, Dead, Non-Neoplastic
Epithelial)" is kept; "we repeat these 1D masks 3 times along channel 3". The
nucleus-counting task labels each image with "the cell type most present", and
"images were only given the label 'Background' if there were no nuclei present".

:func:`build_mask_dataset` (``histokd masks SRC DST --weights PATH``) writes the
pairs as TFRecord shards plus a CSV of counts and labels, and resumes an
interrupted run without redoing committed shards.

TFRecord features (one example per image; see :data:`FEATURES`):

* ``image_png`` bytes — the RGB image, PNG (lossless re-encode of the source);
* ``mask_png`` bytes — the 3-channel mask PNG: the per-pixel type id repeated 3×
  (× ``mask_scale``);
* ``label`` int64 — most-present type id (0 = Background: no nucleus);
* ``counts`` int64[num_types] — nuclei per type id (index 0 always 0);
* ``num_nuclei`` int64; ``tissue`` bytes — the image's parent folder name (the
  tissue class in Kather-style folder datasets); ``tissue_label`` int64 — its
  index in the sorted folder names (−1 when images are not in folders);
  ``path`` bytes — path relative to SRC; ``height``/``width`` int64;
  ``mask_scale`` int64.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from histokd.errors import BadImageError, ConfigError, DataError, WeightsError
from histokd.nuclei.postprocess import NucleiResult

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SHARD_PATTERN = "masks-{:05d}"
COUNTS_CSV = "counts.csv"
INFO_JSON = "dataset.json"


def _pannuke():
    from histokd.nuclei.hovernet import PANNUKE_PALETTE, PANNUKE_TYPE_NAMES

    return PANNUKE_TYPE_NAMES, PANNUKE_PALETTE


# ------------------------------------------------------------------ masks and labels

def type_map_of(result: NucleiResult) -> np.ndarray:
    """[H, W] uint8 per-pixel type id of a segmentation (0 outside nuclei)."""
    return result.type_map()


def type_mask(type_map: np.ndarray, scale: int = 1) -> np.ndarray:
    """The paper's mask: the 1-channel type-id map repeated to 3 channels.

    Args:
        type_map: [H, W] int type ids (0 = background).
        scale: int. Multiply ids (1 = raw ids as the paper; 51 spreads PanNuke's
            0–5 over 0–255 for viewing or for encoders that expect that range).

    Returns:
        [H, W, 3] uint8.

    Example:
        >>> type_mask(np.array([[0, 2]]))[0, 1].tolist()
        [2, 2, 2]
    """
    tm = np.asarray(type_map).astype(np.int64) * int(scale)
    if tm.max(initial=0) > 255:
        raise DataError(f"type ids × scale reach {tm.max()}, above 255; use a smaller mask scale")
    return np.repeat(tm.astype(np.uint8)[..., None], 3, axis=-1)


def colour_mask(type_map: np.ndarray, palette: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB rendering of a type map with the official PanNuke palette (for viewing).

    Args:
        type_map: [H, W] int type ids.
        palette: [T, 3] uint8 or None (PanNuke: black, red, green, blue, yellow, orange).

    Returns:
        [H, W, 3] uint8.

    Example:
        >>> colour_mask(np.array([[1]]))[0, 0].tolist()
        [255, 0, 0]
    """
    if palette is None:
        palette = _pannuke()[1]
    palette = np.asarray(palette, np.uint8)
    tm = np.asarray(type_map).astype(np.int64)
    if tm.max(initial=0) >= len(palette):
        raise DataError(f"type id {tm.max()} has no colour in a palette of {len(palette)}")
    return palette[tm]


def nucleus_counts(result: NucleiResult, num_types: int) -> np.ndarray:
    """Nuclei per type id 0..num_types−1 (index 0, background, stays 0 by construction).

    Example:
        >>> nucleus_counts(NucleiResult(np.zeros((2, 2), np.int32)), 6).tolist()
        [0, 0, 0, 0, 0, 0]
    """
    return result.counts(num_types)


def most_present_type(counts: Sequence[int]) -> int:
    """The nucleus-counting label: the type with most nuclei; 0 (Background) only if none.

    Ties go to the lower type id.

    Example:
        >>> most_present_type([0, 3, 5, 5, 0, 1]), most_present_type([0, 0, 0])
        (2, 0)
    """
    counts = np.asarray(counts)
    if counts.size <= 1 or counts[1:].sum() == 0:
        return 0
    return int(np.argmax(counts[1:]) + 1)


# ------------------------------------------------------------------ segmenters

class _Segmenter:
    """Turns batches of RGB images into :class:`NucleiResult` s."""

    method: str
    type_names: Tuple[str, ...]
    palette: np.ndarray

    def __call__(self, images: List[np.ndarray]) -> List[NucleiResult]:  # pragma: no cover
        raise NotImplementedError


class _ClassicalSegmenter(_Segmenter):
    def __init__(self, mpp):
        from histokd.nuclei.classical import CLASSICAL_PALETTE, CLASSICAL_TYPE_NAMES

        self.method, self.mpp = "classical", mpp
        self.type_names, self.palette = CLASSICAL_TYPE_NAMES, CLASSICAL_PALETTE

    def __call__(self, images):
        from histokd.nuclei.classical import segment_classical

        return [segment_classical(im, mpp=self.mpp) for im in images]


class _HoVerNetSegmenter(_Segmenter):
    def __init__(self, model, mpp, batch_size):
        self.method, self.model, self.mpp, self.batch_size = "hovernet", model, mpp, batch_size
        names, palette = _pannuke()
        n = max(int(getattr(model, "num_types", 0)), 2)
        if n == len(names):
            self.type_names, self.palette = names, palette
        else:  # a model trained on another type set: generic names, palette cycled
            self.type_names = ("Background",) + tuple(f"Type {i}" for i in range(1, n))
            self.palette = palette[np.r_[0, (np.arange(1, n) - 1) % 5 + 1]]
        if not getattr(model, "num_types", 0):
            self.type_names, self.palette = ("Background", "Unknown"), np.array([[0, 0, 0], [255, 255, 255]], np.uint8)

    def __call__(self, images):
        from histokd.nuclei.tiling import segment_many

        results = segment_many(self.model, images, mpp=self.mpp, batch_size=self.batch_size,
                               progress=False)
        if not getattr(self.model, "num_types", 0):  # no type branch: every nucleus "Unknown"
            for res in results:
                for nuc in res.nuclei.values():
                    nuc.type, nuc.type_prob = 1, 1.0
        return results


def _make_segmenter(method, weights, mpp, batch_size) -> _Segmenter:
    if method == "classical":
        return _ClassicalSegmenter(mpp)
    if method != "hovernet":
        raise ConfigError(f"method {method!r} is unknown; use 'hovernet' (needs --weights) or 'classical'")
    if weights is None:
        raise WeightsError("method 'hovernet' needs the official HoVer-Net weights: pass --weights PATH "
                           "(e.g. hovernet_fast_pannuke_type_tf2pytorch.tar; CC BY-NC-SA 4.0, not bundled) "
                           "or use --method classical (no weights, no nuclear types)")
    if isinstance(weights, (str, os.PathLike)):
        from histokd.nuclei.checkpoint import load_official_checkpoint

        model = load_official_checkpoint(weights)
    else:
        model = weights  # an already built model
    if hasattr(model, "fused"):  # a HoVerNet: fold BN for faster inference (same outputs)
        from histokd.nuclei.hovernet import fuse_batchnorm

        model = fuse_batchnorm(model)
    return _HoVerNetSegmenter(model, mpp, batch_size)


# ------------------------------------------------------------------ dataset builder

FEATURES = ("image_png", "mask_png", "label", "counts", "num_nuclei", "tissue", "tissue_label",
            "path", "height", "width", "mask_scale")


def list_images(src: Union[str, Path]) -> List[Path]:
    """Image files under ``src`` (recursive, sorted, by extension)."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"source {src} does not exist; pass a folder of images (class sub-folders allowed)")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (gray/RGBA/16-bit converted)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise BadImageError(f"cannot decode image {path}; remove or replace it, or pass on_bad_image='skip'")
    if img.dtype == np.uint16:
        img = (img / 257.0).round().astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=-1)
    if img.shape[-1] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover
        raise DataError("PNG encoding failed")
    return buf.tobytes()


def _example(tf, image, mask, label, counts, tissue, tissue_label, rel, mask_scale):
    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(np.atleast_1d(v).astype(np.int64))))

    feats = {
        "image_png": b(_png(image)), "mask_png": b(_png(mask)), "label": i(label),
        "counts": i(counts), "num_nuclei": i(int(np.sum(counts))), "tissue": b(tissue.encode()),
        "tissue_label": i(tissue_label), "path": b(rel.encode()), "height": i(image.shape[0]),
        "width": i(image.shape[1]), "mask_scale": i(mask_scale),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _committed_shards(dst: Path):
    """Shards whose TFRecord and CSV both exist; removes leftovers of an interrupted shard."""
    for tmp in dst.glob("*.tmp"):
        tmp.unlink()
    done = {}
    for rec in sorted(dst.glob("masks-*.tfrecord")):
        side = rec.with_suffix(".csv")
        if side.exists():
            done[int(rec.stem.split("-")[1])] = side
        else:  # record renamed but CSV not: shard not committed
            rec.unlink()
    return done


def build_mask_dataset(src, dst, weights=None, method: str = "hovernet", mpp: Optional[float] = None,
                       batch_size: int = 4, progress: bool = True, shard_size: int = 64,
                       mask_scale: int = 1, on_bad_image: str = "error") -> Dict[str, object]:
    """Segment every image under ``src`` and write paired image/mask TFRecords + a counts CSV.

    The More From Less tissue/nuclei distillation data (§2.1, Table 2): for each
    image, the nuclear-type mask (type id per pixel, repeated to 3 channels),
    the per-type nucleus counts and the most-present-type label (Background only
    without nuclei). Output in ``dst``: ``masks-NNNNN.tfrecord`` shards (features
    in this module's docstring), one ``masks-NNNNN.csv`` per shard, the merged
    ``counts.csv`` and ``dataset.json`` (method, type names, palette, mpp, …).

    Resumable: a shard is committed when its TFRecord and CSV are both renamed
    into place; a rerun skips every image of a committed shard and redoes at most
    the one shard that was being written.

    Args:
        src: folder of images (class sub-folders give the ``tissue`` feature), or one image.
        dst: output folder (created).
        weights: path of an official HoVer-Net checkpoint (``.tar``/``.pth``/``.npz``)
            or a built :class:`HoVerNet`; required for ``method="hovernet"``.
        method: ``"hovernet"`` or ``"classical"`` (no weights; no types — every
            nucleus is type 1 "Unknown").
        mpp: float or None. Resolution of the source images in µm/px; HoVer-Net
            input is resampled to 0.25 µm/px and the masks back to the image size.
            None = the images are already at 0.25 µm/px.
        batch_size: int. HoVer-Net windows per forward pass.
        progress: bool. tqdm progress bar over images.
        shard_size: int. Images per TFRecord shard (the unit of resumption).
        mask_scale: int. Multiplier of the type ids in ``mask_png`` (1 = paper).
        on_bad_image: ``"error"`` or ``"skip"`` (skips are counted in the summary).

    Returns:
        dict summary: ``written``, ``skipped_existing``, ``bad_images``, ``shards``,
        ``counts_csv``, ``type_names``.

    Example:
        >>> build_mask_dataset("kather/train", "masks/", weights="hovernet_fast_pannuke_type_tf2pytorch.tar",
        ...                    mpp=0.5)  # doctest: +SKIP
    """
    import tensorflow as tf
    from tqdm.auto import tqdm

    if on_bad_image not in ("error", "skip"):
        raise ConfigError(f"on_bad_image={on_bad_image!r}; use 'error' or 'skip'")
    if int(shard_size) < 1 or int(batch_size) < 1:
        raise ConfigError("shard_size and batch_size must be ≥ 1")
    src = Path(src)
    files = list_images(src)
    root = src if src.is_dir() else src.parent
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    info_path = dst / INFO_JSON
    if info_path.exists():
        old = json.loads(info_path.read_text())
        if old.get("method") != method or old.get("mask_scale") != int(mask_scale) or old.get("mpp") != mpp:
            raise ConfigError(f"{dst} already holds a mask dataset made with method={old.get('method')!r}, "
                              f"mpp={old.get('mpp')}, mask_scale={old.get('mask_scale')}; use a new "
                              "destination or the same settings to resume")

    segmenter = _make_segmenter(method, weights, mpp, batch_size)
    num_types = len(segmenter.type_names)
    tissues = sorted({p.parent.name for p in files if p.parent != root})
    tissue_index = {t: i for i, t in enumerate(tissues)}
    header = ["path", "tissue", "tissue_label", "label", "label_name", "num_nuclei"] + [
        f"count_{n}" for n in segmenter.type_names]
    info = {"method": method, "mpp": mpp, "model_mpp": 0.25, "mask_scale": int(mask_scale),
            "type_names": list(segmenter.type_names), "palette": segmenter.palette.tolist(),
            "tissue_names": tissues, "features": list(FEATURES), "num_types": num_types,
            "weights": None if weights is None or not isinstance(weights, (str, os.PathLike))
            else Path(weights).name,
            "note": "classical: no nuclear types, every nucleus is type 1 'Unknown'" if method == "classical"
            or num_types == 2 else "types from HoVer-Net's TP branch (majority vote per nucleus)"}
    info_path.write_text(json.dumps(info, indent=1))

    committed = _committed_shards(dst)
    done = set()
    for side in committed.values():
        with open(side, newline="") as f:
            done.update(row["path"] for row in csv.DictReader(f))
    rels = [p.relative_to(root).as_posix() for p in files]
    todo = [(p, r) for p, r in zip(files, rels) if r not in done]
    next_shard = max(committed, default=-1) + 1
    summary = {"written": 0, "skipped_existing": len(files) - len(todo), "bad_images": [],
               "type_names": list(segmenter.type_names)}

    bar = tqdm(total=len(files), initial=len(files) - len(todo), desc=f"nuclear masks ({method})",
               unit="img", disable=(not progress) or None)
    try:
        for start in range(0, len(todo), int(shard_size)):
            chunk = todo[start:start + int(shard_size)]
            name = SHARD_PATTERN.format(next_shard)
            rec_tmp, csv_tmp = dst / f"{name}.tfrecord.tmp", dst / f"{name}.csv.tmp"
            rows = []
            with tf.io.TFRecordWriter(str(rec_tmp)) as writer:
                step = max(1, int(batch_size))
                for b in range(0, len(chunk), step):
                    part, images = [], []
                    for path, rel in chunk[b:b + step]:
                        try:
                            images.append(read_rgb(path))
                            part.append((path, rel))
                        except BadImageError:
                            if on_bad_image == "error":
                                raise
                            summary["bad_images"].append(rel)
                            bar.update(1)
                    if not images:
                        continue
                    for (path, rel), image, res in zip(part, images, segmenter(images)):
                        counts = nucleus_counts(res, num_types)
                        label = most_present_type(counts)
                        tissue = path.parent.name if path.parent != root else ""
                        mask = type_mask(res.type_map(), mask_scale)
                        writer.write(_example(tf, image, mask, label, counts, tissue,
                                              tissue_index.get(tissue, -1), rel, int(mask_scale)))
                        rows.append([rel, tissue, tissue_index.get(tissue, -1), label,
                                     segmenter.type_names[label], int(counts.sum())] + counts.tolist())
                        summary["written"] += 1
                        bar.update(1)
            with open(csv_tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(header)
                w.writerows(rows)
            # commit: the TFRecord first, then the CSV that marks the shard as done
            os.replace(rec_tmp, dst / f"{name}.tfrecord")
            os.replace(csv_tmp, dst / f"{name}.csv")
            next_shard += 1
    finally:
        bar.close()

    shards = sorted(dst.glob("masks-*.csv"))
    with open(dst / COUNTS_CSV, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(header)
        for side in shards:
            with open(side, newline="") as f:
                r = csv.reader(f)
                next(r, None)
                w.writerows(r)
    summary["shards"] = len(shards)
    summary["counts_csv"] = str(dst / COUNTS_CSV)
    if summary["bad_images"]:
        print(f"histokd masks: skipped {len(summary['bad_images'])} undecodable image(s), "
              f"e.g. {summary['bad_images'][0]}")
    return summary


def masks_command(src, dst, weights=None, method: str = "hovernet", mpp: Optional[float] = None,
                  batch_size: int = 4, progress: bool = True) -> Dict[str, object]:
    """Entry point of ``histokd masks SRC DST --weights PATH [--method classical] [--mpp X]``."""
    return build_mask_dataset(src, dst, weights=weights, method=method, mpp=mpp,
                              batch_size=batch_size, progress=progress)


# ------------------------------------------------------------------ reading the pairs

def parse_mask_example(serialized, decode: bool = True):
    """Parse one TFRecord example of a mask dataset (in-graph, for ``tf.data``).

    Returns a dict with the features; with ``decode=True`` ``image`` and ``mask``
    are uint8 [H, W, 3] tensors instead of the PNG bytes.
    """
    import tensorflow as tf

    spec = {
        "image_png": tf.io.FixedLenFeature([], tf.string),
        "mask_png": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "counts": tf.io.VarLenFeature(tf.int64),
        "num_nuclei": tf.io.FixedLenFeature([], tf.int64),
        "tissue": tf.io.FixedLenFeature([], tf.string),
        "tissue_label": tf.io.FixedLenFeature([], tf.int64),
        "path": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "mask_scale": tf.io.FixedLenFeature([], tf.int64),
    }
    ex = tf.io.parse_single_example(serialized, spec)
    ex["counts"] = tf.sparse.to_dense(ex["counts"])
    if decode:
        ex["image"] = tf.io.decode_png(ex.pop("image_png"), channels=3)
        ex["mask"] = tf.io.decode_png(ex.pop("mask_png"), channels=3)
    return ex


def mask_dataset(dst, decode: bool = True):
    """A ``tf.data.Dataset`` of the pairs written by :func:`build_mask_dataset`.

    Example:
        >>> ds = mask_dataset("masks/")  # doctest: +SKIP
        >>> ex = next(iter(ds)); ex["image"].shape, ex["mask"].shape, ex["label"]  # doctest: +SKIP
    """
    import tensorflow as tf

    files = sorted(str(p) for p in Path(dst).glob("masks-*.tfrecord"))
    if not files:
        raise DataError(f"no mask shards (masks-*.tfrecord) in {dst}; run `histokd masks SRC {dst}` first")
    return tf.data.TFRecordDataset(files).map(lambda s: parse_mask_example(s, decode),
                                              num_parallel_calls=tf.data.AUTOTUNE)
