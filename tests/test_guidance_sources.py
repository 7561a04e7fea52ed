"""Guidance sources as classes (``decode.guidance.SOURCES``): a kind is registered once and everything else asks
its attributes. A toy source registered here, in the test alone, runs through ``generate``; no module outside
``decode/guidance.py`` compares a guidance kind with a name."""

import ast
from pathlib import Path

import numpy as np
import pytest

from safeinfer_local.decode import guidance as gd
from safeinfer_local.decode.guidance import SOURCES, GuidanceSource, GuidanceSpec, SideSpec, register
from safeinfer_local.errors import UsageError

PKG = Path(__file__).resolve().parent.parent / "safeinfer_local"


class GuideOnly:
    """A toy combination: sample from the guidance side alone (its log-probabilities)."""

    def __call__(self, target_logits, guide_logprobs):
        return guide_logprobs


class _Toy(GuidanceSource):
    """A plain guidance side (same weights, no prefix, no vector) whose rows alone are sampled from."""

    kind = "toy"

    def guide(self) -> SideSpec:
        return SideSpec("guide-toy")

    def combine(self, lam: float):
        return GuideOnly()


@pytest.fixture
def toy():
    register(_Toy)
    try:
        yield _Toy
    finally:
        SOURCES.pop("toy", None)


def test_the_shipped_kinds_are_registered_and_parse_as_before(tmp_path):
    assert list(SOURCES) == ["prompt", "negative", "model", "lora", "none"]
    assert str(GuidanceSpec.parse(None)) == gd.DEFAULT_GUIDANCE
    f = tmp_path / "g.gguf"
    f.write_bytes(b"x")
    assert GuidanceSpec.parse(f"lora:{f}").source.guide().lora == f
    for bad, why in (("bogus", "unknown guidance"), ("negative:x", "takes no path"), ("model", "needs a path"),
                     (f"model:{tmp_path / 'nope'}", "not found")):
        with pytest.raises(UsageError, match=why):
            GuidanceSpec.parse(bad)
    with pytest.raises(ValueError):
        register(type("Bad", (GuidanceSource,), {"kind": "a:b"}))


def test_a_registered_source_parses_and_serve_offers_it(toy):
    from safeinfer_local.serve.protocol import request_guidance

    spec = GuidanceSpec.parse("toy")
    assert isinstance(spec.source, _Toy) and "toy" in request_guidance()
    assert "model" not in request_guidance()  # it reads a file on the server's disk


@pytest.mark.model
def test_a_toy_source_runs_through_generate(model, toy):
    """The toy's guidance side is the plain model, and its combination samples from that side alone, so greedy
    text equals base's (the guide decodes the same prompt); an sGDS source on the same side would not be asked."""
    from safeinfer_local.api import SafeInfer

    si = SafeInfer(model=model, vector=None, gate="off", guidance="toy")
    kw = dict(raw=True, max_tokens=16, temperature=0)
    r = si.generate("The capital of France is", variant="sgds", **kw)
    base = si.generate("The capital of France is", variant="base", **kw)
    assert r.response == base.response and r.n_tokens > 0
    assert si.settings.describe("sgds")["guidance"] == "toy"
    # the same side under sGDS with λ = 0.9 is a different distribution: the toy's combination was the one used
    s = si.with_(lam=0.9).score("The capital of France is", " Paris", variant="sgds", raw=True)
    t = si.score("The capital of France is", " Paris", variant="base", raw=True)
    np.testing.assert_allclose(s.token_logprobs, t.token_logprobs, atol=1e-4)


def test_no_module_compares_a_guidance_kind_with_a_name():
    """``x.kind == "negative"`` (or ``in (...)``) anywhere but decode/guidance.py would be a kind hard-coded."""
    names = {"prompt", "negative", "model", "lora", "none"}
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        if f == PKG / "decode" / "guidance.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "kind":
                consts = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
                if consts & names:
                    bad.append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, bad
