"""The stain package never changes process-wide settings; the CLI does, explicitly.

Each check runs in a fresh Python process, so what it sees is what a user's
notebook or a ``histokd`` command would see.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def _run(code: str, tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "HISTOKD_XLA_CPU_CONCURRENCY")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO), **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_library_use_leaves_xla_flags_alone(tmp_path):
    """Importing histokd and building + running every Macenko entry point (normaliser,
    Keras layer, tf.data step, fit) leaves XLA_FLAGS as it was, though XLA kernels ran."""
    code = """
import json, os
import numpy as np
import histokd
from histokd.stain import MacenkoNormalization, MacenkoNormalizer, fit_macenko, make_stain_fn
import tensorflow as tf
rng = np.random.default_rng(0)
tiles = rng.integers(60, 230, size=(5, 48, 48, 3)).astype(np.uint8)
before = os.environ.get("XLA_FLAGS")
norm = MacenkoNormalizer("torchstain")
out = norm.transform(tiles)
layer_out = MacenkoNormalization("torchstain")(tf.constant(tiles))
ds_out = next(iter(tf.data.Dataset.from_tensors(tiles).map(make_stain_fn("macenko", "torchstain"))))
try:
    fit_macenko(tiles)
except Exception:
    pass
print(json.dumps({"before": before, "after": os.environ.get("XLA_FLAGS"),
                  "shape": list(out.shape) + list(layer_out.shape) + list(ds_out.shape)}))
"""
    got = _run(code, tmp_path)
    assert got["before"] is None and got["after"] is None
    assert got["shape"] == [5, 48, 48, 3] * 3


def test_normalize_command_sets_the_xla_cpu_option(tmp_path):
    """``histokd normalize`` asks for sequential XLA:CPU kernels at start-up."""
    code = """
import json, os
import numpy as np
from histokd.stain.io import write_rgb
os.makedirs("src", exist_ok=True)
rng = np.random.default_rng(0)
for i in range(2):
    write_rgb(f"src/t{i}.png", rng.integers(60, 230, size=(32, 32, 3)).astype(np.uint8))
from histokd.cli import main
rc = main(["--quiet", "normalize", "src", "dst", "--batch", "2"])
print(json.dumps({"rc": rc, "flags": os.environ.get("XLA_FLAGS")}))
"""
    got = _run(code, tmp_path)
    assert got["rc"] == 0
    assert got["flags"] == f"--{FLAG}=false"


def test_train_command_sets_the_xla_cpu_option_first(tmp_path):
    """``histokd train`` sets it before anything else (here the config is missing, so the
    command stops right after its set-up), and keeps the user's own XLA_FLAGS."""
    code = """
import json, os
from histokd.cli import main
rc = main(["train", "--config", "no_such_config_histokd.yaml"])
print(json.dumps({"rc": rc, "flags": os.environ.get("XLA_FLAGS")}))
"""
    got = _run(code, tmp_path, XLA_FLAGS="--xla_dump_to=xla_dump")
    assert got["rc"] != 0
    assert got["flags"] == f"--xla_dump_to=xla_dump --{FLAG}=false"
    opted_out = _run(code, tmp_path, HISTOKD_XLA_CPU_CONCURRENCY="1")
    assert opted_out["flags"] is None


def test_prefer_sequential_xla_cpu_respects_the_user_and_unknown_flags(monkeypatch):
    """The option is added once, only when this XLA knows it (XLA aborts on unknown
    flags), never over the user's own setting or opt-out."""
    from histokd import runtime as m

    flag = m.XLA_CPU_SEQUENTIAL_FLAG
    assert m._xla_knows_flag(flag), "the installed XLA defines the flag (TensorFlow 2.21 does)"
    assert not m._xla_knows_flag("xla_cpu_no_such_flag_histokd")

    def run(env, knows=True):
        monkeypatch.setattr(m, "_XLA_CPU_CHECKED", False)
        monkeypatch.setattr(m, "_xla_knows_flag", lambda name: knows)
        for key in ("XLA_FLAGS", "HISTOKD_XLA_CPU_CONCURRENCY"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return m.prefer_sequential_xla_cpu(), os.environ.get("XLA_FLAGS")

    assert run({}) == (True, f"--{flag}=false")
    assert run({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}) == (True, f"--xla_dump_to=/tmp/x --{flag}=false")
    assert run({"XLA_FLAGS": f"--{flag}=true"}) == (True, f"--{flag}=true")  # the user's choice
    assert run({"HISTOKD_XLA_CPU_CONCURRENCY": "1"}) == (False, None)
    assert run({}, knows=False) == (False, None)


# ------------------------------------------------------------------ layering


def _imports(path: Path, top_level_only=False):
    """(module, names) of every import in a file (all levels unless ``top_level_only``)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, tuple(a.name for a in node.names)))
    return out


def test_runtime_does_not_import_tensorflow_at_import_time():
    mods = [m for m, _ in _imports(REPO / "histokd" / "runtime.py", top_level_only=True)]
    assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in mods)


STAIN = sorted((REPO / "histokd" / "stain").glob("*.py"))
FORBIDDEN = ("histokd.methods", "histokd.train", "histokd.evaluation", "histokd.tasks", "histokd.cli")


@pytest.mark.parametrize("path", STAIN, ids=lambda p: p.name)
def test_stain_layering(path):
    """No upper layer and no package root (``import histokd`` / ``from histokd import X``)."""
    for mod, names in _imports(path):
        assert not mod.startswith(FORBIDDEN), f"{path.name} imports {mod}"
        assert mod != "histokd", f"{path.name} imports the package root ({names})"


def test_stain_modules_form_no_cycle():
    """presets -> macenko, normalizer -> presets; macenko never imports presets or normalizer."""
    graph = {}
    for path in STAIN:
        name = "histokd.stain" if path.stem == "__init__" else f"histokd.stain.{path.stem}"
        deps = set()
        for mod, names in _imports(path):
            if mod.startswith("histokd.stain."):
                deps.add(mod)
            elif mod == "histokd.stain":
                deps |= {f"histokd.stain.{n}" for n in names if (path.parent / f"{n}.py").is_file()}
        graph[name] = deps - {name}
    graph.pop("histokd.stain")  # the package's re-exports sit on top of everything

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        for dep in graph.get(node, ()):
            visit(dep, stack + [node])

    for node in graph:
        visit(node, [])
    assert "histokd.stain.presets" not in graph["histokd.stain.macenko"]
