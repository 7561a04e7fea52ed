"""How a batch lays its sides out: the target alone, or target and guidance each in a context of its own
(:class:`Split`), or both in one context (:class:`Shared`, :class:`~.sides.SharedContext`). A layout starts a slot
on a prompt (``begin``: decode its head, import a handoff, share a head), decodes a prompt head's piece on its own
(``prefill``), decodes one step's rows for every running slot (``decode``) and says how many KV cells a slot takes
per generated token (``cells_per_token``). :class:`~.batch.BatchGenerator` owns the slots and admission and never
asks which layout it has.

Vector states (a :data:`~.steering.Buffers` triple): the first for a prompt head, the second for a slot's last
prompt token ("fresh"), the third for every token after it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core.sampling import log_softmax
from .gating import Handoff
from .sides import Side
from .steering import Buffers

Both = Callable[[Callable, Callable | None], tuple]
"""Runs the target's call and (if any) the guidance's call at the same time; returns both results."""


def decode_items(side: Side, bufs: Buffers, items: list[tuple[int, list[int], bool]], normalise: bool = False,
                 pieces: list[tuple[int, list[int]]] = ()) -> dict[int, np.ndarray]:
    """One batched decode on a side: fresh slots' last prompt token (second-chunk vector state) and the other
    slots' new token (third-chunk state), in one batch when the two states are the same; ``pieces`` of prompt
    heads (first-chunk state) join the batch whose state is theirs, else decode on their own. A side steered per
    row decodes them all in one batch, each row in its own state."""
    if side.shared is not None:
        its = [(i, last, bufs[1] if f else bufs[2]) for i, last, f in items]
        rows = side.decode_steered(its, [(i, toks, bufs[0]) for i, toks in pieces])
        return {i: log_softmax(row) if normalise else row for (i, _, _), row in zip(its, rows, strict=True)}
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
    for k, (its, buf) in enumerate(groups):
        for (i, _), row in zip(its, side.decode_slots(its, buf, pieces if k == host else ()), strict=True):
            out[i] = log_softmax(row) if normalise else row
    return out


class Split:
    """The target in its own context and, for a guided variant, the guidance side in another: each side's rows in
    a batch of their own, the two decoding at the same time on half the threads each. Where the two would compute
    the same KV for a prompt head, the head is decoded once on the target with every thread (``head_threads``)
    and its KV copied to the guidance side."""

    cells_per_token = 1
    """KV cells a running slot takes in a side's context per generated token."""
    shared = None

    def __init__(self, target: Side, tbuf: Buffers, guide: Side | None, gbuf: Buffers | None, both: Both,
                 head_threads: int | None = None) -> None:
        self.target, self.tbuf, self.guide, self.gbuf = target, tbuf, guide, gbuf
        self.both, self.head_threads = both, head_threads

    @property
    def sides(self) -> list[Side]:
        return [self.target] + ([self.guide] if self.guide is not None else [])

    def used(self) -> int:
        return max(side.used() for side in self.sides)

    def release(self, i: int) -> None:
        for side in self.sides:
            side.release(i)

    # -- starting a slot ------------------------------------------------------------------------------------
    def begin(self, i: int, toks: list[int], handoff: Handoff | None = None) -> tuple[list[int], np.ndarray | None]:
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
            if self.shares_head():
                g.begin(i, toks, None, decode_head=False)
                g.import_head(i, t, toks)
            else:
                g.begin(i, toks, self.gbuf[0])
            return last, None
        return self._begin_decoded(i, toks), None

    def shares_head(self) -> bool:
        """The guidance side would compute the target's KV for a prompt head (it takes a copy instead)."""
        return self.guide is not None and self.target.shares_head_with(self.guide, self.tbuf, self.gbuf)

    def _begin_decoded(self, i: int, toks: list[int]) -> list[int]:
        t, g = self.target, self.guide
        if g is None:
            return t.begin(i, toks, self.tbuf[0])
        if len(toks) > 1 and self.shares_head():
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
            return self.both(head, None)[0]
        return self._begin_both(i, toks)

    def _begin_both(self, i: int, toks: list[int]) -> list[int]:
        """Both sides decode their own head, at the same time."""
        t, g = self.target, self.guide
        last, _ = self.both(lambda: t.begin(i, toks, self.tbuf[0]), lambda: g.begin(i, toks, self.gbuf[0]))
        return last

    def begin_pieces(self, i: int, toks: list[int]) -> tuple[list[int], list[list[int]], bool]:
        """Start slot ``i`` on a prompt whose head is decoded in pieces: (its last token(s), each side's head to
        decode: the target's, then the guidance side's when it decodes its own, whether the guidance side takes
        the target's head when it is done)."""
        t, g = self.target, self.guide
        last = t.begin(i, toks, None, decode_head=False)
        heads = [t.own_tokens(toks)[:-1]]
        share = self.shares_head()
        if g is not None:
            g.begin(i, toks, None, decode_head=False)
            if not share:
                heads.append(g.own_tokens(toks)[:-1])
        return last, heads, share

    def prefill(self, i: int, tokens: list[list[int]]) -> None:
        """Decode a piece of slot ``i``'s head on its own (``tokens``: the target's, then the guidance side's)."""
        t, g = self.target, self.guide
        jobs = [lambda: t.prefill(i, tokens[0], self.tbuf[0])]
        if len(tokens) > 1:
            jobs.append(lambda: g.prefill(i, tokens[1], self.gbuf[0]))
        self._run(jobs)

    def _run(self, jobs: list[Callable]) -> None:
        """The sides' decodes of a piece: at the same time, each on its own context."""
        self.both(jobs[0], jobs[1] if len(jobs) == 2 else None)

    def finish_head(self, i: int, toks: list[int]) -> None:
        """Slot ``i``'s head is decoded (in pieces) on the target: the guidance side takes a copy."""
        self.guide.import_head(i, self.target, toks)

    # -- a step -----------------------------------------------------------------------------------------------
    def decode(self, items: list[tuple[int, list[int], bool]], pieces: list[tuple[int, list[int]]] = (),
               gpieces: list[tuple[int, list[int]]] = ()) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """One step's rows for ``items`` (slot, token(s) to decode, fresh): the target's logits and the guidance
        side's log-probabilities (empty without guidance); ``pieces``/``gpieces``: prompt-head pieces that ride
        in each side's decode."""
        g = self.guide
        lt, lu = self.both(lambda: decode_items(self.target, self.tbuf, items, False, pieces),
                           (lambda: decode_items(g, self.gbuf, items, True, gpieces)) if g is not None else None)
        return lt, lu or {}

    def no_room(self, going: list[int]) -> bool:
        """The slots in ``going`` cannot all take their next token (a context is full)."""
        per = self.cells_per_token
        return any(side.used() + per * len(going) > side.capacity or any(side.room(i) < 1 for i in going)
                   for side in self.sides)


class Shared(Split):
    """Both sides of a guided variant in one context (:class:`~.sides.SharedContext`: the target's slot i in
    sequence i, the guidance's in slots + i): one ``llama_decode`` per step for both, on every thread, the vector
    added per row, so a piece of a prompt head rides in the step with its own (first-chunk) vector state."""

    cells_per_token = 2  # a shared context takes both sides' next tokens

    def __init__(self, target: Side, tbuf: Buffers, guide: Side, gbuf: Buffers, both: Both,
                 head_threads: int | None = None) -> None:
        super().__init__(target, tbuf, guide, gbuf, both, head_threads)
        self.shared = target.shared

    def _begin_both(self, i: int, toks: list[int]) -> list[int]:
        """One context: one decode at a time, on every thread."""
        t, g = self.target, self.guide
        last = self.both(lambda: t.begin(i, toks, self.tbuf[0]), None)[0]
        self.both(lambda: g.begin(i, toks, self.gbuf[0]), None)
        return last

    def _run(self, jobs: list[Callable]) -> None:
        """One context: one decode at a time."""
        for job in jobs:
            self.both(job, None)

    def decode(self, items: list[tuple[int, list[int], bool]], pieces: list[tuple[int, list[int]]] = (),
               gpieces: list[tuple[int, list[int]]] = ()) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Both sides' rows for every slot in one ``llama_decode``, each row with its side's vector for its chunk
        (second chunk for a fresh slot's last prompt token, third after; first for the pieces, no logits)."""
        t, g = self.target, self.guide

        def run():
            heads = ([(t.slot_seq(i), toks, self.tbuf[0]) for i, toks in pieces] +
                     [(g.slot_seq(i), toks, self.gbuf[0]) for i, toks in gpieces])
            rows = self.shared.decode([(t.slot_seq(i), last, self.tbuf[1] if f else self.tbuf[2])
                                       for i, last, f in items] +
                                      [(g.slot_seq(i), last, self.gbuf[1] if f else self.gbuf[2])
                                       for i, last, f in items] + heads,
                                      ["last"] * (2 * len(items)) + ["none"] * len(heads) if heads else "last")
            n = len(items)
            return ({i: rows[k] for k, (i, _, _) in enumerate(items)},
                    {i: log_softmax(rows[n + k]) for k, (i, _, _) in enumerate(items)})
        return self.both(run, None)[0]


def make(target: Side, tbuf: Buffers, guide: Side | None, gbuf: Buffers | None, both: Both,
         head_threads: int | None = None) -> Split:
    """The layout of these sides: :class:`Shared` when both are in one context, else :class:`Split`."""
    if guide is not None and guide.shared is not None and guide.shared is target.shared:
        return Shared(target, tbuf, guide, gbuf, both, head_threads)
    return Split(target, tbuf, guide, gbuf, both, head_threads)
