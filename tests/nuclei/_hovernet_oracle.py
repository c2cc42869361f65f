"""Regenerate the HoVer-Net oracle weights (tests/fixtures/hovernet/README.md) and write
them in PyTorch's real on-disk formats.

Plain helpers, no pytest; ``python tests/nuclei/_hovernet_oracle.py OUT_DIR`` (run
with torch available) writes the two checkpoints the parity test loads.
"""

from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "hovernet"
CASES = {"fast": ("fast", 6), "original": ("original", 0)}


def read_keys(mode: str, num_types: int):
    """[(key, shape)] of ``keys_<mode>_<n>types.tsv`` in file order."""
    rows = []
    for line in (FIXTURES / f"keys_{mode}_{num_types}types.tsv").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(int(s) for s in shape.split("x"))))
    return rows


def oracle_state_dict(mode: str, num_types: int):
    """The state dict of the README's weight rule (float32, PyTorch layout)."""
    stats = np.load(FIXTURES / f"bn_stats_{mode}_{num_types}types.npz")
    out = {}
    for key, shape in read_keys(mode, num_types):
        if key.endswith("running_mean") or key.endswith("running_var"):
            out[key] = stats[key].astype(np.float32)
            continue
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        if len(shape) == 4:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        elif key.endswith("bn.weight"):
            v = 1 + 0.1 * rng.standard_normal(shape)
        elif key.endswith("bn.bias"):
            v = 0.1 * rng.standard_normal(shape)
        elif key.endswith(".bias"):
            v = 0.01 * rng.standard_normal(shape)
        else:
            raise AssertionError(f"no rule for {key}")
        out[key] = v.astype(np.float32)
    return out


_WRITER = r"""
import collections, sys
import numpy as np
import torch
src, fast_out, orig_out = sys.argv[1:4]
z = np.load(src)
def sd(prefix, module_prefix=False):
    d = collections.OrderedDict()
    for k in z.files:
        if k.startswith(prefix):
            key = k[len(prefix):]
            d[("module." if module_prefix else "") + key] = torch.from_numpy(z[k].copy())
            if key.endswith("running_var"):  # as in some releases (hover_net#96)
                d[("module." if module_prefix else "") + key[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    return d
# vqdang .tar: {"desc": state_dict} with a DataParallel prefix, zip format
torch.save({"desc": sd("fast/", module_prefix=True), "epoch": 50}, fast_out)
# TIAToolbox-style bare state dict, legacy (pre-zip) format
torch.save(sd("original/"), orig_out, _use_new_zipfile_serialization=False)
"""


def write_checkpoints(out_dir: Path, python: str = sys.executable):
    """Write ``fast.tar`` (zip, ``{"desc": ...}``, ``module.``) and ``original.pth`` (legacy).

    Runs torch in a child process so the calling process never imports it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (mode, n) in CASES.items():
        for k, v in oracle_state_dict(mode, n).items():
            arrays[f"{name}/{k}"] = v
    src = out_dir / "weights.npz"
    np.savez(src, **arrays)
    fast, orig = out_dir / "fast.tar", out_dir / "original.pth"
    subprocess.run([python, "-c", _WRITER, str(src), str(fast), str(orig)], check=True,
                   cwd=str(out_dir))
    src.unlink()
    return fast, orig


if __name__ == "__main__":
    print(write_checkpoints(Path(sys.argv[1])))
