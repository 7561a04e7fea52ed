"""What `vectors build` costs and says about it, on a tiny random-weight GGUF (tests/tiny_gguf.py): the plan printed
before the first pass, the time estimate and progress of every stage, and the fv head budget (--max-heads): every
head is screened on one prompt and only the budget's heads are patched into the rest, a measured head's AIE is the
full scan's, and the vector loads."""

from collections import Counter

import numpy as np
import pytest

from safeinfer_local.core.demos import load_demos
from safeinfer_local.core.vectors import SafetyVector
from safeinfer_local.llama.engine import ActivationHook, Model
from safeinfer_local.workflows import build

from .conftest import ROOT, assert_one_line_error, run_cli
from .tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.model

DEMOS = ROOT / "vectors" / "safe_demos.jsonl"
L, H, HD = 4, 4, 16  # 16 heads in all
SMALL = dict(n_prompts=3, n_shots=2, aie_prompts=2, n_threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("cost") / "tiny.gguf", n_layer=L, n_embd=H * HD, n_head=H)


@pytest.fixture(scope="module")
def model(tiny):
    return Model(tiny)


class _CountingHook(ActivationHook):
    """Records each (block, head) whose output a patch actually replaced."""

    patched: list[tuple[int, int]] = []

    def __init__(self, names=(), patch=None):
        if patch is not None:
            def counted(name, rows, _patch=patch):
                new = _patch(name, rows)
                if new is not None:
                    changed = np.flatnonzero((new != rows).any(axis=0))
                    heads = {int(c) // HD for c in changed}
                    assert len(heads) <= 1, "a patch replaced more than one head"
                    _CountingHook.patched.append((int(name.split("-")[1]), heads.pop() if heads else -1))
                return new
            patch = counted
        super().__init__(names, patch)


def _build(model, monkeypatch, **kw):
    _CountingHook.patched = []
    monkeypatch.setattr(build, "ActivationHook", _CountingHook)
    notes, steps = [], []
    v = build.build_vector(model, load_demos(DEMOS), method="fv", layers=(2,), heads=3, note=notes.append,
                           progress=lambda *a: steps.append(a), **SMALL, **kw)
    return v, list(_CountingHook.patched), notes, steps


def test_budget_bounds_the_scan_and_keeps_the_full_scans_aie(model, monkeypatch):
    full, patched_full, _, _ = _build(model, monkeypatch, max_heads=L * H)
    assert Counter(patched_full) == {(i, h): 2 for i in range(L) for h in range(H)}  # every head, every prompt
    assert full.meta["heads_scanned"] == L * H and full.meta["screen_prompts"] == 0

    v, patched, notes, steps = _build(model, monkeypatch, max_heads=5)
    n = Counter(patched)
    # every head screened on the first prompt; only the 5 kept are patched into the second
    assert set(n) == {(i, h) for i in range(L) for h in range(H)}
    measured = {k for k, c in n.items() if c == 2}
    assert len(measured) == 5 and sum(n.values()) == L * H + 5
    assert v.meta["max_heads"] == 5 and v.meta["heads_scanned"] == 5 and v.meta["screen_prompts"] == 1
    chosen = {(h["layer"], h["head"]) for h in v.meta["heads"]}
    assert len(chosen) == 3 and chosen <= measured
    # a measured head's AIE is the full scan's (the same patches on the same prompts)
    full_aie = {(h["layer"], h["head"]): h["aie"] for h in full.meta["heads"]}
    assert any(k in full_aie for k in chosen)
    for h in v.meta["heads"]:
        if (h["layer"], h["head"]) in full_aie:
            assert h["aie"] == pytest.approx(full_aie[(h["layer"], h["head"])], abs=1e-4)
    # the plan counted what ran: every stage's last progress step is its planned pass count (baselines included)
    last = {}
    for stage, done, total in steps:
        last[stage] = (done, total)
    assert last == {"capture": (3, 3), "screen": (L * H + 1, L * H + 1), "heads": (6, 6)}
    assert ("head scan: all 4 layers x 4 heads = 16 screened on 1 prompt(s), then the top 5 (--max-heads) on the "
            "other 1: 16 + 5 patched passes (every head on every prompt: 32)") in notes[0]
    assert any(x.startswith("time: about") for x in notes[1:])


def test_budget_vector_is_a_valid_control_vector(model, monkeypatch, tmp_path):
    v, _, _, _ = _build(model, monkeypatch, max_heads=6)
    d = v.directions[2]
    assert d.shape == (H * HD,) and np.isfinite(d).all() and np.linalg.norm(d) > 0
    v.save(tmp_path / "fv.gguf")
    w = SafetyVector.load(tmp_path / "fv.gguf")
    assert w.meta["max_heads"] == 6 and np.allclose(w.directions[2], d)
    # and llama.cpp applies it: block 2's output moves by γ·v on a steered row
    from safeinfer_local.decode.steering import check_steerable

    check_steerable(model, (2,), "a test", 1)


def test_cli_prints_the_plan_and_a_time_estimate_and_records_the_budget(tiny, tmp_path):
    out = tmp_path / "fv.gguf"
    p = run_cli("vectors", "build", "--model", tiny, "--demos", DEMOS, "--method", "fv", "--layer", 2,
                "--prompts", 3, "--shots", 2, "--aie-prompts", 2, "--heads", 2, "--max-heads", 4, "--threads", 1,
                "--out", out)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    plan = next(x for x in lines if x.startswith("fv build: "))
    assert "forward passes" in plan and "prompt tokens" in plan and "16 + 4 patched passes" in plan
    assert lines.index(plan) < min(i for i, x in enumerate(lines) if x.startswith("capture: "))
    assert any(x.startswith("time: about") for x in lines)
    assert {"capture: 3/3", "screen: 17/17", "heads: 5/5"} <= set(lines)  # every stage reports to its end
    assert SafetyVector.load(out).meta["heads_scanned"] == 4

    md = run_cli("vectors", "build", "--model", tiny, "--demos", DEMOS, "--method", "mean-diff", "--layer", 2,
                 "--prompts", 3, "--shots", 2, "--threads", 1, "--out", tmp_path / "md.gguf")
    assert md.returncode == 0, md.stderr
    plan = next(x for x in md.stderr.splitlines() if x.startswith("mean-diff build: "))
    assert "6 forward passes" in plan  # 3 in-context prompts + their 3 queries alone


@pytest.mark.parametrize("args, contains", [
    (("--max-heads", "0"), "--max-heads must be >= 1"),
    (("--max-heads", "-3"), "--max-heads must be >= 1"),
    (("--max-heads", "2", "--heads", "3"), "more than the 2 heads"),
    (("--max-heads", "many"), "max-heads"),
])
def test_bad_budget_is_one_line(tiny, tmp_path, args, contains):
    p = run_cli("vectors", "build", "--model", tiny, "--demos", DEMOS, "--method", "fv", *args,
                "--out", tmp_path / "x.gguf")
    assert_one_line_error(p, contains=contains)
    assert not (tmp_path / "x.gguf").exists()
