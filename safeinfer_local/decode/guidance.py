"""Guidance sources for safety-guided decoding (sGDS) and the two-sided decode that serves them.

A *side* is one context that follows the conversation: the target (served) side and the guidance side. Each
side may carry a fixed prefix (decoded once per process into KV sequence 0 and copied into the working
sequence 1 for every request, never re-decoded) and a control vector.

Guidance sources (``--guidance``):

- ``prompt`` (default, one set of weights): the guidance side sees 10 unsafe demonstrations (AdvBench requests
  from the recorded ``unsafe_guidance`` split with their compliant openings ``Sure, here is ...``) before the
  conversation, without SA. So that the two sides differ by the safety behaviour and not by prompt length or
  format, the target side sees 10 safe demonstrations (harmful request -> refusal, the shipped
  ``vectors/safe_demos.jsonl``) in the same template. Measured on the default model: a plain target against an
  unsafe-prefixed guidance crushes every answer, and a benign-answer prefix on the target
  (``data/benign_demos.jsonl``, kept as ``Runner.target_prefix = "benign"`` for comparison) pulls the target
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

import numpy as np

from ..core.datasets import DATA, advbench_rows, advbench_split
from ..core.demos import Demo
from ..errors import UsageError
from ..llama.engine import Context, Model

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


def check_same_vocab(target: Model, guide: Model) -> None:
    """A guidance model must share the target's vocabulary token for token."""
    if guide.n_vocab != target.n_vocab:
        raise UsageError(f"guidance model {guide.path.name} has a vocabulary of {guide.n_vocab} tokens, the target "
                         f"{target.n_vocab}: they must share one vocabulary")
    a, b = target.vocab_fingerprint(), guide.vocab_fingerprint()
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            raise UsageError(f"guidance model {guide.path.name} differs from the target's vocabulary at token {i} "
                             f"({x!r} vs {y!r})")


class Side:
    """One context following the conversation, with an optional cached prefix and control-vector switching."""

    def __init__(self, model: Model, n_ctx: int, n_threads: int | None, prefix: list[int] | None = None,
                 lora: Path | None = None, slots: int = 1) -> None:
        self.model = model
        self.prefix = list(prefix or [])
        self.slots = slots
        self.ctx: Context = model.context(n_ctx=n_ctx, n_seq_max=slots + (1 if self.prefix else 0),
                                          n_threads=n_threads)
        self.lora = lora
        if lora is not None:
            self.ctx.set_lora(lora)
        self.seq = 1 if self.prefix else 0
        self._prefix_decoded = False

    def start(self, prompt_tokens: list[int], buffers: tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]
              ) -> np.ndarray:
        """Decode a fresh request; ``buffers`` = control vector for (prompt[:-1], last prompt token, after).
        The prompt's own BOS is dropped after a prefix (the prefix starts with BOS). Returns the last logits."""
        self.start_head(prompt_tokens, buffers[0])
        return self.finish_start(prompt_tokens, buffers)

    def start_head(self, prompt_tokens: list[int], head_buffer: np.ndarray | None) -> None:
        """Reset to the (cached) prefix and decode the prompt minus its last token."""
        ctx = self.ctx
        toks = list(prompt_tokens)
        if self.prefix:
            if toks and toks[0] == self.model.bos:
                toks = toks[1:]
            if not self._prefix_decoded:
                ctx.clear()
                ctx.set_control_vector(None)
                ctx.decode(self.prefix, seq=0, logits="none")
                self._prefix_decoded = True
            ctx.truncate(1, 0)
            ctx.copy_seq(0, 1)
        else:
            ctx.clear()
        if not toks:
            raise UsageError("empty prompt")
        if ctx.pos[self.seq] + len(toks) >= ctx.n_ctx:
            raise UsageError(f"prompt is {len(toks)} tokens (+{len(self.prefix)} of guidance prefix) but the "
                             f"context holds {ctx.n_ctx} (shorten it or raise --n-ctx)")
        head = toks[:-1]
        if head:
            ctx.set_control_vector(head_buffer)
            ctx.decode(head, seq=self.seq, logits="none")

    def finish_start(self, prompt_tokens: list[int], buffers) -> np.ndarray:
        """Decode the last prompt token (after :meth:`start_head` or an imported head) and return its logits."""
        ctx = self.ctx
        ctx.set_control_vector(buffers[1])
        logits = ctx.decode(prompt_tokens[-1:], seq=self.seq)
        ctx.set_control_vector(buffers[2])
        return logits

    def shares_head_with(self, other: Side, buffers, other_buffers) -> bool:
        """Both sides would compute the same KV for the prompt head: same weights, no prefix, no LoRA, and no
        control vector on the head on either side."""
        return (self.model is other.model and not self.prefix and not other.prefix and not self.lora
                and not other.lora and buffers[0] is None and other_buffers[0] is None)

    def copy_head_from(self, other: Side, prompt_tokens: list[int]) -> None:
        """Take the prompt head's KV from ``other`` (decoded there) instead of decoding it again."""
        self.ctx.clear()
        self.ctx.import_seq(other.ctx.export_seq(other.seq), self.seq, len(prompt_tokens) - 1)

    # -- several requests at once (filter --parallel): slot i lives in KV sequence slot_seq(i) --------------
    def slot_seq(self, i: int) -> int:
        return i + (1 if self.prefix else 0)

    def begin(self, i: int, prompt_tokens: list[int], head_buffer: np.ndarray | None) -> list[int]:
        """Reset slot ``i`` to the cached prefix and decode its prompt head alone; returns the last prompt
        token, which the caller decodes batched with the other slots."""
        ctx, seq = self.ctx, self.slot_seq(i)
        toks = list(prompt_tokens)
        if self.prefix:
            if toks and toks[0] == self.model.bos:
                toks = toks[1:]
            if not self._prefix_decoded:
                ctx.set_control_vector(None)
                ctx.decode(self.prefix, seq=0, logits="none")
                self._prefix_decoded = True
            ctx.truncate(seq, 0)
            ctx.copy_seq(0, seq)
        else:
            ctx.truncate(seq, 0)
        if not toks:
            raise UsageError("empty prompt")
        if toks[:-1]:
            ctx.set_control_vector(head_buffer)
            ctx.decode(toks[:-1], seq=seq, logits="none")
        return toks[-1:]

    def decode_slots(self, items: list[tuple[int, list[int]]], buffer: np.ndarray | None) -> list[np.ndarray]:
        self.ctx.set_control_vector(buffer)
        return self.ctx.decode_multi([(self.slot_seq(i), toks) for i, toks in items])

    def used(self) -> int:
        """KV cells in use by the slots (the prefix's cells are shared, counted once)."""
        n = len(self.prefix)
        return n + sum(max(0, self.ctx.pos[self.slot_seq(i)] - n) for i in range(self.slots))

    def step(self, token: int) -> np.ndarray:
        return self.ctx.decode([token], seq=self.seq)

    def rows(self, tokens: list[int]) -> np.ndarray:
        return self.ctx.decode(tokens, seq=self.seq, logits="all")

    @property
    def room(self) -> int:
        return self.ctx.n_ctx - self.ctx.pos[self.seq]
