"""fetch: download (file:// and a local Range-capable HTTP server), checksums, extraction, prepare."""

import csv
import hashlib
import http.server
import json
import shutil
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _imgs import rgb, write  # noqa: E402

from histokd.data import download as dl  # noqa: E402
from histokd.data.sources import TFRecordSource  # noqa: E402
from histokd.errors import DataError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["ADI", "BACK", "TUM"]
COLUMNS = ["dataset", "file", "url", "size_bytes", "md5", "sha256", "format", "extract_root", "split",
           "num_images", "classes", "license", "citation", "doi", "record_url"]


def _kather_like_zip(tmp, name, per_class, seed):
    """A zip laid out like NCT-CRC-HE-100K.zip: <name>/<CLASS>/<CLASS>-XXXX.tif."""
    stage = tmp / f"stage_{name}"
    for k, c in enumerate(CLASSES):
        for i in range(per_class):
            write(stage / name / c / f"{c}-{seed}{i:04d}.tif", rgb(seed * 100 + k * 10 + i, 12))
    archive = tmp / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(stage.rglob("*")):
            z.write(p, p.relative_to(stage).as_posix())
    return archive


def _manifest(tmp, rows, name="tiny"):
    path = tmp / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({**{c: "" for c in COLUMNS}, **r})
    return path


def _row(archive, root, split, **kw):
    data = archive.read_bytes()
    row = dict(dataset="tiny", file=archive.name, url=archive.as_uri(), size_bytes=str(len(data)),
               md5=hashlib.md5(data).hexdigest(), sha256=hashlib.sha256(data).hexdigest(), format="zip",
               extract_root=root, split=split, classes=" ".join(CLASSES), license="CC-BY-4.0")
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("archives")
    return tmp, _kather_like_zip(tmp, "NCT-CRC-HE-100K", 5, 1), _kather_like_zip(tmp, "CRC-VAL-HE-7K", 2, 2)


def test_fetch_verifies_extracts_and_prepares(archives, tmp_path):
    tmp, train_zip, test_zip = archives
    m = _manifest(tmp_path, [_row(train_zip, "NCT-CRC-HE-100K", "auto", num_images="15"),
                             _row(test_zip, "CRC-VAL-HE-7K", "test", num_images="6")])
    out = dl.fetch(str(m), tmp_path / "dest", progress=False, val_fraction=0.2)
    assert [Path(f).name for f in out["files"]] == ["NCT-CRC-HE-100K.zip", "CRC-VAL-HE-7K.zip"]
    assert (tmp_path / "dest" / "NCT-CRC-HE-100K" / "TUM" / "TUM-10004.tif").is_file()
    assert out["records"]["counts"] == {"train": 12, "val": 3, "test": 6}
    src = TFRecordSource(tmp_path / "dest" / "records")
    assert src.class_names == CLASSES and src.class_counts("test") == [2, 2, 2]
    meta = json.loads((tmp_path / "dest" / "records" / "dataset.json").read_text())
    assert meta["source"]["type"] == "combined"
    assert out["manifest"][0]["license"] == "CC-BY-4.0"
    # a second fetch reuses the verified download and the extraction
    (train_zip.parent / "gone").mkdir(exist_ok=True)
    again = dl.fetch(str(m), tmp_path / "dest", progress=False, prepare_records=False,
                     url_override={"NCT-CRC-HE-100K.zip": "file:///nonexistent.zip",
                                   "CRC-VAL-HE-7K.zip": "file:///nonexistent.zip"})
    assert again["records"] is None and len(again["roots"]) == 2


def test_fetch_test_only_manifest(archives, tmp_path):
    """A manifest with only an external test set (like crc_val_he_7k) prepares a test split."""
    _, _, test_zip = archives
    m = _manifest(tmp_path, [_row(test_zip, "CRC-VAL-HE-7K", "test")])
    out = dl.fetch(str(m), tmp_path / "dest", progress=False)
    assert out["records"]["counts"] == {"train": 0, "val": 0, "test": 6}
    assert TFRecordSource(tmp_path / "dest" / "records").splits == ["test"]


def test_checksum_mismatch_says_delete_and_retry(archives, tmp_path):
    tmp, train_zip, _ = archives
    tampered = tmp_path / "NCT-CRC-HE-100K.zip"
    data = bytearray(train_zip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    row = _row(train_zip, "NCT-CRC-HE-100K", "auto")  # checksums of the genuine archive
    m = _manifest(tmp_path, [row])
    with pytest.raises(DataError) as e:
        dl.fetch(str(m), tmp_path / "dest", url_override=tampered.as_uri(), progress=False)
    msg = str(e.value)
    assert "checksum mismatch" in msg and row["md5"] in msg and "delete" in msg.lower()
    assert hashlib.md5(bytes(data)).hexdigest() in msg
    # sha256 alone is checked too
    (tmp_path / "dest" / "downloads" / "NCT-CRC-HE-100K.zip").unlink()
    m2 = _manifest(tmp_path, [dict(row, md5="", sha256="0" * 64)], name="sha")
    with pytest.raises(DataError, match="sha256"):
        dl.fetch(str(m2), tmp_path / "dest", progress=False)


def test_packaged_manifest_with_url_override(archives, tmp_path):
    """The real NCT manifest rejects a file that is not the published archive (size check first)."""
    _, train_zip, _ = archives
    with pytest.raises(DataError, match="bytes, expected 11690284003"):
        dl.fetch("nct_crc_he_100k", tmp_path, url_override=train_zip.as_uri(), progress=False)


def test_packaged_manifests_are_valid_and_mirrored():
    names = dl.available_datasets()
    assert {"nct_crc_he_100k", "crc_val_he_7k", "kather_crc_2018", "pneumoniamnist"} <= set(names)
    for name in names:
        rows = dl.load_manifest(name)
        for r in rows:
            assert r["url"].startswith("https://") and (r["md5"] or r["sha256"]) and r["license"]
        mirror = REPO / "data_manifests" / f"{name}.csv"
        assert mirror.read_text() == (dl.MANIFEST_DIR / f"{name}.csv").read_text(), name
    nct = dl.load_manifest("nct_crc_he_100k")[0]
    assert nct["classes"].split() == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert nct["doi"] == "10.5281/zenodo.1214456"
    with pytest.raises(DataError, match="available"):
        dl.load_manifest("imagenet")


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    log = []

    def do_GET(self):  # noqa: N802 - http.server API
        rng = self.headers.get("Range")
        self.log.append(rng)
        data, status = self.payload, 200
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            data, status = self.payload[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {len(self.payload) - len(data)}-{len(self.payload) - 1}/"
                                              f"{len(self.payload)}")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_download_resumes_with_range_requests(tmp_path):
    payload = np.random.default_rng(0).bytes(300_000)
    _RangeHandler.payload, _RangeHandler.log = payload, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/blob.bin"
        dest = tmp_path / "blob.bin"
        (tmp_path / "blob.bin.part").write_bytes(payload[:123_456])  # an interrupted earlier download
        dl.download(url, dest, progress=False)
        assert dest.read_bytes() == payload and not (tmp_path / "blob.bin.part").exists()
        assert _RangeHandler.log == ["bytes=123456-"]
        # a server/scheme without Range support restarts from scratch
        src = tmp_path / "src.bin"
        src.write_bytes(payload)
        (tmp_path / "copy.bin.part").write_bytes(b"garbage")
        dl.download(src.as_uri(), tmp_path / "copy.bin", progress=False)
        assert (tmp_path / "copy.bin").read_bytes() == payload
        with pytest.raises(DataError, match="could not download"):
            dl.download("file:///definitely/not/here.zip", tmp_path / "y", progress=False)
    finally:
        server.shutdown()
        server.server_close()


def test_extract_refuses_escaping_members(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(DataError, match="outside"):
        dl.extract(evil, tmp_path / "out")
    assert not (tmp_path / "outside.txt").exists()
    tgz = tmp_path / "ok.tar.gz"
    (tmp_path / "pkg" / "A").mkdir(parents=True)
    write(tmp_path / "pkg" / "A" / "a.png", rgb(0))
    with tarfile.open(tgz, "w:gz") as t:
        t.add(tmp_path / "pkg", arcname="pkg")
    dl.extract(tgz, tmp_path / "tar_out")
    assert (tmp_path / "tar_out" / "pkg" / "A" / "a.png").is_file()
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="delete it"):
        dl.extract(tmp_path / "junk.zip", tmp_path / "junk_out")
    shutil.rmtree(tmp_path / "pkg")


def test_fetch_npz_manifest(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "pneumoniamnist.npz"
    np.savez(npz, train_images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), train_labels=np.arange(6)[:, None] % 2,
             val_images=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), val_labels=np.array([[0], [1]]),
             test_images=rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), test_labels=np.array([[1], [0]]))
    m = _manifest(tmp_path, [dict(_row(npz, "", "given"), format="npz", classes="normal pneumonia")], name="pn")
    out = dl.fetch(str(m), tmp_path / "dest", progress=False)
    assert out["records"]["counts"] == {"train": 6, "val": 2, "test": 2}
    assert TFRecordSource(tmp_path / "dest" / "records").class_names == ["normal", "pneumonia"]
