"""Manifest-driven, checksummed dataset downloads (``histokd data fetch NAME DEST``).

A dataset manifest is a CSV with one row per file to download (packaged in
``histokd/data/manifests/``; the same files and a README with licences and
citations are in ``data_manifests/`` at the repository root). Columns:

========== ==================================================================
dataset    dataset name (the CSV's stem)
file       file name saved under ``DEST/downloads/``
url        download URL
size_bytes expected size (optional)
md5        expected MD5 (optional)
sha256     expected SHA-256 (optional; at least one checksum should be given)
format     ``zip``, ``tar`` (``.tar``, ``.tar.gz`` …) or ``npz``
extract_root folder the archive extracts to (class-per-folder images)
split      ``auto`` (stratified train/val split), ``test`` (every image is test) or
           ``given`` (the file has its own splits, e.g. MedMNIST)
num_images expected number of images (a mismatch only warns)
classes    space-separated class names (the folder names)
license, citation, doi, record_url   provenance
========== ==================================================================

:func:`fetch` downloads each file (streaming, tqdm bar, resumable through a
``.part`` file and an HTTP ``Range`` request when the server supports it),
verifies size and checksums, extracts archives (refusing members that would
escape the destination), and calls :func:`histokd.data.records.prepare` into
``DEST/records``. A file already present in ``DEST/downloads`` (for example
copied there by hand) is verified and used without downloading.

Example:
    >>> from histokd.data import fetch
    >>> fetch("kather_crc_2018", "/data/kather")  # doctest: +SKIP
    {'files': [...], 'records': {'counts': {'train': 90000, 'val': 10000, 'test': 7180}, ...}}
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

from histokd.errors import DataError

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"
_CHUNK = 1 << 20


def available_datasets() -> list[str]:
    """Names accepted by :func:`fetch` (packaged manifests)."""
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.csv"))


def load_manifest(name) -> list[dict]:
    """Rows of a dataset manifest, by packaged name or path to a CSV.

    Raises:
        DataError: unknown name, unreadable CSV, or rows without file/url.
    """
    path = Path(str(name)).expanduser()
    if not (path.suffix.lower() == ".csv" and path.is_file()):
        path = MANIFEST_DIR / f"{name}.csv"
    if not path.is_file():
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())} "
                        "(or give the path of a manifest .csv)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [{k: (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    for i, r in enumerate(rows):
        if not r.get("file") or not r.get("url"):
            raise DataError(f"manifest {path} line {i + 2}: every row needs 'file' and 'url'")
        r.setdefault("split", "auto")
        r["_manifest"] = str(path)
    return rows


def file_digests(path, algorithms=("md5", "sha256")) -> dict:
    """Hex digests of a file for the given hashlib algorithms."""
    hs = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            for h in hs.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hs.items()}


def verify_file(path, md5="", sha256="", size_bytes="") -> None:
    """Check size and checksums of a downloaded file.

    Raises:
        DataError: with expected and actual values and "delete X and retry".
    """
    path = Path(path)
    if size_bytes:
        actual = path.stat().st_size
        if actual != int(size_bytes):
            raise DataError(f"{path} has {actual} bytes, expected {int(size_bytes)}: the download is "
                            f"incomplete or a different file. Delete {path} and retry")
    algos = [a for a, v in (("md5", md5), ("sha256", sha256)) if v]
    if not algos:
        warnings.warn(f"no checksum is known for {path.name}; it was not verified", stacklevel=2)
        return
    got = file_digests(path, algos)
    for a in algos:
        expected = (md5 if a == "md5" else sha256).lower()
        if got[a] != expected:
            raise DataError(f"checksum mismatch for {path}: expected {a} {expected}, got {got[a]}. The file "
                            f"is corrupt, incomplete or not the published one: delete {path} and retry")


def download(url, dest, progress=True, timeout=60) -> Path:
    """Stream ``url`` to ``dest``, resuming from ``dest + '.part'`` when possible.

    Args:
        url: str. http(s):// or file:// URL.
        dest: str. Final path (written only when the download is complete).
        progress: bool. tqdm bar in bytes.
        timeout: float. Socket timeout in seconds.

    Returns:
        Path of the downloaded file.

    Raises:
        DataError: the URL cannot be read.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "histokd"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the .part is already complete
            os.replace(part, dest)
            return dest
        raise DataError(f"could not download {url}: HTTP {exc.code} {exc.reason}. Check the URL, or download "
                        f"the file by hand to {dest} and run the command again") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"could not download {url}: {reason}. Check your connection, or download the file by "
                        f"hand to {dest} and run the command again") from None
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        resumed = bool(have) and status == 206
        if not resumed:
            have = 0
        length = resp.headers.get("Content-Length")
        total = (int(length) + have) if length and length.isdigit() else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=dest.name, disable=None if progress else True, leave=False)
        with open(part, "ab" if resumed else "wb") as f:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                f.write(block)
                bar.update(len(block))
        bar.close()
    os.replace(part, dest)
    return dest


def _safe_target(root: Path, member: str) -> Path:
    target = (root / member).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise DataError(f"archive member {member!r} would be written outside {root}; refusing to extract")
    return target


def extract(archive, dest) -> Path:
    """Extract a zip or tar archive into ``dest`` (members may not escape ``dest``).

    A marker file ``dest/.<archive>.extracted`` makes a second call a no-op.
    """
    archive, dest = Path(archive), Path(dest)
    marker = dest / f".{archive.name}.extracted"
    if marker.exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for m in z.namelist():
                    _safe_target(dest, m)
                z.extractall(dest)
        elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as t:
                for m in t.getmembers():
                    _safe_target(dest, m.name)
                    if m.issym() or m.islnk():
                        raise DataError(f"archive {archive} contains a link ({m.name}); refusing to extract")
                t.extractall(dest, filter="data")
        else:
            raise DataError(f"do not know how to extract {archive.name} (zip or tar expected)")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive} is not a readable archive ({exc}); delete it and retry") from None
    marker.write_text("ok\n")
    return dest


def _source_for(rows, dest, val_fraction, seed):
    from histokd.data.sources import CombinedSource, FolderSource, MedMNISTSource, Source

    mains, tests = [], []
    for r in rows:
        classes = r.get("classes", "").split() or None
        if r.get("format") == "npz":
            src = MedMNISTSource(dest / "downloads" / r["file"], class_names=classes)
        else:
            root = dest / (r.get("extract_root") or "")
            test_only = r.get("split") == "test"
            src = FolderSource(root, val_fraction=0.0 if test_only else val_fraction, test_fraction=0.0, seed=seed,
                               class_names=classes)
            expected = r.get("num_images")
            total = sum(src.num_examples(s) for s in ("train", "val", "test"))
            if expected and int(expected) != total:
                warnings.warn(f"{root} holds {total} images, the manifest expects {expected}", stacklevel=3)
        (tests if r.get("split") == "test" else mains).append(src)
    if len(mains) > 1 or len(tests) > 1:
        raise DataError("a manifest may hold at most one training and one test file set")
    if mains and tests:
        return CombinedSource(mains[0], tests[0])
    if mains:
        return mains[0]

    class _Empty(Source):
        def __init__(self, names):
            super().__init__()
            self.class_names = list(names)

        def records(self, split):
            return []

    return CombinedSource(_Empty(tests[0].class_names), tests[0])


def fetch(name, dest, url_override=None, progress=True, prepare_records=True, image_size=None,
          on_bad_image="error", val_fraction=0.1, seed=0, shard_size=1024) -> dict:
    """Download, verify, extract and prepare a public dataset.

    Args:
        name: str. A packaged dataset (see :func:`available_datasets`:
            ``nct_crc_he_100k``, ``crc_val_he_7k``, ``kather_crc_2018`` = both, the
            7K as the external test set as in "More From Less" §2.3,
            ``pneumoniamnist``) or the path of a manifest CSV.
        dest: str. Destination folder: ``downloads/``, the extracted folders and
            ``records/`` (TFRecords) go there.
        url_override: str | dict | None. Replacement URL (one-file manifests) or
            mapping file name → URL (mirrors, local copies, tests with file://).
        progress: bool. Progress bars.
        prepare_records: bool. Run :func:`~histokd.data.records.prepare` into
            ``dest/records`` (default True).
        image_size: int | None. Resize while preparing (None keeps 224 px).
        on_bad_image: "error" | "skip". For ``prepare``.
        val_fraction: float. Validation fraction of the training set (``split=auto``).
        seed: int. Split seed.
        shard_size: int. Examples per TFRecord shard.

    Returns:
        dict with ``files`` (downloaded paths), ``roots`` (extracted image
        folders), ``records`` (the prepare summary, or None) and ``manifest`` rows
        (licence and citation included).

    Raises:
        DataError: unknown name, download failure, size or checksum mismatch
            ("delete X and retry"), unreadable archive.
    """
    rows = load_manifest(name)
    dest = Path(dest).expanduser()
    (dest / "downloads").mkdir(parents=True, exist_ok=True)
    if isinstance(url_override, str) and len(rows) != 1:
        raise DataError(f"{name} has {len(rows)} files; give url_override as a dict file name → URL")
    files, roots = [], []
    for r in rows:
        url = r["url"]
        if isinstance(url_override, str):
            url = url_override
        elif isinstance(url_override, dict) and r["file"] in url_override:
            url = url_override[r["file"]]
        target = dest / "downloads" / r["file"]
        if not target.exists():
            download(url, target, progress=progress)
        verify_file(target, r.get("md5", ""), r.get("sha256", ""), r.get("size_bytes", ""))
        files.append(str(target))
        fmt = (r.get("format") or "").lower()
        if fmt in ("zip", "tar") or r["file"].lower().endswith((".zip", ".tar", ".tar.gz", ".tgz")):
            extract(target, dest)
            root = dest / (r.get("extract_root") or "")
            if not root.is_dir():
                raise DataError(f"{r['file']} did not extract to {root}; the archive layout differs from the "
                                "manifest's extract_root")
            roots.append(str(root))
    summary = None
    if prepare_records:
        from histokd.data.records import prepare

        source = _source_for(rows, dest, val_fraction, seed)
        summary = prepare(source, dest / "records", image_size=image_size, shard_size=shard_size,
                          on_bad_image=on_bad_image, progress=progress)
    return {"files": files, "roots": roots, "records": summary,
            "manifest": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}


def remove_downloads(dest) -> None:
    """Delete ``dest/downloads`` (the archives) after a successful fetch to save space."""
    shutil.rmtree(Path(dest) / "downloads", ignore_errors=True)
