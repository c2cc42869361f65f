"""normalize_folder: mirror tree, formats, resume, passthrough summary, report, errors."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from histokd.errors import DataError, StainError
from histokd.stain import MacenkoNormalizer, normalize_folder
from histokd.stain.io import read_rgb, write_rgb

sys.path.insert(0, str(Path(__file__).parent))
from stain_synth import synth_he  # noqa: E402

S = 48


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    write_rgb(src / "t0.png", synth_he(S, 0))
    write_rgb(src / "a" / "t1.png", synth_he(S, 1))
    write_rgb(src / "a" / "b" / "t2.tif", synth_he(S, 2))
    write_rgb(src / "a" / "t3.jpg", synth_he(S, 3))
    write_rgb(src / "a" / "wide.png", synth_he(64, 4)[:S])  # another size: own batch
    write_rgb(src / "bg.png", np.full((S, S, 3), 255, np.uint8))
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("ignored")
    return src


def test_mirrors_tree_and_summarises(tree, tmp_path):
    dst = tmp_path / "dst"
    s = normalize_folder(tree, dst, target="torchstain", batch_size=3, report=True, progress=False)
    assert s["found"] == 7 and s["written"] == 6 and s["skipped_existing"] == 0
    assert s["passed_through"] == 1 and s["passed_through_files"] == ["bg.png"]
    assert s["unreadable"] == 1 and s["unreadable_files"] == ["broken.png"]
    assert s["target"]["source"] == "preset:torchstain"
    for rel in ["t0.png", "a/t1.png", "a/b/t2.tif", "a/t3.jpg", "a/wide.png", "bg.png"]:
        assert (dst / rel).is_file(), rel
    assert not (dst / "notes.txt").exists() and not (dst / "broken.png").exists()
    # lossless outputs equal the in-memory normaliser; the passthrough file is a byte copy
    norm = MacenkoNormalizer("torchstain")
    np.testing.assert_array_equal(read_rgb(dst / "a" / "t1.png"), norm(read_rgb(tree / "a" / "t1.png")))
    np.testing.assert_array_equal(read_rgb(dst / "a" / "b" / "t2.tif"),
                                  norm(read_rgb(tree / "a" / "b" / "t2.tif")))
    assert (dst / "bg.png").read_bytes() == (tree / "bg.png").read_bytes()
    rep = read_rgb(dst / "normalize_report.png")
    assert s["report"] == str(dst / "normalize_report.png") and rep.shape[0] > 2 * 128
    assert not [p for p in dst.rglob("*") if ".histokd-tmp" in p.name]


def test_resumes_and_skips_finished(tree, tmp_path):
    dst = tmp_path / "dst"
    normalize_folder(tree, dst, batch_size=4, progress=False)
    (dst / "a" / "t1.png").unlink()
    stamp = (dst / "t0.png").stat().st_mtime_ns
    s = normalize_folder(tree, dst, batch_size=4, progress=False, report=True)
    assert s["written"] == 1 and s["skipped_existing"] == 5
    assert (dst / "a" / "t1.png").is_file()
    assert (dst / "t0.png").stat().st_mtime_ns == stamp
    s = normalize_folder(tree, dst, progress=False, report=True)  # nothing left: report rebuilt
    assert s["written"] == 0 and s["report"] is not None


def test_dst_inside_src_is_not_searched(tree):
    dst = tree / "normalised"
    s1 = normalize_folder(tree, dst, progress=False)
    s2 = normalize_folder(tree, dst, progress=False)
    assert s1["found"] == s2["found"] == 7


def test_errors(tree, tmp_path):
    with pytest.raises(DataError, match="not found"):
        normalize_folder(tmp_path / "missing", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="differ"):
        normalize_folder(tree, tree, progress=False)
    with pytest.raises(StainError, match="bg.png"):
        normalize_folder(tree, tmp_path / "strict", on_failure="error", progress=False)
    with pytest.raises(StainError, match="not a preset"):
        normalize_folder(tree, tmp_path / "x", target="nope", progress=False)


def test_target_image_file(tree, tmp_path):
    target = tmp_path / "target.png"
    write_rgb(target, synth_he(64, 9))
    s = normalize_folder(tree, tmp_path / "dst", target=str(target), progress=False)
    assert s["target"]["source"] == f"image:{target}"
    assert os.path.isfile(tmp_path / "dst" / "t0.png")


def test_normalize_cli_and_its_cpu_threads_option(tree, tmp_path, capsys):
    from histokd.cli import main
    from histokd.runtime import cpu_thread_plan

    dst = tmp_path / "dst_cli"
    # the command sizes TensorFlow's pools for its two chunk streams when it starts a
    # fresh process; here TensorFlow already runs, so `auto` leaves them quietly
    assert main(["normalize", str(tree), str(dst), "--batch", "4"]) == 0
    assert (dst / "a" / "t1.png").is_file()
    assert '"passed_through": 1' in capsys.readouterr().out
    assert main(["normalize", str(tree), str(dst), "--cpu-threads", "many"]) != 0
    assert "INTRA,INTER" in capsys.readouterr().err
    assert cpu_thread_plan("auto", streams=2, cpus=2) == (1, 2)
    assert cpu_thread_plan("auto", streams=2, cpus=8, gpus=1) is None
