"""Reading a prompt's gate feature from the model (:class:`~safeinfer_local.core.gate.Read`): ``l_out-B`` of one
or more blocks, pooled (mean or max) over the prompt's tokens or the last ``tail`` of them, leaving out a leading
BOS (the same row for every prompt), captured with ``cb_eval`` while the prompt is decoded without a control
vector. A head read (every gate before 0.2) covers the prompt minus its last token and decodes just that head; a
``final`` read decodes the whole prompt, the final token included. Many prompts share one ``llama_decode`` (one KV
sequence each), which is what makes ``screen`` fast. Only the blocks read are asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core.gate import Read
from ..errors import UsageError
from ..llama.engine import ActivationHook, Model


@dataclass(frozen=True)
class Handoff:
    """A prompt's KV decoded by the gate's reader without a vector, for the side that goes on: the head (the
    prompt minus its last token, ``logits`` None), or the whole prompt with the next token's ``logits`` (a prompt
    the gate passed: a side decoding it plainly has nothing left to decode before it samples)."""

    state: bytes
    n_tokens: int
    logits: np.ndarray | None = None


class FeatureReader:
    """A context of its own (it carries the capture callback, so the decoding sides never pay for it)."""

    def __init__(self, model: Model, blocks: int | tuple[int, ...], n_ctx: int = 4096, n_threads: int | None = None,
                 n_seq: int = 16, cut: bool = True) -> None:
        self.blocks = (blocks,) if isinstance(blocks, int) else tuple(blocks)
        for block in self.blocks:
            if not 0 <= block < model.n_layer - 1:
                raise UsageError(f"a gate reads a block in 0..{model.n_layer - 2} (the last block's rows are "
                                 f"pruned), not {block}")
        self.model, self.n_seq = model, n_seq
        self.cut = cut
        """Stop the graph after the last block read when the KV is thrown away (False: compute every block, as
        the benchmark's side-by-side does)."""
        self.names = {f"l_out-{b}": b for b in self.blocks}
        self._rows: dict[int, list[np.ndarray]] = {}
        self.hook = ActivationHook((), patch=self._collect)
        self.ctx = model.context(n_ctx=n_ctx, n_seq_max=n_seq, n_threads=n_threads, capture=self.hook)

    def _collect(self, name: str, rows: np.ndarray) -> None:
        self._rows.setdefault(self.names[name], []).append(rows.copy())
        return None

    def _span(self, tokens: list[int], final: bool) -> tuple[int, int]:
        """(rows, skip): how many of a prompt's first rows a read covers (the head: the prompt minus its last
        token, as the real decode runs it without the vector; or, ``final``, the whole prompt) and how many
        leading rows never count (a BOS row, the same for every prompt)."""
        n = len(tokens) if final else (len(tokens) - 1 or len(tokens))
        return n, int(n > 1 and tokens[0] == self.model.bos)

    def features(self, token_lists: list[list[int]], read: Read | int = 0) -> np.ndarray:
        """One feature per prompt, as an (n, width) float64 array: ``read`` (a :class:`Read` of this reader's
        blocks), or a tail (an int) at the (first) block over the prompt head, as gates before 0.2 read."""
        if not isinstance(read, Read):
            read = Read((self.blocks[0],), read)
        return self.features_grid(token_lists, (read,))[read]

    def features_by_block(self, token_lists: list[list[int]], tail: int = 0) -> dict[int, np.ndarray]:
        """Every block's (n, n_embd) head features over the last ``tail`` tokens, from one decode of each prompt."""
        reads = {b: Read((b,), tail) for b in self.blocks}
        grid = self.features_grid(token_lists, tuple(reads.values()))
        return {b: grid[r] for b, r in reads.items()}

    def features_grid(self, token_lists: list[list[int]], reads: tuple[Read, ...]) -> dict[Read, np.ndarray]:
        """The features of every ``read`` (blocks of this reader), from one decode of each prompt: the whole prompt
        when a read wants the final token (the head's rows are the same rows), else the head alone."""
        for r in reads:
            if any(b not in self.names.values() for b in r.blocks):
                raise UsageError(f"this reader captures blocks {self.blocks}, not {r.blocks}")
        whole = any(r.final for r in reads)
        heads = [list(t[:self._span(t, whole)[0]]) for t in token_lists]
        for h in heads:
            if not h:
                raise UsageError("empty prompt")
            if len(h) + (not whole) > self.ctx.n_ctx:
                raise UsageError(f"prompt is {len(h) + (not whole)} tokens but the context holds {self.ctx.n_ctx}")
        out: dict[Read, list[np.ndarray]] = {r: [] for r in reads}
        i = 0
        while i < len(heads):
            group: list[list[int]] = []
            used = 0
            while (i < len(heads) and len(group) < self.n_seq
                   and (not group or used + len(heads[i]) <= self.ctx.n_ctx)):
                group.append(heads[i])
                used += len(heads[i])
                i += 1
            feats_of, _ = self._decode(group, reads, [token_lists[j] for j in range(i - len(group), i)])
            for key, feats in feats_of.items():
                out[key].extend(feats)
        return {r: np.stack(v) if v else np.zeros((0, self.model.n_embd * len(r.blocks))) for r, v in out.items()}

    def features_and_head(self, tokens: list[int], read: Read | int = 0,
                          whole: Callable[[np.ndarray], bool] | None = None) -> tuple[np.ndarray, Handoff]:
        """One prompt's feature and its KV decoded without a vector (:class:`Handoff`): the head (the prompt minus
        the last token), which a side that would decode the same head imports, decoding the last token itself.
        With a ``final`` read the whole prompt is decoded: the head as the side would (one decode), then the last
        token alone, so the KV handed on is bit for bit the side's own (a decode of the whole prompt at once gives
        the head's rows from a larger batch, whose kernels round differently, and greedy text drifts after a few
        dozen tokens). ``whole(feature)`` True (the gate passed the prompt): the last token's cell and its logits
        are handed on too, so a plain side samples at once; else the last token's cell is dropped."""
        if not isinstance(read, Read):
            read = Read((self.blocks[0],), read)
        n, _ = self._span(tokens, read.final)
        if n + (not read.final) > self.ctx.n_ctx:
            raise UsageError(f"prompt is {n + (not read.final)} tokens but the context holds {self.ctx.n_ctx}")
        decide = whole if read.final and whole is not None and len(tokens) > 1 else None
        feats, logits = self._decode([list(tokens[:n])], (read,), [tokens], keep=True, split_last=read.final,
                                     decide=decide)
        feat = feats[read][0]
        try:
            if logits is not None:  # passed: the last token was decoded to the end
                return feat, Handoff(self.ctx.export_seq(0), len(tokens), logits)
            head = self._span(tokens, False)[0]
            if read.final:  # hand on the head only: the side decodes the last prompt token (with its vector)
                self.ctx.truncate(0, head)
            return feat, Handoff(self.ctx.export_seq(0), head)
        finally:
            self.ctx.clear()

    def _decode(self, group: list[list[int]], reads: tuple[Read, ...], prompts: list[list[int]],
                keep: bool = False, split_last: bool = False,
                decide: Callable[[np.ndarray], bool] | None = None) -> tuple[dict[Read, list[np.ndarray]],
                                                                             np.ndarray | None]:
        """Decode ``group`` (each prompt's decoded tokens, one KV sequence each) and pool every read's rows;
        ``prompts``: the whole prompts they come from. ``split_last`` (one prompt): its last token in a decode of
        its own, after the rest. ``decide`` (with ``split_last``): asked with the first read's feature as soon as
        the last token's rows of its blocks exist, inside that decode: True (the gate passes the prompt) lets the
        decode run to its logits, which come back; False cuts the graph there (the rest of the model and its
        logits are not computed: the caller drops that token's cell). Returns the reads' features and those
        logits (or None)."""
        if split_last and len(group) != 1:
            raise ValueError("split_last decodes one prompt")
        self.ctx.clear()
        self.ctx.set_control_vector(None)
        self._rows = {}
        wanted = {b for r in reads for b in r.blocks}
        self.hook.names = {n for n, b in self.names.items() if b in wanted}
        # KV thrown away after the read: the blocks after the last one read are not computed (half the work at
        # block 8 of 18); KV handed on to a side is computed whole
        cut_at = f"l_out-{max(wanted)}"
        self.hook.stop_if = None if keep or not self.cut else (lambda name: name == cut_at)
        n = sum(len(h) for h in group)
        verdict: list[bool] = []
        logits = None
        try:
            if split_last and len(group[0]) > 1:
                self.ctx.decode_multi([(0, group[0][:-1])], logits="none")
                if decide is not None:
                    last_block = f"l_out-{max(reads[0].blocks)}"

                    def stop_if(name: str) -> bool:
                        if name != last_block:
                            return False
                        feat = self._pool(self._stacked(reads[0].blocks, n), group, reads[:1], prompts)[reads[0]][0]
                        verdict.append(bool(decide(feat)))
                        return not verdict[-1]
                    self.hook.stop_if = stop_if
                last = self.ctx.decode_multi([(0, group[0][-1:])], logits="last" if decide else "none")[0]
                logits = last if verdict and verdict[-1] else None
            else:
                self.ctx.decode_multi(list(enumerate(group)), logits="none")
        finally:
            self.hook.names, self.hook.stop_if = set(), None
            if not keep:
                self.ctx.clear()
        return self._pool(self._stacked(wanted, n), group, reads, prompts), logits

    def _stacked(self, blocks, n: int) -> dict[int, np.ndarray]:
        """The rows captured so far of each block, as one float64 array each (``n`` rows, or a UsageError)."""
        rows: dict[int, np.ndarray] = {}
        for b in blocks:
            r = np.concatenate(self._rows.get(b, [np.zeros((0, self.model.n_embd), np.float32)]))
            if len(r) != n:
                raise UsageError(f"captured {len(r)} rows of l_out-{b} for {n} tokens")
            rows[b] = r.astype(np.float64)
        return rows

    def _pool(self, rows: dict[int, np.ndarray], group: list[list[int]], reads: tuple[Read, ...],
              prompts: list[list[int]]) -> dict[Read, list[np.ndarray]]:
        """Each read's feature of each prompt, pooled from the decoded rows."""
        out: dict[Read, list[np.ndarray]] = {}
        for rd in reads:
            feats, at = [], 0
            for h, t in zip(group, prompts, strict=True):
                span = self._span(t, rd.final)  # a head read of a whole decode: the head's rows
                sels = [rd.rows(*span, tail) for tail in rd.block_tails]
                parts = [rows[b][at + sel.start:at + sel.stop] for b, sel in zip(rd.blocks, sels, strict=True)]
                feats.append(np.concatenate([p.mean(0) if rd.pool == "mean" else p.max(0) for p in parts]))
                at += len(h)
            out[rd] = feats
        return out
