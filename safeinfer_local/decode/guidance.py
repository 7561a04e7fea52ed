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

Each kind is a :class:`GuidanceSource` class in :data:`SOURCES` (:func:`register`): it says how it parses, which
sides it needs (:class:`SideSpec`: a prefix, a LoRA, another model), whether the guidance side carries a vector,
whether a request may choose it, and how the two sides' rows combine (:class:`SGDS` unless it says otherwise).
To add one, subclass it and register the class: nothing else names a kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..core.datasets import DATA, advbench_rows, advbench_split
from ..core.demos import Demo
from ..core.sampling import guided_logits
from ..errors import UsageError

DEFAULT_GUIDANCE = "prompt"
N_GUIDE_SHOTS = 10
"""Demonstrations in each side's prefix for ``prompt`` guidance (the paper's in-context prompts use 10)."""


@dataclass(frozen=True)
class GuidanceSpec:
    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str | None) -> GuidanceSpec:
        """``KIND`` or ``KIND:PATH`` (a registered :class:`GuidanceSource`), checked; nothing is loaded."""
        spec = spec or DEFAULT_GUIDANCE
        kind, _, rest = spec.partition(":")
        src = SOURCES.get(kind)
        if src is None:
            names = ", ".join(k + (":PATH" if c.takes_path else "") for k, c in SOURCES.items())
            raise UsageError(f"unknown guidance {spec!r} (choose {names})")
        return cls(kind, src.parse_path(rest))

    @property
    def source(self) -> GuidanceSource:
        """The registered source of this kind, for this path."""
        return SOURCES[self.kind](self.path)

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


# -- guidance sources ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SideSpec:
    """What one side of a decode is, as data: a ``key`` (sides are made once per spec and kept), the text decoded
    once before every prompt (demonstrations; ``""`` for none), a LoRA on it, or another model's file."""

    key: str
    prefix: str = ""
    lora: Path | None = None
    model: Path | None = None


PLAIN = SideSpec("plain")
"""An unguided variant's one side (every thread)."""


class GuidanceSource:
    """A kind of guidance (``--guidance KIND`` or ``KIND:PATH``): what the target and guidance sides see, what
    may be shared, what a request may choose, what it needs. Subclass it and :func:`register` the class; the
    decoder, the API, serve and the checks ask these attributes and never name a kind."""

    kind: str = ""
    takes_path: bool = False
    """``KIND:PATH``: the source reads a file (a request may then only repeat the server's own)."""
    per_request: bool = True
    """A request may choose it (serve): it loads no file."""
    guide_vector: float = 0.0
    """The guidance side's control vector as a multiple of γ·SV (0: none; −1: ``negative``). Non-zero needs a
    safety vector and an architecture whose graph applies control vectors."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    @classmethod
    def parse_path(cls, rest: str) -> Path | None:
        """The ``PATH`` after ``KIND:`` (checked), or None for a kind that takes none."""
        if not cls.takes_path:
            if rest:
                raise UsageError(f"--guidance {cls.kind} takes no path")
            return None
        if not rest:
            raise UsageError(f"--guidance {cls.kind} needs a path: {cls.kind}:PATH")
        p = Path(rest)
        if not p.is_file():
            raise UsageError(f"guidance {cls.kind} file not found: {p}")
        return p

    def target(self) -> SideSpec:
        """The target side of a guided variant."""
        return SideSpec("target-plain")

    def guide(self) -> SideSpec | None:
        """The guidance side (None: no guidance, the variant decodes as its unguided twin)."""
        return SideSpec("guide-plain")

    def combine(self, lam: float) -> Combine:
        """How a step's target logits and guidance log-probabilities make the scores sampled from (the paper's
        sGDS by default; see :class:`SGDS`)."""
        return SGDS(lam)


Combine = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(target logits, guidance log-softmax) -> scores``: one step's combination, row by row (mlx-lm's per-request
``logits_processors`` in spirit). A class with ``lam`` says which λ it applies; speculative verification needs
:class:`SGDS`."""


@dataclass(frozen=True)
class SGDS:
    """Safety-guided decoding: ``log p_T − λ/(1−λ) · log p_G`` renormalised (``core.sampling.guided_logits``)."""

    lam: float

    def __call__(self, target_logits: np.ndarray, guide_logprobs: np.ndarray) -> np.ndarray:
        return guided_logits(target_logits, guide_logprobs, self.lam, guide_is_logprobs=True)


SOURCES: dict[str, type[GuidanceSource]] = {}
"""The registered kinds, by name, in the order ``--guidance`` lists them."""


def register(cls: type[GuidanceSource]) -> type[GuidanceSource]:
    """Make a :class:`GuidanceSource` subclass a ``--guidance`` kind (a class decorator)."""
    if not cls.kind or ":" in cls.kind:
        raise ValueError(f"a guidance kind needs a name without ':', not {cls.kind!r}")
    SOURCES[cls.kind] = cls
    return cls


@register
class PromptGuidance(GuidanceSource):
    """The guidance side sees unsafe demonstrations before the conversation; the target, matched safe ones."""

    kind = "prompt"

    def target(self) -> SideSpec:
        return SideSpec("target-prefixed", _prefixes()[0])

    def guide(self) -> SideSpec:
        return SideSpec("guide-prompt", _prefixes()[1])


@lru_cache(maxsize=1)
def _prefixes() -> tuple[str, str]:
    """``prompt`` guidance's two prefixes (safe, unsafe demonstrations), read once: every plan asks for them."""
    return prefix_text(safe_demos()), prefix_text(unsafe_demos())


@register
class NegativeGuidance(GuidanceSource):
    """The guidance side sees the plain conversation steered with −γ·SV."""

    kind = "negative"
    guide_vector = -1.0


class _FileGuidance(GuidanceSource):
    """A guidance side made from a file on disk (``KIND:PATH``), put in the ``SideSpec`` field named as the kind."""

    takes_path, per_request = True, False

    def guide(self) -> SideSpec:
        return SideSpec(f"guide-{self.kind}", **{self.kind: self.path})


@register
class ModelGuidance(_FileGuidance):
    """A separate GGUF (same vocabulary, token for token) on the guidance side."""

    kind = "model"


@register
class LoraGuidance(_FileGuidance):
    """A GGUF LoRA adapter on the guidance context only (the paper's harmful fine-tune)."""

    kind = "lora"


@register
class NoGuidance(GuidanceSource):
    """No guidance: ``sgds`` decodes as ``base``, ``safeinfer`` as ``sa``."""

    kind = "none"

    def guide(self) -> None:
        return None
