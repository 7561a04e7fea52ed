"""The one decode loop: a batch generator in the spirit of mlx-lm's ``BatchGenerator``.

``insert`` a request, ``step`` all slots, finished requests leave with their :class:`Result`. Single generation
is a batch of one; ``generate``, ``chat``, ``filter --parallel``, ``bench harm`` and the Python API all go
through it.

Three parts: this module holds the slots and admission (the request queue, KV room, prompts admitted in pieces,
sampling, stop strings, results); :mod:`.layout` how the sides are laid out (a context each, or both in one) and
decoded; :mod:`.speculation` the speculative round (``--speculate K``), a strategy with its own per-slot state.

Decode order, the same for every variant and every batch size (llama.cpp is not batch invariant, so variants
must differ only by the method): a request's prompt minus its last token is decoded alone when it is admitted,
then its last prompt token in the next batched step (with the vector state of ``positions``' second chunk), then
one token per step.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from ..core.sampling import StopMatcher, make_sampler, token_logprobs
from ..core.settings import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    check_max_tokens,
    check_sampling,
    check_seed,
    check_speculate,
)
from ..errors import UsageError
from ..llama.engine import Detokenizer, Model
from .gating import Handoff
from .guidance import SGDS, Combine
from .layout import Both, make
from .sides import Side
from .speculation import Speculation
from .steering import Buffers

FINISH_REASONS = ("eos", "stop", "max_tokens", "context", "refused")

Token = tuple[int, float, bool]
"""A sampled token as a step hands it on: its id, its log-probability (0.0 unless asked), whether guidance chose it."""

PREFILL_BUDGET = 0.75
"""The share of a running step's time that a piece of a long prompt may add to it (chunked prefill): the running
requests' inter-token time grows to about 1.75× while a long prompt is admitted."""


@dataclass(frozen=True)
class GenConfig:
    """How to generate one request. Checked when made."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    """Fill ``Step.logprob`` (one more full-vocabulary pass per token; off by default for speed)."""

    def __post_init__(self) -> None:
        check_max_tokens(self.max_tokens)
        check_sampling(self.temperature, self.top_k, self.top_p)
        check_seed(self.seed)
        object.__setattr__(self, "stop", tuple(self.stop))

    def sampler(self) -> make_sampler:
        return make_sampler(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass(frozen=True)
class Step:
    """One sampled token: its id, the text it completed (may be empty mid-character), its log-probability under
    the distribution it was sampled from at T = 1 (when ``GenConfig.logprobs``; else 0), and whether guidance
    changed the choice. The last step of a request has ``finish`` set (one of :data:`FINISH_REASONS`) and carries
    any text held back until then; a request that ends on an end-of-generation token ends with that token's step
    (``eog``), which is not part of the reply."""

    token: int
    text: str
    logprob: float = 0.0
    guided: bool = False
    finish: str | None = None
    eog: bool = False


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
    gate_score: float | None = None
    """The harm gate's score for the prompt (None: no gate ran)."""
    flagged: bool | None = None
    """The harm gate's verdict: True = judged harmful (decoded as asked, or refused), False = judged benign and
    decoded plainly (no vector, no guidance), None = no gate ran."""
    drafted: int = 0
    """Speculative guided decoding (``--speculate``): tokens the target drafted and the guidance then verified."""
    accepted: int = 0
    """Of those, the ones that stood."""

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "response": self.response, "variant": self.variant,
                "n_tokens": self.n_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                "time_to_first_token_s": round(self.time_to_first_token_s, 4), "stop_reason": self.stop_reason,
                "guided_tokens": self.guided_tokens,
                "gate_score": None if self.gate_score is None else round(self.gate_score, 4),
                "flagged": self.flagged}


@dataclass
class Event:
    """What one :meth:`BatchGenerator.step` says about one request: a new ``step``; with its last step, the
    ``result``; or, for a request that could not start, the ``error`` (and nothing else)."""

    key: Hashable
    step: Step | None = None
    result: Result | None = None
    error: UsageError | None = None


def choose(sample: make_sampler, lt: np.ndarray, lu: np.ndarray | None,
           combine: Combine | None) -> tuple[np.ndarray, int, bool]:
    """One decoding step's choice: the scores sampled from (target logits, or ``combine(lt, lu)`` when a guidance
    log-softmax ``lu`` is given), the token, and whether guidance changed the token the target alone would have
    picked with the same uniform draw."""
    u = sample.draw()
    if lu is None or combine is None:
        return lt, sample(lt, u), False
    z = combine(lt, lu)
    tok = sample(z, u)
    return z, tok, tok != sample(lt, u)


@dataclass
class _Request:
    key: Hashable
    prompt: str
    tokens: list[int]
    cfg: GenConfig
    handoff: Handoff | None = None


@dataclass
class _Slot:
    req: _Request
    sampler: make_sampler
    detok: Detokenizer
    stops: StopMatcher
    t0: float
    last: list[int]  # the token(s) to decode for this slot in the next step
    fresh: bool = True  # ``last`` is the last prompt token (vector state of the second chunk)
    first: np.ndarray | None = None  # the first token's logits, handed on with the whole prompt's KV (no decode)
    t_first: float | None = None
    n: int = 0
    guided: int = 0
    drafted: int = 0
    accepted: int = 0
    text: list[str] = field(default_factory=list)


@dataclass
class _Prefill:
    """A long prompt admitted in pieces between decode steps (``prefill_chunk``): each side's head, how much of
    it is decoded, and whether the guidance side takes the target's head when it is done."""

    req: _Request
    t0: float
    last: list[int]
    heads: list[list[int]]  # the target's head, then the guidance side's when it decodes its own
    share: bool
    done: int = 0


@dataclass
class _Piece:
    """This step's piece of a prompt admitted in pieces: its slot, where the piece ends, each side's tokens."""

    slot: int
    end: int
    tokens: list[list[int]]


class BatchGenerator:
    """Target and (optional) guidance slots over two :class:`Side` s; requests wait in a queue for a free slot.

    A request is admitted when a slot is free and, if other requests are running, when the KV cells it may
    need (prompt + ``max_tokens``) are free; a request alone may run until its context is full (finish
    ``context``). A prompt that cannot fit at all comes back as an error event, and the others go on."""

    def __init__(self, model: Model, target: Side, tbuf: Buffers, guide: Side | None, gbuf: Buffers | None,
                 combine: Combine | None, both: Both, variant: str, head_threads: int | None = None,
                 speculate: int = 0, prefill_chunk: int = 0) -> None:
        if guide is not None and guide.slots != target.slots:
            raise ValueError("target and guidance sides need the same number of slots")
        self.model, self.target, self.tbuf, self.guide, self.gbuf = model, target, tbuf, guide, gbuf
        self.combine, self._both, self.variant = combine, both, variant
        """How a step's target logits and guidance log-probabilities combine (the guidance source's; None
        without guidance)."""
        self.speculate = check_speculate(speculate) if guide is not None else 0
        """Tokens the target drafts per round before the guidance verifies them (0: one token per step on both
        sides together; no effect without a guidance side)."""
        if self.speculate and not isinstance(combine, SGDS):
            raise ValueError("speculative verification is written for sGDS (core.speculative)")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be an integer >= 0, not {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        """A prompt head longer than this, admitted while other requests run, is decoded in pieces of at most
        this many tokens, one per step, inside the running requests' steps, so they keep producing tokens (0:
        whole at admission; mlx-lm's ``prefill_step_size``). A piece is sized so that it adds about
        :data:`PREFILL_BUDGET` of a step's time (measured as it runs: the cost per prompt token grows with the
        context it attends to). A request alone decodes its head whole, as without it."""
        self._prefilling: dict[int, _Prefill] = {}
        self._t_step: float | None = None  # a plain step's seconds without a piece (running average)
        self._t_token: float | None = None  # seconds a piece adds per prompt token (running average)
        self._pending: deque[_Request] = deque()
        self._free = list(range(target.slots))
        self._active: dict[int, _Slot] = {}
        self._room = min(target.capacity, guide.capacity if guide is not None else target.capacity)
        self.layout = make(target, tbuf, guide, gbuf, both, head_threads)
        """How the sides are laid out and decoded (:mod:`.layout`)."""
        if self.shared is not None and self.speculate:
            raise ValueError("speculative decoding needs the two-context layout")
        self.strategy = (Speculation(model, target, tbuf, guide, gbuf, combine.lam, both, self.speculate)
                         if self.speculate else None)
        """The speculative round that replaces the plain step (:mod:`.speculation`; None: one token per step)."""

    # -- requests -------------------------------------------------------------------------------------------
    def insert(self, key: Hashable, tokens: list[int], cfg: GenConfig, prompt: str = "",
               handoff: Handoff | None = None) -> None:
        """Queue a request. ``handoff`` is its prompt's KV decoded elsewhere without a vector (the harm gate's
        reader): a side whose head would be the same imports it instead of decoding it again, and a plain side
        handed the whole prompt with its logits samples the first token without a decode."""
        self._pending.append(_Request(key, prompt, list(tokens), cfg, handoff))

    def remove(self, key: Hashable) -> bool:
        """Drop a request (waiting or running) without a result; its slot is free for the next step."""
        for r in list(self._pending):
            if r.key == key:
                self._pending.remove(r)
                return True
        for i, s in list(self._active.items()):
            if s.req.key == key:
                self._release(i)
                return True
        for i, p in list(self._prefilling.items()):
            if p.req.key == key:
                del self._prefilling[i]
                self._free_slot(i)
                return True
        return False

    @property
    def shared(self):
        """Both sides in one context (:class:`~.sides.SharedContext`): one ``llama_decode`` per step for both."""
        return self.layout.shared

    @property
    def n_active(self) -> int:
        """Requests holding a slot: decoding, or decoding their prompt in pieces."""
        return len(self._active) + len(self._prefilling)

    @property
    def n_waiting(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._active or self._pending or self._prefilling)

    def _release(self, i: int) -> None:
        del self._active[i]
        self._free_slot(i)

    def _free_slot(self, i: int, first: bool = False) -> None:
        self.layout.release(i)
        if self.strategy is not None:
            self.strategy.release(i)
        if first:
            self._free.insert(0, i)
        else:
            self._free.append(i)

    def admit(self) -> list[Event]:
        """Give waiting requests the free slots now, as :meth:`step` does first: decode each one's prompt head
        (or import it: a shared head, a handoff), or start decoding it in pieces; no token is sampled. Returns the
        error events of requests that cannot start (a prompt that cannot fit)."""
        events: list[Event] = []
        self._admit(events)
        return events

    def _admit(self, events: list[Event]) -> None:
        while self._free and self._pending:
            req = self._pending[0]
            # a shared context holds both sides' new tokens (the prompt head is shared)
            new_cells = len(req.tokens) + req.cfg.max_tokens * self.layout.cells_per_token
            busy = self._active or self._prefilling
            owed = sum(max(map(len, p.heads)) - p.done for p in self._prefilling.values())
            if busy and self.layout.used() + owed + new_cells > self._room:
                return  # the shared KV is full: wait for a slot to finish
            self._pending.popleft()
            i = self._free.pop(0)
            t0 = time.perf_counter()
            pieces = (self.prefill_chunk and busy and req.handoff is None
                      and len(req.tokens) - 1 > self.prefill_chunk)
            try:
                if pieces:
                    self._prefilling[i] = self._begin_pieces(i, req, t0)
                    continue
                last, first = self.layout.begin(i, req.tokens, req.handoff)
            except UsageError as e:
                self._free_slot(i, first=True)
                events.append(Event(req.key, error=e))
                continue
            self._active[i] = self._slot(req, t0, last, first)

    def _slot(self, req: _Request, t0: float, last: list[int], first: np.ndarray | None = None) -> _Slot:
        return _Slot(req, req.cfg.sampler(), Detokenizer(self.model), StopMatcher(req.cfg.stop), t0, last,
                     first=first)

    def _begin_pieces(self, i: int, req: _Request, t0: float) -> _Prefill:
        """Start slot ``i`` on a prompt whose head :meth:`_prefill_step` decodes in pieces."""
        last, heads, share = self.layout.begin_pieces(i, req.tokens)
        return _Prefill(req, t0, last, heads, share)

    def _prefill_step(self) -> _Piece | None:
        """The next piece of the oldest prompt admitted in pieces (the rest of it at once when nothing else
        runs). Beside a plain step the piece is handed back to go into that step's decode (one pass over the
        weights for both where the rows' vector states allow it: a decode of its own costs about a whole step on
        a CPU); beside a speculative round it is decoded here, and a prompt whose head is done joins this step."""
        if not self._prefilling:
            return None
        i, p = next(iter(self._prefilling.items()))
        n = max(map(len, p.heads))
        b = n if not self._active else min(n, p.done + self._piece_size())
        piece = _Piece(i, b, [h[p.done:b] for h in p.heads])
        if self._active and self.strategy is None:
            return piece
        t0 = time.perf_counter()
        self.layout.prefill(i, piece.tokens)
        if self._active:
            self._learn(time.perf_counter() - t0, piece, alone=True)
        self._advance(piece)
        return None

    def _piece_size(self) -> int:
        """Prompt tokens for this step's piece: what fits :data:`PREFILL_BUDGET` of a step, as measured so far
        (8 until both costs are known), at most ``prefill_chunk``."""
        if self._t_step is None or not self._t_token:
            return min(8, self.prefill_chunk)
        return max(1, min(self.prefill_chunk, int(PREFILL_BUDGET * self._t_step / self._t_token)))

    def _learn(self, seconds: float, piece: _Piece | None, alone: bool = False) -> None:
        """Update the running averages: a step's time without a piece, or the time a piece added per token
        (``alone``: the piece decoded on its own, all of ``seconds`` is its)."""
        def avg(old: float | None, new: float) -> float:
            return new if old is None else 0.7 * old + 0.3 * new
        if piece is None:
            self._t_step = avg(self._t_step, seconds)
        elif alone or self._t_step is not None:
            n = max(1, max(map(len, piece.tokens)))
            self._t_token = avg(self._t_token, max(0.0, seconds - (0.0 if alone else self._t_step)) / n)

    def _advance(self, piece: _Piece) -> None:
        """A piece is decoded: a head that is done makes its request a running one (it decodes its last prompt
        token at the next step)."""
        i, p = piece.slot, self._prefilling[piece.slot]
        p.done = piece.end
        if p.done >= max(map(len, p.heads)):
            del self._prefilling[i]
            if p.share:
                self.layout.finish_head(i, p.req.tokens)
            self._active[i] = self._slot(p.req, p.t0, p.last)

    # -- the loop -------------------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        """Admit waiting requests, decode one token for every running one (with ``speculate``, a round of up to
        K tokens each), and say what happened."""
        events: list[Event] = []
        self._admit(events)
        piece = self._prefill_step()
        if not self._active:
            return events
        t0 = time.perf_counter()
        tokens = self.strategy.step(self._active) if self.strategy is not None else None
        if tokens is None:  # one token per step (a strategy's round near the end of the context too)
            tokens = self._plain_step(piece)
        out = self._take(events, tokens)
        if self.prefill_chunk and self.strategy is None:  # (beside a round, a piece is timed alone)
            self._learn(time.perf_counter() - t0, piece)
        if piece is not None:
            self._advance(piece)
        return out

    def _plain_step(self, piece: _Piece | None = None) -> dict[int, list[Token]]:
        """Both sides decode every running slot's pending token at the same time; one token each (and a piece of
        a prompt admitted in pieces, in the same batch where its vector state allows)."""
        # (a side's slice is empty where its head is the shorter one)
        pt = [(piece.slot, piece.tokens[0])] if piece is not None and piece.tokens[0] else []
        pg = [(piece.slot, piece.tokens[1])] if piece is not None and len(piece.tokens) > 1 and piece.tokens[1] else []
        lt, lu = self.layout.decode([(i, s.last, s.fresh) for i, s in self._active.items() if s.first is None],
                                    pt, pg)
        out: dict[int, list[Token]] = {}
        for i, s in self._active.items():
            if s.first is not None:  # handed its first logits with the prompt's KV: no decode
                lt[i], s.first = s.first, None
            z, tok, guided = choose(s.sampler, lt[i], lu.get(i), self.combine)
            lp = float(token_logprobs(z[None, :], [tok])[0]) if s.req.cfg.logprobs else 0.0
            s.fresh = False
            out[i] = [(tok, lp, guided)]
        return out

    def _take(self, events: list[Event], tokens: dict[int, list[Token]]) -> list[Event]:
        """Emit each slot's tokens of this step in order until one ends its request, then close the step."""
        done: dict[int, tuple] = {}
        going = [i for i, toks in tokens.items()
                 if toks and all(self._emit(i, self._active[i], *t, events, done) for t in toks)]
        return self._close(events, done, going)

    def _emit(self, i: int, s: _Slot, tok: int, lp: float, guided: bool, events: list[Event],
              done: dict[int, tuple]) -> bool:
        """Take one sampled token for slot ``i``: a step event (True: the request goes on, ``tok`` is decoded
        next) or its end in ``done`` (end of generation, a stop string, ``max_tokens``)."""
        if self.model.is_eog(tok):
            done[i] = (tok, "", lp, guided, "eos")
            return False
        text, stopped = s.stops.feed(s.detok.add(tok))
        s.n += 1
        s.guided += guided
        if s.t_first is None:
            s.t_first = time.perf_counter()
        if stopped:
            done[i] = (tok, text, lp, guided, "stop")
        elif s.n >= s.req.cfg.max_tokens:
            done[i] = (tok, text, lp, guided, "max_tokens")
        else:
            s.last = [tok]
            s.text.append(text)
            events.append(Event(s.req.key, Step(tok, text, lp, guided)))
            return True
        return False

    def _close(self, events: list[Event], done: dict[int, tuple], going: list[int]) -> list[Event]:
        """End the step: requests with no room for their next token stop (``context``), and every finished
        request gets its last step and result."""
        # no room for the next token: the requests holding the most KV stop first ("context")
        while going and self.layout.no_room(going):
            i = max(going, key=lambda j: self.target.pos(j))
            going.remove(i)
            ev = next((e for e in reversed(events) if e.key == self._active[i].req.key), None)
            if ev is None:  # nothing emitted this step (a speculative draft waits): it stops at a later one
                continue
            events.remove(ev)
            self._active[i].text.pop()
            done[i] = (ev.step.token, ev.step.text, ev.step.logprob, ev.step.guided, "context")
        for i, (tok, text, lp, guided, why) in done.items():
            s = self._active[i]
            if why != "stop":
                text += s.stops.feed(s.detok.flush())[0] + s.stops.flush()
            step = Step(tok, text, lp, guided, finish=why, eog=why == "eos")
            events.append(Event(s.req.key, step, self._result(s, step)))
            self._release(i)
        return events

    def _result(self, s: _Slot, last: Step) -> Result:
        t_end = time.perf_counter()
        s.text.append(last.text)
        ttft = (s.t_first or t_end) - s.t0
        gen = t_end - (s.t_first or t_end)
        tps = (s.n - 1) / gen if s.n > 1 and gen > 0 else 0.0
        return Result(s.req.prompt, "".join(s.text), self.variant, s.n, tps, ttft, last.finish or "",
                      guided_tokens=s.guided, drafted=s.drafted, accepted=s.accepted)
