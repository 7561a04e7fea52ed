"""Demonstrations (harmful request -> refusal) and the plain ``Q:/A:`` in-context template of the paper."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import DemosError
from ..files import read_text

REFUSAL_PROBE = " I'm sorry, but I can't help with that."
"""The refusal continuation whose log-probability measures safety on a base model that never refuses."""

N_SHOTS = 10
"""Demonstrations per in-context prompt (the paper: 10 random safe demonstrations + 1 held-out query)."""

N_PROMPTS = 100
"""In-context prompts averaged into a function vector (the paper: 100)."""


@dataclass(frozen=True)
class Demo:
    prompt: str
    response: str


def load_demos(path: str | Path) -> list[Demo]:
    """Read a JSONL file of ``{"prompt": ..., "response": ...}`` objects; any problem names the line."""
    path = Path(path)
    if not path.is_file():
        raise DemosError(f"demonstrations file not found: {path}")
    demos: list[Demo] = []
    text = read_text(path, error=DemosError)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DemosError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DemosError(f"{path}:{n}: expected a JSON object with 'prompt' and 'response'")
        for key in ("prompt", "response"):
            val = obj.get(key)
            if not isinstance(val, str) or not val.strip():
                raise DemosError(f"{path}:{n}: missing or empty string field '{key}'")
        demos.append(Demo(obj["prompt"].strip(), obj["response"].strip()))
    if not demos:
        raise DemosError(f"{path}: no demonstrations (the file is empty)")
    return demos


def demos_hash(demos: list[Demo]) -> str:
    """A content hash of the demonstrations, recorded in every vector built from them."""
    h = hashlib.sha256()
    for d in demos:
        h.update(json.dumps([d.prompt, d.response]).encode())
        h.update(b"\n")
    return h.hexdigest()


def qa_prompt(query: str, shots: list[Demo] = ()) -> str:
    """``Q: <q1>\\nA: <a1>\\n\\n ... Q: <query>\\nA:`` (no chat template), as in the paper's code."""
    parts = [f"Q: {d.prompt}\nA: {d.response}\n\n" for d in shots]
    return "".join(parts) + f"Q: {query}\nA:"


def icl_prompts(demos: list[Demo], n_prompts: int = N_PROMPTS, n_shots: int = N_SHOTS, seed: int = 0
                ) -> list[tuple[str, list[Demo]]]:
    """``n_prompts`` (query, shots) pairs: each query is a demonstration prompt held out of its own shots."""
    if len(demos) < 2:
        raise DemosError(f"need at least 2 demonstrations, got {len(demos)}")
    rng = random.Random(seed)
    k = min(n_shots, len(demos) - 1)
    out = []
    for i in range(n_prompts):
        q = demos[i % len(demos)]
        pool = [d for d in demos if d is not q]
        out.append((q.prompt, rng.sample(pool, k)))
    return out
