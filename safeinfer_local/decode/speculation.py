"""Speculative guided decoding (``--speculate K``), the one decoding strategy a :class:`~.batch.BatchGenerator`
may swap in for its plain step: the target keeps the same one-token layout but runs ahead. Each round it drafts up
to K tokens per slot (1, 2, 4 ... K while its drafts stand) while the guidance side decodes the previous round's
draft in one batch and the guided distribution verifies it (``core.speculative``); a rejected token rolls both
sides back (``seq_rm``) and the draft made meanwhile is dropped. Near the end of the context the loop verifies what
is pending and the generator goes on one token at a time. Its per-slot state is a :class:`Draft`; it is handed
the running slots and the sides, and hands back each slot's tokens: emitting them, events and results stay the
generator's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..core.sampling import guided_logits, make_sampler, token_logprobs
from ..core.speculative import verify_greedy, verify_sampled
from .layout import decode_items

if TYPE_CHECKING:
    from ..llama.engine import Model
    from .batch import Token, _Slot
    from .layout import Both
    from .sides import Side
    from .steering import Buffers


@dataclass
class Draft:
    """A slot's speculative state: the target's draft not yet verified, its rows, where its decoding began on the
    target, the guidance side's pending token(s) (the target's pending token is the slot's ``last``), and the next
    draft's length: 1, 2, 4 ... up to K while drafts stand; 1 again after a rejection. ``after``: what the next
    round does first if the slot still runs once its tokens are emitted (:meth:`Speculation.step`)."""

    tokens: list[int] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    t_start: int = 0
    g_last: list[int] = field(default_factory=list)
    g_fresh: bool = True
    k_next: int = 1
    after: tuple[list[int], list[np.ndarray], int] | bool = False


class Speculation:
    """The speculative round over a target and a guidance side (sGDS with weight ``lam``), ``k`` tokens drafted
    at most per slot and round; ``both`` runs the two sides' jobs at the same time."""

    def __init__(self, model: Model, target: Side, tbuf: Buffers, guide: Side, gbuf: Buffers, lam: float,
                 both: Both, k: int) -> None:
        self.model, self.target, self.tbuf, self.guide, self.gbuf = model, target, tbuf, guide, gbuf
        self.lam, self.both, self.k = lam, both, k
        self.drafts: dict[int, Draft] = {}

    def release(self, i: int) -> None:
        """Slot ``i`` is free: its draft goes."""
        self.drafts.pop(i, None)

    def _of(self, i: int) -> Draft:
        return self.drafts.setdefault(i, Draft())

    def step(self, active: dict[int, _Slot]) -> dict[int, list[Token]] | None:
        """One pipelined round over the running slots: each slot's tokens that stand, in order (none while its
        first draft waits); None near the end of the context once nothing is pending (then one token per step).
        The target drafts up to K tokens per slot alone (one token per decode, the same layout as without
        speculation) while, at the same time, the guidance side decodes the positions of the slot's previous
        draft in one batch; that draft is then verified against the guided distribution
        (``core.speculative``). When all of it stands, the new draft waits for the next round (and the next one
        may be twice as long, up to K); at the first token that does not, both sides roll back past it, the new
        draft is dropped and the next draft is one token (the guidance has nothing to verify meanwhile)."""
        for i, s in active.items():  # the last round's slots that still run after emitting their tokens
            dr = self._of(i)
            if isinstance(dr.after, tuple):  # the draft made meanwhile from the last token that stood
                self._adopt(s, dr, dr.after)
            elif dr.after:
                dr.g_last = s.last  # in step: both sides' next token is the pending one
            dr.after = False
        t, g = self.target, self.guide
        margin = 2 * self.k + 2
        if any(t.room(i) < margin or g.room(i) < margin for i in active) or any(
                side.used() + len(active) * margin > side.capacity for side in (t, g)):
            # near the end of the context: verify what was drafted, then one token per step on both sides
            if any(self._of(i).tokens for i in active):
                return self._round(active, draft=False)
            return None
        return self._round(active, draft=True)

    def _round(self, active: dict[int, _Slot], draft: bool) -> dict[int, list[Token]]:
        """A speculative round; ``draft=False`` only verifies the pending drafts (near the end of the context)."""
        t, g = self.target, self.guide
        st = {i: self._of(i) for i in active}
        k_of = {}
        if draft:
            for i, s in active.items():
                d = st[i]
                if d.tokens and self.model.is_eog(d.tokens[-1]):
                    continue  # the draft ends the request if it stands
                k = min(d.k_next, s.req.cfg.max_tokens - s.n - len(d.tokens))
                if k > 0:
                    k_of[i] = k
        verify = [i for i in active if st[i].tokens]

        def target_job():
            """Draft: each slot's pending token first (a fresh slot's last prompt token, with the second chunk's
            vector), then each drafted token but the last."""
            drafts: dict[int, tuple[list[int], list[np.ndarray], int]] = {i: ([], [], t.pos(i)) for i in k_of}
            live = [(i, active[i].last, active[i].fresh) for i in k_of]
            while live:
                out = decode_items(t, self.tbuf, live)
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
            items = [(i, st[i].g_last + st[i].tokens[:-1], st[i].g_fresh) for i in verify]
            return self._guide_rows(items), start

        drafts, got = self.both(target_job if k_of else dict, guide_job if verify else None)
        urows, gstart = got if got is not None else ({}, {})
        lam = self.lam
        out: dict[int, list[Token]] = {}
        for i, s in active.items():
            dr = st[i]
            new = drafts.get(i)
            out[i] = []
            if not dr.tokens:  # nothing to verify yet: the new draft waits for the next round
                if new is not None:  # (None: verifying only, near the end of the context)
                    dr.k_next = min(2 * dr.k_next, self.k)
                    self._adopt(s, dr, new)
                continue
            d = dr.tokens
            lt = np.stack(dr.rows)
            need_z = not s.sampler.greedy or s.req.cfg.logprobs
            z = guided_logits(lt, urows[i], lam) if need_z else None
            if s.sampler.greedy:
                n, nxt_tok = verify_greedy(lt, urows[i], d, lam)
            else:
                n, nxt_tok = self._verify_sampled(s.sampler, lt, z, d)
            s.drafted += len(d)
            s.accepted += n
            dr.tokens, dr.rows = [], []
            if nxt_tok is not None:  # rejected: both sides keep the pending token and the tokens that stood
                t.rollback(i, dr.t_start + n + 1)
                g.rollback(i, gstart[i] + n + 1)
                new = None
                dr.k_next = 1
            else:  # the guidance side is level with the target's pending token (the draft's last)
                dr.g_last, dr.g_fresh = [d[-1]], False
                dr.k_next = min(2 * dr.k_next, self.k)
            emitted = [(tok, False, j) for j, tok in enumerate(d[:n])]
            if nxt_tok is not None:
                emitted.append((nxt_tok, True, n))
            out[i] = [(tok, float(token_logprobs(z[j][None, :], [tok])[0]) if s.req.cfg.logprobs else 0.0, guided)
                      for tok, guided, j in emitted]
            dr.after = new if new is not None else True
        return out

    @staticmethod
    def _adopt(s: _Slot, dr: Draft, new: tuple[list[int], list[np.ndarray], int]) -> None:
        """Slot ``s`` takes a new draft (tokens, target rows, where its decoding began) to verify next round: the
        guidance's next token is the one the draft was made from, the target's the draft's last."""
        dr.g_last, dr.g_fresh = s.last, s.fresh
        dr.tokens, dr.rows, dr.t_start = new
        s.last, s.fresh = [dr.tokens[-1]], False

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
