"""The layering of ARCHITECTURE.md, checked by import-linter (contracts in setup.cfg):
nothing imports upwards (e.g. data never imports methods, nothing but the CLI imports the
runner), no module imports the package root, and no import cycles between sibling modules."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    res = subprocess.run([exe, "--no-cache", str(REPO / "setup.cfg")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout
