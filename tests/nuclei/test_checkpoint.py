"""Official HoVer-Net checkpoints → Keras without PyTorch (spec §1.4, fixtures README)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from histokd.errors import WeightsError
from histokd.nuclei import checkpoint as ck

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hovernet_oracle import FIXTURES, read_keys, write_checkpoints  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# A child process in which `import torch` fails (scipy only peeks at sys.modules, so a
# meta-path blocker is used rather than sys.modules["torch"] = None).
BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this process")
    sys.meta_path.insert(0, _BlockTorch())
    """
)


def needs_torch_writer():
    """The fixture files are written by torch (test extra) in a child process."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch (the test extra) is needed to write PyTorch-format fixture files")


def run_python(code: str, *args, timeout=900) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, cwd=str(REPO), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


# ---------------------------------------------------------------- explicit key table

@pytest.mark.parametrize("mode,n", [("fast", 6), ("original", 0)])
def test_key_table_matches_official_layout(mode, n):
    table = ck.official_key_table(mode, n)
    assert [(m.torch_key, m.shape) for m in table] == read_keys(mode, n)
    assert len({(m.layer, m.slot) for m in table}) == len(table)  # one Keras slot per tensor
    params = sum(int(np.prod(m.shape)) for m in table if m.slot not in ("moving_mean", "moving_variance"))
    assert params == {"fast": 37_639_626, "original": 45_028_676}[mode]
    by_key = {m.torch_key: m for m in table}
    assert by_key["conv0./.weight"].layer == "conv0_conv"
    assert by_key["d0.units.1.preact/bn.running_var"].layer == "d0_units_1_preact_bn"
    assert by_key["d0.units.1.preact/bn.running_var"].slot == "moving_variance"


def test_key_table_other_type_counts():
    keys = {m.torch_key: m.shape for m in ck.official_key_table("original", 5)}
    assert keys["decoder.tp.u0.conv.weight"] == (5, 64, 1, 1)
    assert keys["decoder.tp.u3.dense.units.0.conv2.weight"] == (32, 32, 5, 5)


# ---------------------------------------------------------------- detection and errors

def _fake_state_dict(mode, n):
    # Zero-strided arrays: shapes without memory; the checks only read shapes.
    return {m.torch_key: np.broadcast_to(np.float32(0), m.shape) for m in ck.official_key_table(mode, n)}


@pytest.mark.parametrize("mode,n", [("fast", 6), ("original", 0), ("fast", 0), ("original", 5)])
def test_detect_mode_and_types(mode, n):
    assert ck.detect_hovernet_config(_fake_state_dict(mode, n)) == (mode, n)


def test_check_names_first_missing_key_and_bad_shape():
    table = ck.official_key_table("fast", 6)
    sd = _fake_state_dict("fast", 6)
    ck._check_state_dict(sd, table, "x")  # fits
    missing = dict(sd)
    del missing["d1.units.2.conv2/bn.running_mean"]
    del missing["decoder.hv.u0.conv.bias"]
    with pytest.raises(WeightsError, match=r"'d1\.units\.2\.conv2/bn\.running_mean'.*missing"):
        ck._check_state_dict(missing, table, "x")
    wrong = dict(sd)
    wrong["d2.shortcut.weight"] = np.zeros((1024, 256, 1, 1), np.float32)
    with pytest.raises(WeightsError, match=r"'d2\.shortcut\.weight' has shape \[1024, 256, 1, 1\].*\[1024, 512, 1, 1\]"):
        ck._check_state_dict(wrong, table, "x")
    extra = dict(sd)
    extra["decoder.xx.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightsError, match="unexpected key 'decoder.xx.weight'"):
        ck._check_state_dict(extra, table, "x")
    # an original-mode file checked against the fast table: first mismatch named
    with pytest.raises(WeightsError, match=r"decoder\.tp\.u3\.conva\.weight"):
        ck._check_state_dict(_fake_state_dict("original", 6), table, "x")


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        ck.load_official_checkpoint(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        ck.load_official_checkpoint(junk)
    partial = tmp_path / "partial.npz"
    np.savez(partial, **{"decoder.np.u3.conva.weight": np.zeros((256, 1024, 3, 3), np.float32),
                         "decoder.tp.u0.conv.weight": np.zeros((6, 64, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match="'fast'-mode HoVer-Net .* mode='original'"):
        ck.load_official_checkpoint(partial, mode="original")
    with pytest.raises(WeightsError, match="6 nuclear types .* num_types=5"):
        ck.load_official_checkpoint(partial, num_types=5)
    with pytest.raises(WeightsError, match=r"'conv0\./\.weight' .*missing"):
        ck.load_official_checkpoint(partial)
    other = tmp_path / "resnet.npz"
    np.savez(other, **{"fc.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(WeightsError, match="not a HoVer-Net checkpoint"):
        ck.load_official_checkpoint(other)


# ---------------------------------------------------------------- torch-free reader

_SMALL_WRITER = textwrap.dedent(
    """
    import collections, sys, argparse
    import numpy as np, torch
    out = sys.argv[1]
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    sd = collections.OrderedDict()
    sd["module.a"] = base
    sd["module.row"] = base[2]                       # a view with a storage offset
    sd["module.t"] = base.t()                        # non-contiguous strides
    sd["module.i64"] = torch.arange(5)
    sd["module.h"] = torch.randn(3).half()
    sd["module.bf"] = torch.randn(3).bfloat16()
    sd["module.b"] = torch.tensor([True, False])
    sd["module.s"] = torch.tensor(3.5)               # 0-d
    sd["module.p"] = torch.nn.Parameter(torch.randn(2, 2))
    sd["module.bn.num_batches_tracked"] = torch.tensor(10)
    obj = {"desc": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-4)}
    torch.save(obj, out + "/zip.tar")
    torch.save(obj, out + "/legacy.tar", _use_new_zipfile_serialization=False)
    torch.save(collections.OrderedDict((k[7:], v) for k, v in sd.items()), out + "/bare.pth")
    ref = {k[7:]: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
           for k, v in sd.items() if "num_batches" not in k}
    np.savez(out + "/ref.npz", **ref)
    """
)

_SMALL_READER = BLOCK_TORCH + textwrap.dedent(
    """
    import json
    import numpy as np
    from histokd.nuclei.checkpoint import read_state_dict, read_torch_file
    out = sys.argv[1]
    ref = np.load(out + "/ref.npz")
    res = {}
    for name in ("zip.tar", "legacy.tar", "bare.pth"):
        sd = read_state_dict(out + "/" + name)
        assert sorted(sd) == sorted(ref.files), (name, sorted(sd))
        for k in ref.files:
            assert sd[k].dtype == ref[k].dtype, (name, k, sd[k].dtype, ref[k].dtype)
            assert sd[k].shape == ref[k].shape, (name, k)
            np.testing.assert_array_equal(sd[k], ref[k], err_msg=name + ":" + k)
        res[name] = len(sd)
    raw = read_torch_file(out + "/zip.tar")
    res["epoch"] = raw["epoch"]
    res["opaque"] = repr(raw["args"])
    res["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(res))
    """
)


def test_reader_without_torch_zip_and_legacy(tmp_path):
    needs_torch_writer()
    run_python(_SMALL_WRITER, tmp_path)
    res = json.loads(run_python(_SMALL_READER, tmp_path).strip().splitlines()[-1])
    assert res == {"zip.tar": 9, "legacy.tar": 9, "bare.pth": 9, "epoch": 3,
                   "opaque": "<unloaded argparse.Namespace>", "torch_loaded": False}


def test_reader_refuses_code_execution(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (eval, ("__import__('os').system('echo pwned')",))

    path = tmp_path / "evil.pth"
    # legacy header + a payload that would call eval() with the stock unpickler
    with open(path, "wb") as f:
        for head in (ck._LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(head, f, protocol=2)
        pickle.dump({"w": Evil()}, f, protocol=2)
        pickle.dump([], f, protocol=2)
    obj = ck.read_torch_file(path)
    assert repr(obj["w"]).endswith("eval>")  # an inert placeholder: eval never ran
    with pytest.raises(WeightsError, match="not a tensor"):
        ck.read_state_dict(path)


# ---------------------------------------------------------------- numerical parity

_PARITY = BLOCK_TORCH + textwrap.dedent(
    """
    import json
    import numpy as np
    from histokd.nuclei import load_official_checkpoint
    fixtures, fast_path, orig_path = sys.argv[1:4]
    res = {}
    for name, path in (("fast", fast_path), ("original", orig_path)):
        model = load_official_checkpoint(path)
        oracle = np.load(f"{fixtures}/oracle_{name}_{model.num_types}types.npz")
        out = model(oracle["input_uint8"], training=False)  # one eager pass (no tracing)
        res[name] = {
            "mode": model.mode, "num_types": model.num_types,
            "params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "err": {k: float(np.abs(np.asarray(out[k]) - oracle["out_" + k]).max()
                             / oracle["out_" + k].std()) for k in out},
        }
        del model
    res["torch_loaded"] = "torch" in sys.modules
    print(json.dumps(res))
    """
)


@pytest.mark.slow
def test_official_format_parity_fast6_and_original0(tmp_path):
    """Oracle weights → real PyTorch files → loader (torch blocked) → Keras ≈ official outputs."""
    needs_torch_writer()
    fast, orig = write_checkpoints(tmp_path)
    res = json.loads(run_python(_PARITY, FIXTURES, fast, orig).strip().splitlines()[-1])
    assert res.pop("torch_loaded") is False
    assert res["fast"]["mode"] == "fast" and res["fast"]["num_types"] == 6
    assert res["original"]["mode"] == "original" and res["original"]["num_types"] == 0
    assert res["fast"]["params"] == 37_639_626
    assert res["original"]["params"] == 45_028_676
    assert set(res["fast"]["err"]) == {"np", "hv", "tp"}
    assert set(res["original"]["err"]) == {"np", "hv"}
    for name in ("fast", "original"):
        for head, err in res[name]["err"].items():
            assert err <= 1e-3, f"{name}/{head}: max|Δ| = {err:.2e} × std"
