"""``histokd normalize``: Macenko-normalise a folder of tiles into a mirror folder.

More From Less §2.3 colour-normalises every patch with Macenko before
training; this job does it once, offline, for a folder tree of PNG/JPEG/TIFF
tiles. Outputs mirror the input tree (same relative paths and formats); each
file is written to a temporary name and renamed when complete, so an
interrupted run resumes by skipping the outputs that exist. Tiles that fail
the robustness policy are copied unchanged and listed in the summary.

Example:
    >>> from histokd.stain import normalize_folder
    >>> summary = normalize_folder("tiles/", "tiles_norm/", target="torchstain", report=True)
    >>> summary["passed_through"], summary["report"]
    (3, 'tiles_norm/normalize_report.png')
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from histokd.errors import BadImageError, DataError, StainError
from histokd.stain.io import IMAGE_SUFFIXES, read_rgb, write_rgb

REPORT_NAME = "normalize_report.png"
_TMP_TAG = ".histokd-tmp"
_REPORT_TILES = 8
_THUMB = 128


def _walk(src: Path, dst: Path) -> List[Path]:
    """Image files under src (sorted, relative), skipping dst when it lies inside src."""
    out = []
    dst_res = dst.resolve()
    for root, dirs, files in os.walk(src):
        rp = Path(root)
        dirs[:] = sorted(d for d in dirs if (rp / d).resolve() != dst_res)
        for f in sorted(files):
            if f.lower().endswith(IMAGE_SUFFIXES) and _TMP_TAG not in f:
                out.append((rp / f).relative_to(src))
    return out


def _tmp_path(final: Path) -> Path:
    # keep the suffix last so the encoder picks the right format
    return final.with_name(f".{final.stem}{_TMP_TAG}{final.suffix}")


def _write_atomic(final: Path, rgb: Optional[np.ndarray], copy_from: Optional[Path] = None):
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        else:
            write_rgb(tmp, rgb)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _thumb(rgb: np.ndarray, size: int = _THUMB) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    s = size / max(h, w)
    t = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    canvas = np.full((size, size, 3), 255, np.uint8)
    canvas[: t.shape[0], : t.shape[1]] = t
    return canvas


def _write_report(path: Path, samples: List[Tuple[np.ndarray, np.ndarray, bool, str]]):
    """Before/after grid: pairs of rows (before above after), passthrough tiles framed red."""
    import cv2

    cols = min(len(samples), _REPORT_TILES)
    label_w, pad = 70, 4
    blocks = []
    for start in range(0, len(samples), cols):
        chunk = samples[start:start + cols]
        rows = []
        for which, label in ((0, "before"), (1, "after")):
            strip = np.full((_THUMB + 2 * pad, label_w + cols * (_THUMB + pad) + pad, 3), 255, np.uint8)
            cv2.putText(strip, label, (4, _THUMB // 2 + pad), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (0, 0, 0), 1, cv2.LINE_AA)
            for j, (before, after, passed, _name) in enumerate(chunk):
                t = _thumb(before if which == 0 else after)
                if passed and which == 1:
                    cv2.rectangle(t, (0, 0), (_THUMB - 1, _THUMB - 1), (255, 0, 0), 3)
                x0 = label_w + pad + j * (_THUMB + pad)
                strip[pad:pad + _THUMB, x0:x0 + _THUMB] = t
            rows.append(strip)
        blocks.append(np.concatenate(rows, axis=0))
        blocks.append(np.full((2 * pad, blocks[-1].shape[1], 3), 200, np.uint8))
    grid = np.concatenate(blocks[:-1], axis=0)
    _write_atomic(path, grid)


def normalize_folder(
    src,
    dst,
    target: Any = "torchstain",
    batch_size: int = 64,
    report: bool = False,
    on_failure: str = "passthrough",
    progress: bool = True,
    **constants,
) -> Dict[str, Any]:
    """Normalise every PNG/JPEG/TIFF under ``src`` into the mirror tree ``dst``.

    Args:
        src: path. Input folder (searched recursively).
        dst: path. Output folder; created; must differ from ``src`` (it may lie
            inside it, and is then skipped by the search).
        target: preset name ("torchstain"), target image path, JSON fit path, fit or dict.
        batch_size: int. Tiles normalised per batched call.
        report: bool. Also write a before/after thumbnail grid to
            ``dst/normalize_report.png`` (tiles passed through are framed red).
        on_failure: "passthrough" (copy failing tiles unchanged, list them) or
            "error" (raise StainError naming them; finished outputs are kept).
        progress: bool. Show a tqdm progress bar.
        **constants: Macenko constants (``io``, ``alpha``, ``beta``, ...).

    Returns:
        dict: ``found``, ``written``, ``skipped_existing``, ``passed_through`` and
        ``passed_through_files``, ``unreadable`` and ``unreadable_files`` (skipped,
        not written), ``target`` (the fit as a dict), ``report`` (path or None),
        ``seconds``, ``src``, ``dst``.

    Raises:
        DataError: ``src`` is missing or equals ``dst``.
        StainError: bad target, or a failing tile with ``on_failure="error"``.
    """
    from tqdm.auto import tqdm

    from histokd.stain.normalizer import MacenkoNormalizer

    t0 = time.perf_counter()
    src_p, dst_p = Path(src).expanduser(), Path(dst).expanduser()
    if not src_p.is_dir():
        raise DataError(f"source folder not found: {src_p}; pass an existing folder of tiles")
    if src_p.resolve() == dst_p.resolve():
        raise DataError(f"destination must differ from source ({src_p}); pass a new folder")
    if on_failure not in ("passthrough", "error"):
        raise StainError(f"unknown on_failure {on_failure!r}; use 'passthrough' or 'error'")
    batch_size = max(1, int(batch_size))
    norm = MacenkoNormalizer(target, **constants)
    dst_p.mkdir(parents=True, exist_ok=True)

    files = _walk(src_p, dst_p)
    todo = [r for r in files if not (dst_p / r).is_file()]
    summary: Dict[str, Any] = {
        "src": str(src_p),
        "dst": str(dst_p),
        "found": len(files),
        "written": 0,
        "skipped_existing": len(files) - len(todo),
        "passed_through": 0,
        "passed_through_files": [],
        "unreadable": 0,
        "unreadable_files": [],
        "target": norm.target_fit.to_dict(),
        "report": None,
    }
    samples: List[Tuple[np.ndarray, np.ndarray, bool, str]] = []

    def load(rel):
        try:
            return rel, read_rgb(src_p / rel), None
        except (BadImageError, DataError) as e:
            return rel, None, str(e)

    def save(item):
        rel, img, passed = item
        if passed:
            _write_atomic(dst_p / rel, None, copy_from=src_p / rel)
        else:
            _write_atomic(dst_p / rel, img)

    bar = tqdm(total=len(todo), unit="tile", desc="normalize", disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        chunks = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        nxt = pool.map(load, chunks[0]) if chunks else None
        for ci in range(len(chunks)):
            loaded = list(nxt)
            if ci + 1 < len(chunks):  # decode the next chunk while this one runs
                nxt = pool.map(load, chunks[ci + 1])
            good = []
            for rel, img, err in loaded:
                if img is None:
                    summary["unreadable"] += 1
                    summary["unreadable_files"].append(str(rel))
                else:
                    good.append((rel, img))
            by_shape: Dict[Tuple[int, int], List[Tuple[Path, np.ndarray]]] = {}
            for rel, img in good:
                by_shape.setdefault(img.shape[:2], []).append((rel, img))
            results = []
            for items in by_shape.values():
                batch = np.stack([im for _, im in items])
                out, passed = norm.transform(batch, return_passthrough=True)
                for (rel, im), o, p in zip(items, out, passed):
                    results.append((rel, im, o, bool(p)))
            failed = [str(r) for r, _, _, p in results if p]
            if failed and on_failure == "error":
                bar.close()
                raise StainError(
                    f"{len(failed)} tile(s) could not be Macenko-normalised (background-only, "
                    f"near-white, noise, single stain or too little tissue): {failed[:10]}"
                    f"{' ...' if len(failed) > 10 else ''}. Rerun with on_failure='passthrough' "
                    "(CLI: default) to copy them unchanged; finished outputs are kept"
                )
            list(pool.map(save, [(r, o, p) for r, _, o, p in results]))
            for rel, im, o, p in results:
                summary["written"] += 1
                if p:
                    summary["passed_through"] += 1
                    summary["passed_through_files"].append(str(rel))
                if report and len(samples) < 2 * _REPORT_TILES:
                    samples.append((im, o, p, str(rel)))
            bar.update(len(loaded))
    bar.close()

    if report:
        if not samples:  # everything was done before: rebuild from finished outputs
            for rel in files[: 2 * _REPORT_TILES]:
                try:
                    samples.append((read_rgb(src_p / rel), read_rgb(dst_p / rel), False, str(rel)))
                except (BadImageError, DataError):
                    continue
        if samples:
            rp = dst_p / REPORT_NAME
            _write_report(rp, samples)
            summary["report"] = str(rp)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
