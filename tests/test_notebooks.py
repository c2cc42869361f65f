"""The walkthrough notebooks: generated from scripts/make_notebooks.py, committed without
outputs, and executed top to bottom (nbclient) in smoke mode without leaving files behind."""

import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = ["00_quickstart.ipynb", "01_more_from_less.ipynb", "02_swinv2_moby_distillation.ipynb"]


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "scripts" / "make_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebooks_match_their_generator_and_have_no_outputs():
    assert _generator().main(["--check"]) == 0, "run python scripts/make_notebooks.py"
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        # one parameter selects smoke mode: the first code cell, tagged for papermill
        first = code[0]
        assert "parameters" in first.metadata.get("tags", [])
        assert re.search(r"^SMOKE = True$", first.source, re.M)
        assert "HISTOKD_SMOKE" in code[1].source and "tempfile.mkdtemp" in code[1].source


def _files(root: Path):
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", "__pycache__", ".pytest_cache")
                       and not d.endswith(".egg-info")]
        for f in filenames:
            if not f.endswith((".py", ".pyc")):  # other helpers may be writing code meanwhile
                out.add(os.path.relpath(os.path.join(dirpath, f), root))
    return out


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that runs *this* interpreter (the test venv), whatever else is installed."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    d = tmp_path_factory.mktemp("jupyter")
    k = d / "kernels" / "histokd-test"
    k.mkdir(parents=True)
    (k / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "histokd tests", "language": "python"}))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode_and_leaves_no_files(name, kernel_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("HISTOKD_SMOKE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook's own inline backend
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tmp = Path(tempfile.gettempdir())
    prefixes = ("histokd_quickstart_*", "histokd_more_from_less_*", "histokd_swinv2_*")  # the notebooks' mkdtemp prefixes
    before_tmp = {p.name for g in prefixes for p in tmp.glob(g)}
    before_repo = _files(REPO)

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    NotebookClient(nb, kernel_name="histokd-test", timeout=900,
                   resources={"metadata": {"path": str(cwd)}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.get("output_type") == "stream")
    assert "smoke mode: True" in text  # the environment variable forced smoke mode
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert list(cwd.iterdir()) == []  # nothing written to the working directory
    assert _files(REPO) == before_repo  # nor into the repository
    left = {p.name for g in prefixes for p in tmp.glob(g)} - before_tmp
    assert not left, f"temporary folders left behind: {left}"
