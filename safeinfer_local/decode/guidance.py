"""Guidance sources for safety-guided decoding (sGDS): what the guidance side sees (pure: no engine here, so
parsing ``--guidance`` loads nothing; :mod:`.sides` runs them).

Guidance sources (``--guidance``):

- ``prompt`` (default, one set of weights): the guidance side sees 10 unsafe demonstrations (AdvBench requests
  from the recorded ``unsafe_guidance`` split with their compliant openings ``Sure, here is ...``) before the
  conversation, without SA. So that the two sides differ by the safety behaviour and not by prompt length or
  format, the target side sees 10 safe demonstrations (harmful request -> refusal, the shipped
  ``vectors/safe_demos.jsonl``) in the same template. Measured on the default model: a plain target against an
  unsafe-prefixed guidance crushes every answer, and a benign-answer prefix on the target
  (``data/benign_demos.jsonl``, compared in ``benchmarks/guidance_tradeoff.py``) pulls the target
  itself towards "Sure, here is" (docs/results/sgds_tradeoff_*.json).
- ``negative``: the guidance side sees the plain conversation with −γ·SV.
- ``model:PATH``: a separate GGUF whose vocabulary must match the target's token for token.
- ``lora:PATH``: a GGUF LoRA adapter applied to the guidance context only (the paper's harmful fine-tune).
- ``none``: no guidance (``sgds`` = ``base``, ``safeinfer`` = ``sa``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.datasets import DATA, advbench_rows, advbench_split
from ..core.demos import Demo
from ..errors import UsageError

KINDS = ("prompt", "negative", "model", "lora", "none")
DEFAULT_GUIDANCE = "prompt"
N_GUIDE_SHOTS = 10
"""Demonstrations in each side's prefix for ``prompt`` guidance (the paper's in-context prompts use 10)."""


@dataclass(frozen=True)
class GuidanceSpec:
    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str | None) -> GuidanceSpec:
        spec = spec or DEFAULT_GUIDANCE
        kind, _, rest = spec.partition(":")
        if kind not in KINDS:
            raise UsageError(f"unknown guidance {spec!r} (choose prompt, negative, none, model:PATH or lora:PATH)")
        if kind in ("model", "lora"):
            if not rest:
                raise UsageError(f"--guidance {kind} needs a path: {kind}:PATH")
            p = Path(rest)
            if not p.is_file():
                raise UsageError(f"guidance {kind} file not found: {p}")
            return cls(kind, p)
        if rest:
            raise UsageError(f"--guidance {kind} takes no path")
        return cls(kind)

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind


def unsafe_demos(n: int = N_GUIDE_SHOTS) -> list[Demo]:
    """Harmful request -> compliant opening (AdvBench goal/target), from the recorded guidance split."""
    rows = advbench_rows()
    return [Demo(rows[i]["goal"], rows[i]["target"] + ".") for i in advbench_split()["unsafe_guidance"][:n]]


def safe_demos(n: int = N_GUIDE_SHOTS) -> list[Demo]:
    """Harmful request -> refusal: the shipped safe demonstrations (the vector's own split)."""
    from ..core.demos import load_demos
    from ..core.models import asset

    return load_demos(asset("safe_demos.jsonl"))[:n]


def benign_demos(n: int = N_GUIDE_SHOTS) -> list[Demo]:
    """Benign request -> helpful answer (written for this project), the target side's matching prefix."""
    lines = (DATA / "benign_demos.jsonl").read_text(encoding="utf-8").splitlines()
    out = [Demo(d["prompt"], d["response"]) for d in map(json.loads, filter(None, lines))]
    return out[:n]


def prefix_text(demos: list[Demo]) -> str:
    """The demonstrations in the paper's plain template, ready to precede a ``Q: ...`` or chat prompt."""
    return "".join(f"Q: {d.prompt}\nA: {d.response}\n\n" for d in demos)
