"""The one decode loop: a batch generator in the spirit of mlx-lm's ``BatchGenerator``.

``insert`` a request, ``step`` all slots, finished requests leave with their :class:`Result`. Single generation
is a batch of one; ``generate``, ``chat``, ``filter --parallel``, ``bench harm`` and the Python API all go
through it.

Decode layout, the same for every variant and every batch size (llama.cpp is not batch invariant, so variants
must differ only by the method): a request's prompt minus its last token is decoded alone when it is admitted,
then its last prompt token in the next batched step (with the vector state of ``positions``' second chunk), then
one token per step. The target side and the guidance side (for ``sgds``/``safeinfer``) are each batched, and the
two decode at the same time on half the threads each. When the two sides would compute the same KV for a prompt
head (same weights, no prefix, no vector on the head: ``negative`` guidance with ``generation``/``last``
positions), the head is decoded once on the target with every thread and its KV copied to the guidance side.

With ``speculate`` K > 0 (guided variants), the target keeps the same one-token layout but runs ahead: each round it
drafts up to K tokens per slot (1, 2, 4 ... K while its drafts stand) while the guidance side decodes the previous
round's draft in one batch and the guided distribution verifies it (``core.speculative``); a rejected token rolls
both sides back (``seq_rm``) and the draft made meanwhile is dropped. Near the end of the context the loop verifies
what is pending and goes on one token at a time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from ..core.sampling import StopMatcher, guided_logits, log_softmax, make_sampler, token_logprobs
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
from ..core.speculative import verify_greedy, verify_sampled
from ..errors import UsageError
from ..llama.engine import Detokenizer, Model
from .gating import Handoff
from .guidance import SGDS, Combine
from .sides import Side
from .steering import Buffers

FINISH_REASONS = ("eos", "stop", "max_tokens", "context", "refused")

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
    # speculative decoding: the target's draft not yet verified, its rows, where its decoding began on the
    # target, and the guidance side's pending token(s) (the target's pending token is ``last``)
    draft: list[int] = field(default_factory=list)
    draft_rows: list[np.ndarray] = field(default_factory=list)
    t_start: int = 0
    g_last: list[int] = field(default_factory=list)
    g_fresh: bool = True
    k_next: int = 1  # the next draft's length: 1, 2, 4 ... up to K while drafts stand; 1 again after a rejection


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


Both = Callable[[Callable, Callable | None], tuple]
"""Runs the target's call and (if any) the guidance's call at the same time; returns both results."""


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
        self.head_threads = head_threads
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
        self.shared = target.shared if guide is not None and guide.shared is target.shared else None
        """Both sides in one context (:class:`~.sides.SharedContext`): one ``llama_decode`` per step for both."""
        if self.shared is not None and self.speculate:
            raise ValueError("speculative decoding needs the two-context layout")

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
    def n_active(self) -> int:
        """Requests holding a slot: decoding, or decoding their prompt in pieces."""
        return len(self._active) + len(self._prefilling)

    @property
    def n_waiting(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._active or self._pending or self._prefilling)

    def _used(self) -> int:
        return max(self.target.used(), self.guide.used() if self.guide is not None else 0)

    def _release(self, i: int) -> None:
        del self._active[i]
        self._free_slot(i)

    def _free_slot(self, i: int, first: bool = False) -> None:
        self.target.release(i)
        if self.guide is not None:
            self.guide.release(i)
        if first:
            self._free.insert(0, i)
        else:
            self._free.append(i)

    def _admit(self, events: list[Event]) -> None:
        while self._free and self._pending:
            req = self._pending[0]
            # a shared context holds both sides' new tokens (the prompt head is shared)
            new_cells = len(req.tokens) + req.cfg.max_tokens * (2 if self.shared is not None else 1)
            busy = self._active or self._prefilling
            owed = sum(max(map(len, p.heads)) - p.done for p in self._prefilling.values())
            if busy and self._used() + owed + new_cells > self._room:
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
                last, first = self._begin(i, req.tokens, req.handoff)
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
        t, g = self.target, self.guide
        last = t.begin(i, req.tokens, None, decode_head=False)
        heads = [t.own_tokens(req.tokens)[:-1]]
        share = g is not None and t.shares_head_with(g, self.tbuf, self.gbuf)
        if g is not None:
            g.begin(i, req.tokens, None, decode_head=False)
            if not share:
                heads.append(g.own_tokens(req.tokens)[:-1])
        return _Prefill(req, t0, last, heads, share)

    def _prefill_step(self) -> _Piece | None:
        """The next piece of the oldest prompt admitted in pieces (the rest of it at once when nothing else
        runs). Where the running slots' step is a plain one on its own contexts, the piece is handed back to go
        into that step's ``llama_decode`` (one pass over the weights for both: a decode of its own costs about a
        whole step on a CPU); else it is decoded here, and a prompt whose head is done joins this step."""
        if not self._prefilling:
            return None
        i, p = next(iter(self._prefilling.items()))
        n = max(map(len, p.heads))
        b = n if not self._active else min(n, p.done + self._piece_size())
        piece = _Piece(i, b, [h[p.done:b] for h in p.heads])
        if self._active and self.shared is None and not self.speculate:
            return piece
        t0 = time.perf_counter()
        t, g = self.target, self.guide
        jobs = [lambda: t.prefill(i, piece.tokens[0], self.tbuf[0])]
        if len(piece.tokens) > 1:
            jobs.append(lambda: g.prefill(i, piece.tokens[1], self.gbuf[0]))
        if len(jobs) == 2 and self.shared is None:
            self._both(*jobs)
        else:  # one side, or one context: one decode at a time
            for job in jobs:
                self._both(job, None)
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
                self.guide.import_head(i, self.target, p.req.tokens)
            self._active[i] = self._slot(p.req, p.t0, p.last)

    def _begin(self, i: int, toks: list[int], handoff: Handoff | None = None) -> tuple[list[int], np.ndarray | None]:
        """Start slot ``i`` on ``toks``: the token(s) its first step decodes, or the first token's logits when
        the handoff covers the whole prompt (then nothing is left to decode)."""
        t, g = self.target, self.guide
        h = handoff
        if h is not None and len(toks) > 1 and not t.prefix and self.tbuf[0] is None:
            last = t.begin(i, toks, None, decode_head=False)
            t.import_kv(i, h.state, h.n_tokens)
            if h.n_tokens == len(toks):
                if g is None and h.logits is not None and self.tbuf[1] is None:
                    return [], h.logits  # decoded plainly to the end: sample at once
                t.rollback(i, len(toks) - 1)  # the last prompt token is this side's to decode (with its vector)
            if g is None:
                return last, None
            if t.shares_head_with(g, self.tbuf, self.gbuf):
                g.begin(i, toks, None, decode_head=False)
                g.import_head(i, t, toks)
            else:
                g.begin(i, toks, self.gbuf[0])
            return last, None
        return self._begin_decoded(i, toks), None

    def _begin_decoded(self, i: int, toks: list[int]) -> list[int]:
        t, g = self.target, self.guide
        if g is None:
            return t.begin(i, toks, self.tbuf[0])
        if len(toks) > 1 and t.shares_head_with(g, self.tbuf, self.gbuf):
            def head():
                if self.head_threads:
                    t.ctx.set_threads(self.head_threads)
                try:
                    last = t.begin(i, toks, None)
                finally:
                    if self.head_threads:
                        t.ctx.set_threads(t.n_threads)
                g.begin(i, toks, None, decode_head=False)
                g.import_head(i, t, toks)
                return last
            return self._both(head, None)[0]
        if self.shared is not None:  # one context: one decode at a time, on every thread
            last = self._both(lambda: t.begin(i, toks, self.tbuf[0]), None)[0]
            self._both(lambda: g.begin(i, toks, self.gbuf[0]), None)
            return last
        last, _ = self._both(lambda: t.begin(i, toks, self.tbuf[0]), lambda: g.begin(i, toks, self.gbuf[0]))
        return last

    # -- the loop -------------------------------------------------------------------------------------------
    def _decode(self, side: Side, bufs: Buffers, normalise: bool,
                pieces: list[tuple[int, list[int]]] = ()) -> dict[int, np.ndarray]:
        """One batched decode on a side for every running slot (see :meth:`_decode_items`); a slot handed its
        first logits (:attr:`_Slot.first`) takes them instead of a decode."""
        out = self._decode_items(side, bufs, [(i, s.last, s.fresh) for i, s in self._active.items()
                                              if s.first is None], normalise, pieces)
        for i, s in self._active.items():
            if s.first is not None:
                out[i], s.first = (log_softmax(s.first) if normalise else s.first), None
        return out

    @staticmethod
    def _decode_items(side: Side, bufs: Buffers, items: list[tuple[int, list[int], bool]],
                      normalise: bool = False, pieces: list[tuple[int, list[int]]] = ()) -> dict[int, np.ndarray]:
        """One batched decode on a side: fresh slots' last prompt token (second-chunk vector state) and the
        other slots' new token (third-chunk state), in one batch when the two states are the same; ``pieces``
        of prompt heads (first-chunk state) join the batch whose state is theirs, else decode on their own."""
        fresh = [(i, last) for i, last, f in items if f]
        going = [(i, last) for i, last, f in items if not f]
        groups = [(fresh, bufs[1]), (going, bufs[2])]
        if fresh and going and bufs[1] is bufs[2]:  # the same buffer (or both None)
            groups = [(fresh + going, bufs[1])]
        groups = [(its, buf) for its, buf in groups if its]
        host = next((k for k, (_, buf) in enumerate(groups) if buf is bufs[0]), None)
        if pieces and host is None:
            for i, toks in pieces:
                side.prefill(i, toks, bufs[0])
        out: dict[int, np.ndarray] = {}
        for k, (items, buf) in enumerate(groups):
            for (i, _), row in zip(items, side.decode_slots(items, buf, pieces if k == host else ()), strict=True):
                out[i] = log_softmax(row) if normalise else row
        return out

    def step(self) -> list[Event]:
        """Admit waiting requests, decode one token for every running one (with ``speculate``, a round of up to
        K tokens each), and say what happened."""
        events: list[Event] = []
        self._admit(events)
        piece = self._prefill_step()
        if not self._active:
            return events
        if self.speculate:
            return self._speculative_step(events)
        t0 = time.perf_counter()
        out = self._plain_step(events, piece)
        if self.prefill_chunk:
            self._learn(time.perf_counter() - t0, piece)
        if piece is not None:
            self._advance(piece)
        return out

    def _plain_step(self, events: list[Event], piece: _Piece | None = None) -> list[Event]:
        """Both sides decode every running slot's pending token at the same time; one token each (and a piece of
        a prompt admitted in pieces, in the same batch where its vector state allows)."""
        g = self.guide
        pt = [(piece.slot, piece.tokens[0])] if piece is not None else []
        pg = [(piece.slot, piece.tokens[1])] if piece is not None and len(piece.tokens) > 1 else []
        if self.shared is not None:
            lt, lu = self._both(self._decode_shared, None)[0]
        else:
            lt, lu = self._both(lambda: self._decode(self.target, self.tbuf, False, pt),
                                (lambda: self._decode(g, self.gbuf, True, pg)) if g is not None else None)
        lu = lu or {}
        done: dict[int, tuple] = {}
        going: list[int] = []
        for i, s in self._active.items():
            z, tok, guided = choose(s.sampler, lt[i], lu.get(i), self.combine)
            lp = float(token_logprobs(z[None, :], [tok])[0]) if s.req.cfg.logprobs else 0.0
            s.fresh = False
            if self._emit(i, s, tok, lp, guided, events, done):
                going.append(i)
        return self._close(events, done, going)

    def _decode_shared(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Both sides' rows for every running slot in one ``llama_decode`` of a shared context, each row with its
        side's vector for its chunk (second chunk for a fresh slot's last prompt token, third after)."""
        t, g = self.target, self.guide
        act = list(self._active.items())
        items = [(t.slot_seq(i), s.last, self.tbuf[1] if s.fresh else self.tbuf[2]) for i, s in act] + \
                [(g.slot_seq(i), s.last, self.gbuf[1] if s.fresh else self.gbuf[2]) for i, s in act]
        rows = self.shared.decode(items)
        n = len(act)
        return ({i: rows[k] for k, (i, _) in enumerate(act)},
                {i: log_softmax(rows[n + k]) for k, (i, _) in enumerate(act)})

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
        while going and self._no_room(going):
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

    # -- speculative guided decoding ------------------------------------------------------------------------
    def _speculative_step(self, events: list[Event]) -> list[Event]:
        """One pipelined round. The target drafts up to K tokens per slot alone (one token per decode, the same
        layout as without speculation) while, at the same time, the guidance side decodes the positions of the
        slot's previous draft in one batch; that draft is then verified against the guided distribution
        (``core.speculative``). When all of it stands, the new draft waits for the next round (and the next one
        may be twice as long, up to K); at the first token that does not, both sides roll back past it, the new
        draft is dropped and the next draft is one token (the guidance has nothing to verify meanwhile)."""
        t, g = self.target, self.guide
        assert g is not None
        active = self._active
        margin = 2 * self.speculate + 2
        if any(t.room(i) < margin or g.room(i) < margin for i in active) or any(
                side.used() + len(active) * margin > side.capacity for side in (t, g)):
            # near the end of the context: verify what was drafted, then one token per step on both sides
            if any(s.draft for s in active.values()):
                return self._round(events, draft=False)
            return self._plain_step(events)
        return self._round(events, draft=True)

    def _round(self, events: list[Event], draft: bool) -> list[Event]:
        """A speculative round; ``draft=False`` only verifies the pending drafts (near the end of the context)."""
        t, g = self.target, self.guide
        active = self._active
        k_of = {}
        if draft:
            for i, s in active.items():
                if s.draft and self.model.is_eog(s.draft[-1]):
                    continue  # the draft ends the request if it stands
                k = min(s.k_next, s.req.cfg.max_tokens - s.n - len(s.draft))
                if k > 0:
                    k_of[i] = k
        verify = [i for i, s in active.items() if s.draft]

        def target_job():
            """Draft: each slot's pending token first (a fresh slot's last prompt token, with the second chunk's
            vector), then each drafted token but the last."""
            drafts: dict[int, tuple[list[int], list[np.ndarray], int]] = {i: ([], [], t.pos(i)) for i in k_of}
            live = [(i, active[i].last, active[i].fresh) for i in k_of]
            while live:
                out = self._decode_items(t, self.tbuf, live)
                nxt = []
                for i, _, _ in live:
                    toks, rows, _ = drafts[i]
                    rows.append(out[i])
                    tok = active[i].sampler(out[i])
                    toks.append(tok)
                    if len(toks) < k_of[i] and not self.model.is_eog(tok):
                        nxt.append((i, [tok], False))
                live = nxt
            return drafts

        def guide_job():
            """Verify: the guidance side's rows at each slot's previous draft, one batch."""
            start = {i: g.pos(i) for i in verify}
            items = [(i, active[i].g_last + active[i].draft[:-1], active[i].g_fresh) for i in verify]
            return self._guide_rows(items), start

        drafts, got = self._both(target_job if k_of else dict, guide_job if verify else None)
        urows, gstart = got if got is not None else ({}, {})
        done: dict[int, tuple] = {}
        going: list[int] = []
        for i, s in list(active.items()):
            new = drafts.get(i)
            if not s.draft:  # nothing to verify yet: the new draft waits for the next round
                if new is not None:  # (None: verifying only, near the end of the context)
                    s.k_next = min(2 * s.k_next, self.speculate)
                    self._adopt(s, new)
                continue
            d = s.draft
            lt = np.stack(s.draft_rows)
            need_z = not s.sampler.greedy or s.req.cfg.logprobs
            z = guided_logits(lt, urows[i], self.combine.lam) if need_z else None
            if s.sampler.greedy:
                n, nxt_tok = verify_greedy(lt, urows[i], d, self.combine.lam)
            else:
                n, nxt_tok = self._verify_sampled(s.sampler, lt, z, d)
            s.drafted += len(d)
            s.accepted += n
            s.draft, s.draft_rows = [], []
            if nxt_tok is not None:  # rejected: both sides keep the pending token and the tokens that stood
                t.rollback(i, s.t_start + n + 1)
                g.rollback(i, gstart[i] + n + 1)
                new = None
                s.k_next = 1
            else:  # the guidance side is level with the target's pending token (the draft's last)
                s.g_last, s.g_fresh = [d[-1]], False
                s.k_next = min(2 * s.k_next, self.speculate)
            emitted = [(tok, False, j) for j, tok in enumerate(d[:n])]
            if nxt_tok is not None:
                emitted.append((nxt_tok, True, n))
            live = True
            for tok, guided, j in emitted:
                lp = float(token_logprobs(z[j][None, :], [tok])[0]) if s.req.cfg.logprobs else 0.0
                if not self._emit(i, s, tok, lp, guided, events, done):
                    live = False
                    break
            if not live:
                continue
            if new is not None:  # the draft made meanwhile from the last token that stood waits its turn
                self._adopt(s, new)
            else:
                s.g_last = s.last  # in step: both sides' next token is the pending one
            going.append(i)
        return self._close(events, done, going)

    @staticmethod
    def _adopt(s: _Slot, new: tuple[list[int], list[np.ndarray], int]) -> None:
        """Slot ``s`` takes a new draft (tokens, target rows, where its decoding began) to verify next round: the
        guidance's next token is the one the draft was made from, the target's the draft's last."""
        s.g_last, s.g_fresh = s.last, s.fresh
        s.draft, s.draft_rows, s.t_start = new
        s.last, s.fresh = [s.draft[-1]], False

    @staticmethod
    def _verify_sampled(sam: make_sampler, lt: np.ndarray, z: np.ndarray, draft: list[int]) -> tuple[int, int | None]:
        """(drafted tokens that stand, the token after them or None) by speculative sampling between the
        target's distribution (the draft's) and the guided one, each after the request's temperature / top-k /
        top-p, on the union of their supports."""
        for j, a in enumerate(draft):
            pid, pp = sam.kept(lt[j])
            qid, qp = sam.kept(z[j])
            ids = np.union1d(pid, qid)
            p = np.zeros(len(ids))
            q = np.zeros(len(ids))
            p[np.searchsorted(ids, pid)] = pp
            q[np.searchsorted(ids, qid)] = qp
            n, nxt = verify_sampled(p[None, :], q[None, :], [int(np.searchsorted(ids, a))], sam.rng)
            if n == 0:
                return j, int(ids[nxt])
        return len(draft), None

    def _guide_rows(self, items: list[tuple[int, list[int], bool]]) -> dict[int, np.ndarray]:
        """Every position's logits on the guidance side for each slot's tokens, in as few batches as the
        vector states allow (a fresh slot's first token takes the second chunk's vector)."""
        g, b = self.guide, self.gbuf
        same = b[1] is b[2]  # the same buffer (or both None)
        parts: dict[int, list[np.ndarray]] = {i: [] for i, _, _ in items}
        first = [(i, toks[:1]) for i, toks, fresh in items if fresh and not same]
        if first:
            for (i, _), r in zip(first, g.decode_rows(first, b[1]), strict=True):
                parts[i].append(r)
        rest = [(i, toks[1:] if fresh and not same else toks) for i, toks, fresh in items]
        rest = [(i, toks) for i, toks in rest if toks]
        if rest:
            for (i, _), r in zip(rest, g.decode_rows(rest, b[2]), strict=True):
                parts[i].append(r)
        return {i: np.concatenate(p) for i, p in parts.items()}

    def _no_room(self, going: list[int]) -> bool:
        sides = [self.target] + ([self.guide] if self.guide is not None else [])
        per_slot = 2 if self.shared is not None else 1  # a shared context takes both sides' next tokens
        return any(side.used() + per_slot * len(going) > side.capacity or any(side.room(i) < 1 for i in going)
                   for side in sides)

    def _result(self, s: _Slot, last: Step) -> Result:
        t_end = time.perf_counter()
        s.text.append(last.text)
        ttft = (s.t_first or t_end) - s.t0
        gen = t_end - (s.t_first or t_end)
        tps = (s.n - 1) / gen if s.n > 1 and gen > 0 else 0.0
        return Result(s.req.prompt, "".join(s.text), self.variant, s.n, tps, ttft, last.finish or "",
                      guided_tokens=s.guided, drafted=s.drafted, accepted=s.accepted)
