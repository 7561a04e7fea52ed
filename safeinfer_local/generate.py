"""One generation loop (a generator of steps) and teacher-forced scoring, for every variant.

Decode layout, the same for every variant so that variants differ only by the method (llama.cpp is not batch
invariant, see DESIGN §3): the prompt minus its last token in one go, then the last prompt token alone, then one
token at a time (``generate``) or the whole continuation in one go (``score``). Safety amplification switches
the control vector on and off between these chunks according to its ``positions``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .engine import Context, Detokenizer, Model
from .errors import UsageError, VectorError
from .sampling import StopMatcher, make_sampler, token_logprobs
from .vectors import POSITIONS, SafetyVector, check_gamma

VARIANTS = ("base", "sa", "sgds", "safeinfer")
"""``base`` plain decoding; ``sa`` safety amplification; ``sgds`` safety-guided decoding; ``safeinfer`` both."""
IMPLEMENTED = ("base", "sa")

DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
"""Sampling defaults follow llama.cpp's own (``llama-cli``: temp 0.8, top-k 40, top-p 0.95)."""


@dataclass(frozen=True)
class Steering:
    """Safety amplification as applied: vector, γ, the blocks it is added to, and at which positions."""

    vector: SafetyVector
    gamma: float
    layers: tuple[int, ...]
    positions: str

    @classmethod
    def from_vector(cls, vector: SafetyVector, model: Model, gamma: float | None = None,
                    layers: tuple[int, ...] | None = None, positions: str | None = None,
                    warn=None) -> Steering:
        """Resolve settings (explicit value, else the vector's recommendation) and check the vector fits."""
        if vector.n_embd != model.n_embd:
            raise VectorError(f"vector has n_embd {vector.n_embd} but the model {model.name} has {model.n_embd}: "
                              "it was built for another model")
        hint = vector.model_hint
        if hint and hint not in (model.name, model.arch, model.path.name, model.path.stem):
            msg = f"vector was built for {hint!r}, this model is {model.name!r} ({model.arch})"
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
        g = check_gamma(vector.gamma if gamma is None else gamma)
        use = tuple(layers) if layers else vector.layers
        for i in use:
            if not 1 <= i <= model.n_layer - 1:
                raise VectorError(f"layer {i} is out of range: {model.name} has blocks 1..{model.n_layer - 1} "
                                  "that can be steered")
            if i not in vector.directions:
                raise VectorError(f"layer {i} is not in the vector (it has {sorted(vector.directions)})")
        pos = positions or vector.positions
        if pos not in POSITIONS:
            raise UsageError(f"positions must be one of {', '.join(POSITIONS)}, not {pos!r}")
        return cls(vector, g, use, pos)

    def buffer(self, n_layer: int) -> np.ndarray:
        return self.vector.buffer(n_layer, self.gamma, self.layers)


@dataclass
class GenConfig:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Step:
    """One generated token: its id, the text it completed (may be empty mid-character), its log-probability
    under the distribution it was sampled from (T = 1), and whether guidance changed the choice."""

    token: int
    text: str
    logprob: float
    guided: bool = False


@dataclass
class Result:
    prompt: str
    response: str
    variant: str
    n_tokens: int
    tokens_per_s: float
    time_to_first_token_s: float
    stop_reason: str
    steps: list[Step] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "variant": self.variant,
                "n_tokens": self.n_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "time_to_first_token_s": round(self.time_to_first_token_s, 4), "stop_reason": self.stop_reason}


def check_variant(variant: str, steering: Steering | None) -> None:
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if variant not in IMPLEMENTED:
        raise UsageError(f"variant {variant!r} is not available yet (available: {', '.join(IMPLEMENTED)})")
    if variant in ("sa", "safeinfer") and steering is None:
        raise UsageError(f"variant {variant!r} needs a safety vector (--vector)")


class Runner:
    """Owns one context and runs requests on it, one at a time."""

    def __init__(self, model: Model, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None) -> None:
        self.model = model
        self.ctx: Context = model.context(n_ctx=n_ctx, n_threads=n_threads)

    def _apply(self, steering: Steering | None, on: bool) -> None:
        self.ctx.set_control_vector(steering.buffer(self.model.n_layer) if (steering and on) else None)

    def prefill(self, prompt_tokens: list[int], steering: Steering | None) -> np.ndarray:
        """Decode the prompt (fresh context) and return the logits after its last token."""
        if not prompt_tokens:
            raise UsageError("empty prompt")
        if len(prompt_tokens) >= self.ctx.n_ctx:
            raise UsageError(f"prompt is {len(prompt_tokens)} tokens but the context holds {self.ctx.n_ctx} "
                             "(shorten it or raise --n-ctx)")
        self.ctx.clear()
        pos = steering.positions if steering else None
        head, last = prompt_tokens[:-1], prompt_tokens[-1:]
        if head:
            self._apply(steering, pos == "all")
            self.ctx.decode(head, logits="none")
        self._apply(steering, True)
        logits = self.ctx.decode(last)
        self._apply(steering, pos in ("generation", "all"))
        return logits

    def stream(self, prompt_tokens: list[int], steering: Steering | None, cfg: GenConfig) -> Iterator[Step]:
        """Yield generated tokens until EOS / end-of-generation, a stop string, max tokens or a full context."""
        if cfg.max_tokens < 1:
            raise UsageError(f"max tokens must be >= 1, not {cfg.max_tokens}")
        sample = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        logits = self.prefill(prompt_tokens, steering)
        detok = Detokenizer(self.model)
        stops = StopMatcher(cfg.stop)
        self.stop_reason = "max_tokens"
        for i in range(cfg.max_tokens):
            tok = sample(logits)
            lp = float(token_logprobs(logits[None, :], [tok])[0])
            if self.model.is_eog(tok):
                self.stop_reason = "eos"
                break
            text, stopped = stops.feed(detok.add(tok))
            if stopped:
                if text:
                    yield Step(tok, text, lp)
                self.stop_reason = "stop"
                return
            yield Step(tok, text, lp)
            if i == cfg.max_tokens - 1:
                break
            if self.ctx.pos[0] + 1 > self.ctx.n_ctx:
                self.stop_reason = "context"
                break
            logits = self.ctx.decode([tok])
        tail = stops.feed(detok.flush())[0] + stops.flush()
        if tail:
            yield Step(-1, tail, 0.0)

    def generate(self, prompt: str, prompt_tokens: list[int], steering: Steering | None, cfg: GenConfig,
                 variant: str) -> Result:
        t0 = time.perf_counter()
        steps: list[Step] = []
        t_first = None
        for st in self.stream(prompt_tokens, steering, cfg):
            if t_first is None:
                t_first = time.perf_counter()
            steps.append(st)
        t_end = time.perf_counter()
        n = sum(1 for s in steps if s.token >= 0)
        ttft = (t_first or t_end) - t0
        gen_time = t_end - (t_first or t_end)
        tps = (n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0
        return Result(prompt, "".join(s.text for s in steps), variant, n, tps, ttft, self.stop_reason, steps)

    def score(self, prompt_tokens: list[int], cont_tokens: list[int], steering: Steering | None) -> np.ndarray:
        """Per-token log-probabilities of ``cont_tokens`` after the prompt, teacher-forced, at T = 1."""
        if not cont_tokens:
            raise UsageError("empty continuation")
        need = len(prompt_tokens) + len(cont_tokens)
        if need > self.ctx.n_ctx:
            raise UsageError(f"prompt + continuation is {need} tokens but the context holds {self.ctx.n_ctx}")
        first = self.prefill(prompt_tokens, steering)
        rows = [first]
        if len(cont_tokens) > 1:
            rows.extend(self.ctx.decode(cont_tokens[:-1], logits="all"))
        return token_logprobs(np.stack(rows), cont_tokens)
