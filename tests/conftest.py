import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model():
    from safeinfer_local.core.models import default_model_path
    from safeinfer_local.llama.engine import Model

    return Model(default_model_path())


@pytest.fixture(scope="session")
def si(model):
    from safeinfer_local.api import SafeInfer

    return SafeInfer(model=model, vector="default")


def run_cli(*args, input=None, timeout=600):
    """Run ``python cli.py ARGS`` as a user would; returns the CompletedProcess."""
    env = dict(os.environ)
    env.pop("SAFEINFER_VERBOSE", None)
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], input=input,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_one_line_error(proc, code=2, contains=None):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    if contains:
        assert contains.lower() in lines[0].lower(), lines[0]
    return lines[0]
