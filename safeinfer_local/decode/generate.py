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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..core.sampling import (
    DEFAULT_LAMBDA,
    StopMatcher,
    check_lambda,
    guided_logits,
    log_softmax,
    make_sampler,
    token_logprobs,
)
from ..core.vectors import POSITIONS, SafetyVector, check_gamma
from ..errors import UsageError, VectorError
from ..llama.engine import Detokenizer, Model, default_threads
from .guidance import (
    N_GUIDE_SHOTS,
    GuidanceSpec,
    Side,
    benign_demos,
    check_same_vocab,
    prefix_text,
    safe_demos,
    unsafe_demos,
)

VARIANTS = ("base", "sa", "sgds", "safeinfer")
"""``base`` plain decoding; ``sa`` safety amplification; ``sgds`` safety-guided decoding; ``safeinfer`` both."""

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
    logprobs: bool = False
    """Fill ``Step.logprob`` (one more full-vocabulary pass per token; off by default for speed)."""


@dataclass
class Step:
    """One generated token: its id, the text it completed (may be empty mid-character), its log-probability
    under the distribution it was sampled from at T = 1 (when ``GenConfig.logprobs``; else 0), and whether
    guidance changed the choice."""

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
    guided_tokens: int = 0

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "variant": self.variant,
                "n_tokens": self.n_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "time_to_first_token_s": round(self.time_to_first_token_s, 4), "stop_reason": self.stop_reason,
                "guided_tokens": self.guided_tokens}


def check_variant(variant: str, steering: Steering | None) -> None:
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    if variant in ("sa", "safeinfer") and steering is None:
        raise UsageError(f"variant {variant!r} needs a safety vector (--vector)")


Buffers = tuple  # (prompt[:-1], last prompt token, generated tokens): a control-vector buffer or None each


def position_buffers(steering: Steering | None, n_layer: int, sign: float = 1.0) -> Buffers:
    """Which chunks of the decode layout get the vector, per the steering's positions."""
    if steering is None:
        return (None, None, None)
    b = steering.buffer(n_layer) * np.float32(sign)
    return {"generation": (None, b, b), "last": (None, b, None), "all": (b, b, b)}[steering.positions]


def choose(sample: make_sampler, lt: np.ndarray, lu: np.ndarray | None, lam: float) -> tuple[np.ndarray, int, bool]:
    """One decoding step's choice: the scores sampled from (target logits, or the guided scores when a guidance
    log-softmax ``lu`` is given), the token, and whether guidance changed the token the target alone would
    have picked with the same uniform draw."""
    u = sample.draw()
    if lu is None:
        return lt, sample(lt, u), False
    z = guided_logits(lt, lu, lam, guide_is_logprobs=True)
    tok = sample(z, u)
    return z, tok, tok != sample(lt, u)


class Runner:
    """Runs requests one at a time for any variant: a target side, and for ``sgds``/``safeinfer`` a guidance
    side, each its own llama.cpp context (a control vector applies to a whole context, and the two sides need
    different ones). Sides, and the prefixes they cache, are made on first use and reused across requests."""

    def __init__(self, model: Model, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None,
                 guidance: GuidanceSpec | str | None = None, lam: float = DEFAULT_LAMBDA,
                 guide_model: Model | None = None) -> None:
        self.model = model
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self.guidance = guidance if isinstance(guidance, GuidanceSpec) else GuidanceSpec.parse(guidance)
        self.lam = check_lambda(lam)
        self._guide_model = guide_model
        self._sides: dict[str, Side] = {}
        self.stop_reason = ""
        self.decode_s = 0.0
        # With two sides, each decodes on half the threads, at the same time (llama_decode releases the GIL):
        # measured here, 23.5 ms per step against 26.9 ms for the two decodes one after the other.
        total = n_threads or default_threads()
        self._half_threads = max(1, total // 2)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="guide") if total >= 2 else None
        self.target_prefix = "safe"  # see guidance.py: matched safe vs unsafe demonstrations

    # -- sides ----------------------------------------------------------------------------------------------
    def _side(self, key: str) -> Side:
        side = self._sides.get(key)
        if side is None:
            m, g = self.model, self.guidance
            t = self.n_threads if key == "plain" else self._half_threads
            if key in ("plain", "target-plain"):
                side = Side(m, self.n_ctx, t)
            elif key == "target-prefixed":
                side = Side(m, self.n_ctx, t, m.tokenize(prefix_text(self._target_demos()), add_bos=True))
            elif key == "guide-prompt":
                side = Side(m, self.n_ctx, t, m.tokenize(prefix_text(unsafe_demos()), add_bos=True))
            elif key == "guide-plain":
                side = Side(m, self.n_ctx, t)
            elif key == "guide-lora":
                side = Side(m, self.n_ctx, t, lora=g.path)
            elif key == "guide-model":
                if self._guide_model is None:
                    self._guide_model = Model(g.path)
                    check_same_vocab(m, self._guide_model)
                side = Side(self._guide_model, self.n_ctx, t)
            else:  # pragma: no cover
                raise KeyError(key)
            self._sides[key] = side
        return side

    def _batch_side(self, side: Side, n: int) -> Side:
        """A copy of a side's setup with ``n`` request slots (made once per size and kept)."""
        key = next(k for k, v in self._sides.items() if v is side)
        bkey = f"{key}@{n}"
        b = self._sides.get(bkey)
        if b is None:
            b = Side(side.model, self.n_ctx, self._half_threads if key != "plain" else self.n_threads,
                     side.prefix, lora=side.lora, slots=n)
            self._sides[bkey] = b
        return b

    def _target_demos(self) -> list:
        if self.target_prefix == "safe":
            return safe_demos()
        if self.target_prefix == "benign-plain":
            return [d for d in benign_demos(30) if not d.response.startswith("Sure")][:N_GUIDE_SHOTS]
        return benign_demos()

    def _plan(self, variant: str, steering: Steering | None):
        """(target side, its buffers, guidance side or None, its buffers) for a variant."""
        n_layer = self.model.n_layer
        sa = steering if variant in ("sa", "safeinfer") else None
        kind = self.guidance.kind
        guided = variant in ("sgds", "safeinfer") and kind != "none"
        if not guided:
            return self._side("plain"), position_buffers(sa, n_layer), None, None
        if kind == "prompt":
            return (self._side("target-prefixed"), position_buffers(sa, n_layer), self._side("guide-prompt"),
                    (None, None, None))
        if kind == "negative":
            if steering is None:
                raise UsageError("--guidance negative needs a safety vector (--vector)")
            return (self._side("target-plain"), position_buffers(sa, n_layer), self._side("guide-plain"),
                    position_buffers(steering, n_layer, sign=-1.0))
        return (self._side("target-plain"), position_buffers(sa, n_layer), self._side(f"guide-{kind}"),
                (None, None, None))

    def _both(self, target_call, guide_call):
        """Run the target's and the guidance's decode together (guidance on the worker thread). The wall time
        spent here is the decode time of a step (``decode_s``, for the speed benchmark's split)."""
        t0 = time.perf_counter()
        try:
            if guide_call is None:
                return target_call(), None
            if self._pool is None:
                return target_call(), guide_call()
            fut = self._pool.submit(guide_call)
            try:
                lt = target_call()
            finally:
                lu = fut.result()
            return lt, lu
        finally:
            self.decode_s += time.perf_counter() - t0

    def _start(self, prompt_tokens: list[int], target: Side, tbuf: Buffers, guide: Side | None, gbuf: Buffers):
        """Prefill both sides. When their prompt heads are identical (same weights, no prefix, no vector on
        the head: ``negative`` guidance with ``generation``/``last`` positions), the head is decoded once on
        the target with every thread and its KV copied to the guidance side; the last prompt token is then
        decoded on both sides at once. The guidance side's log-softmax is computed on its own thread."""
        if guide is None:
            return target.start(prompt_tokens, tbuf), None
        if len(prompt_tokens) > 1 and target.shares_head_with(guide, tbuf, gbuf):
            target.ctx.set_threads(self.n_threads or default_threads())
            try:
                t0 = time.perf_counter()
                target.start_head(prompt_tokens, None)
                guide.copy_head_from(target, prompt_tokens)
                self.decode_s += time.perf_counter() - t0
            finally:
                target.ctx.set_threads(self._half_threads)
            return self._both(lambda: target.finish_start(prompt_tokens, tbuf),
                              lambda: log_softmax(guide.finish_start(prompt_tokens, gbuf)))
        return self._both(lambda: target.start(prompt_tokens, tbuf),
                          lambda: log_softmax(guide.start(prompt_tokens, gbuf)))

    # -- the loop -------------------------------------------------------------------------------------------
    def stream(self, prompt_tokens: list[int], steering: Steering | None, cfg: GenConfig,
               variant: str = "base") -> Iterator[Step]:
        """Yield generated tokens until end-of-generation, a stop string, max tokens or a full context.
        Each step says whether guidance changed the token the target alone would have picked (same draw)."""
        if cfg.max_tokens < 1:
            raise UsageError(f"max tokens must be >= 1, not {cfg.max_tokens}")
        if not prompt_tokens:
            raise UsageError("empty prompt")
        sample = make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        target, tbuf, guide, gbuf = self._plan(variant, steering)
        lt, lu = self._start(prompt_tokens, target, tbuf, guide, gbuf)
        detok = Detokenizer(self.model)
        stops = StopMatcher(cfg.stop)
        self.stop_reason = "max_tokens"
        for i in range(cfg.max_tokens):
            z, tok, guided = choose(sample, lt, lu, self.lam)
            lp = float(token_logprobs(z[None, :], [tok])[0]) if cfg.logprobs else 0.0
            if self.model.is_eog(tok):
                self.stop_reason = "eos"
                break
            text, stopped = stops.feed(detok.add(tok))
            if stopped:
                if text:
                    yield Step(tok, text, lp, guided)
                self.stop_reason = "stop"
                return
            yield Step(tok, text, lp, guided)
            if i == cfg.max_tokens - 1:
                break
            if target.room < 1 or (guide is not None and guide.room < 1):
                self.stop_reason = "context"
                break
            lt, lu = self._both(lambda t=tok: target.step(t),
                                (lambda t=tok: log_softmax(guide.step(t))) if guide else None)
        tail = stops.feed(detok.flush())[0] + stops.flush()
        if tail:
            yield Step(-1, tail, 0.0)

    def generate(self, prompt: str, prompt_tokens: list[int], steering: Steering | None, cfg: GenConfig,
                 variant: str) -> Result:
        t0 = time.perf_counter()
        steps: list[Step] = []
        t_first = None
        for st in self.stream(prompt_tokens, steering, cfg, variant):
            if t_first is None:
                t_first = time.perf_counter()
            steps.append(st)
        t_end = time.perf_counter()
        n = sum(1 for s in steps if s.token >= 0)
        ttft = (t_first or t_end) - t0
        gen_time = t_end - (t_first or t_end)
        tps = (n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0
        return Result(prompt, "".join(s.text for s in steps), variant, n, tps, ttft, self.stop_reason, steps,
                      guided_tokens=sum(s.guided for s in steps))

    def score(self, prompt_tokens: list[int], cont_tokens: list[int], steering: Steering | None,
              variant: str = "base") -> np.ndarray:
        """Per-token log-probabilities of ``cont_tokens`` after the prompt, teacher-forced, under the variant's
        own next-token distribution at T = 1 (guided variants: softmax of the guided scores)."""
        rows_t, rows_u = self.score_rows(prompt_tokens, cont_tokens, steering, variant)
        if rows_u is None:
            return token_logprobs(rows_t, cont_tokens)
        return token_logprobs(guided_logits(rows_t, rows_u, self.lam), cont_tokens)

    def score_rows(self, prompt_tokens: list[int], cont_tokens: list[int], steering: Steering | None,
                   variant: str = "base") -> tuple[np.ndarray, np.ndarray | None]:
        """The raw next-token logits behind :meth:`score`: the target side's rows and the guidance side's
        (``None`` for unguided variants), one row per continuation token. Any λ applies to them afterwards
        (``guided_logits`` is a pure function), so a λ sweep costs one pass."""
        if not cont_tokens:
            raise UsageError("empty continuation")
        if not prompt_tokens:
            raise UsageError("empty prompt")
        target, tbuf, guide, gbuf = self._plan(variant, steering)
        return self._both(
            lambda: self._rows(target, tbuf, prompt_tokens, cont_tokens),
            (lambda: self._rows(guide, gbuf, prompt_tokens, cont_tokens)) if guide else None)

    @staticmethod
    def _rows(side: Side, buffers: Buffers, prompt_tokens: list[int], cont_tokens: list[int]) -> np.ndarray:
        first = side.start(prompt_tokens, buffers)
        if side.room < len(cont_tokens):
            raise UsageError(f"prompt + continuation do not fit the context of {side.ctx.n_ctx} tokens")
        rows = [first[None, :]]
        if len(cont_tokens) > 1:
            rows.append(side.rows(cont_tokens[:-1]))
        return np.concatenate(rows)


@dataclass
class _Slot:
    key: object
    prompt: str
    sampler: make_sampler
    detok: Detokenizer
    stops: StopMatcher
    t0: float
    steps: list = field(default_factory=list)
    t_first: float | None = None
    n: int = 0
    guided: int = 0
    text: str = ""


def generate_many(runner: Runner, requests, steering: Steering | None, cfg: GenConfig, variant: str,
                  n_parallel: int):
    """Yield ``(key, Result or UsageError)`` for each ``(key, prompt_text, prompt_tokens)`` request, in the
    order they finish. Up to ``n_parallel`` requests share each decode batch (target and guidance side each
    batched, the two sides at the same time); a finished slot is refilled at once. Every request decodes the
    same way as alone: its prompt head by itself, then one token per step."""
    if n_parallel < 1:
        raise UsageError(f"--parallel must be >= 1, not {n_parallel}")
    t_side, tbuf, g_side, gbuf = runner._plan(variant, steering)
    target = runner._batch_side(t_side, n_parallel)
    guide = runner._batch_side(g_side, n_parallel) if g_side is not None else None
    reqs = iter(requests)
    free = list(range(n_parallel))
    active: dict[int, _Slot] = {}
    fresh: dict[int, list[int]] = {}  # slot -> its last prompt token, to decode with the vector's "last" state
    logits_t: dict[int, np.ndarray] = {}
    logits_u: dict[int, np.ndarray] = {}
    exhausted = False
    held = None  # a request read but not yet started
    room = min(target.ctx.n_ctx, guide.ctx.n_ctx if guide else target.ctx.n_ctx)
    while True:
        # refill free slots
        while free and (held is not None or not exhausted):
            if held is None:
                try:
                    held = next(reqs)
                except StopIteration:
                    exhausted = True
                    break
            key, text, toks = held
            need = len(toks) + cfg.max_tokens
            if need > room:
                held = None
                yield key, UsageError(f"prompt is {len(toks)} tokens; with --max-tokens {cfg.max_tokens} it "
                                      f"needs {need} but the context holds {room} (raise --n-ctx)")
                continue
            if active and max(target.used(), guide.used() if guide else 0) + need > room:
                break  # the shared KV is full: wait for a slot to finish
            held = None
            i = free.pop(0)
            try:
                last_t, last_u = runner._both(lambda i=i, t=toks: target.begin(i, t, tbuf[0]),
                                              (lambda i=i, t=toks: guide.begin(i, t, gbuf[0])) if guide else None)
            except UsageError as e:
                free.insert(0, i)
                yield key, e
                continue
            fresh[i] = last_t
            active[i] = _Slot(key, text, make_sampler(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed),
                              Detokenizer(runner.model), StopMatcher(cfg.stop), time.perf_counter())
        if not active:
            if held is None and exhausted:
                return
            continue
        # one batched step: fresh slots' last prompt token (vector state "last") and the others' new token
        def run_side(side: Side, bufs: Buffers, normalise: bool) -> dict[int, np.ndarray]:
            out: dict[int, np.ndarray] = {}
            groups = [([(i, t) for i, t in fresh.items()], bufs[1]),
                      ([(i, [s.steps[-1]]) for i, s in active.items() if i not in fresh], bufs[2])]
            if groups[0][0] and groups[1][0] and (bufs[1] is bufs[2] or (bufs[1] is None and bufs[2] is None)):
                groups = [(groups[0][0] + groups[1][0], bufs[1])]
            for items, buf in groups:
                if items:
                    rows = side.decode_slots(items, buf)
                    for (i, _), row in zip(items, rows, strict=True):
                        out[i] = log_softmax(row) if normalise else row
            return out

        lt, lu = runner._both(lambda: run_side(target, tbuf, False),
                              (lambda: run_side(guide, gbuf, True)) if guide else None)
        logits_t, logits_u = lt, lu or {}
        fresh.clear()
        for i in list(active):
            s = active[i]
            row = logits_t[i]
            _, tok, guided = choose(s.sampler, row, logits_u.get(i), runner.lam)
            s.guided += guided
            done_reason = None
            if runner.model.is_eog(tok):
                done_reason = "eos"
            else:
                text, stopped = s.stops.feed(s.detok.add(tok))
                s.steps.append(tok)
                s.n += 1
                s.text += text
                if s.t_first is None:
                    s.t_first = time.perf_counter()
                if stopped:
                    done_reason = "stop"
                elif s.n >= cfg.max_tokens:
                    done_reason = "max_tokens"
            if done_reason:
                if done_reason != "stop":
                    s.text += s.stops.feed(s.detok.flush())[0] + s.stops.flush()
                t_end = time.perf_counter()
                ttft = (s.t_first or t_end) - s.t0
                gen = t_end - (s.t_first or t_end)
                tps = (s.n - 1) / gen if s.n > 1 and gen > 0 else 0.0
                yield s.key, Result(s.prompt, s.text, variant, s.n, tps, ttft, done_reason,
                                    guided_tokens=s.guided)
                del active[i]
                target.ctx.truncate(target.slot_seq(i), 0)
                if guide is not None:
                    guide.ctx.truncate(guide.slot_seq(i), 0)
                free.append(i)
