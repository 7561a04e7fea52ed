"""Reading a prompt's gate feature from the model: the mean of ``l_out-B`` over the prompt's tokens minus the
last one (and minus a leading BOS, the same row for every prompt), or over the last ``tail`` of those, captured
with ``cb_eval`` while the prompt head is decoded without a control vector. Many prompts share one ``llama_decode``
(one KV sequence each), which is what makes ``screen`` fast. Only that one tensor is asked for."""

from __future__ import annotations

import numpy as np

from ..core.gate import check_tail
from ..errors import UsageError
from ..llama.engine import ActivationHook, Model


class FeatureReader:
    """A context of its own (it carries the capture callback, so the decoding sides never pay for it)."""

    def __init__(self, model: Model, blocks: int | tuple[int, ...], n_ctx: int = 4096, n_threads: int | None = None,
                 n_seq: int = 16) -> None:
        self.blocks = (blocks,) if isinstance(blocks, int) else tuple(blocks)
        for block in self.blocks:
            if not 0 <= block < model.n_layer - 1:
                raise UsageError(f"a gate reads a block in 0..{model.n_layer - 2} (the last block's rows are "
                                 f"pruned), not {block}")
        self.model, self.n_seq = model, n_seq
        self.names = {f"l_out-{b}": b for b in self.blocks}
        self._rows: dict[int, list[np.ndarray]] = {}
        self.hook = ActivationHook((), patch=self._collect)
        self.ctx = model.context(n_ctx=n_ctx, n_seq_max=n_seq, n_threads=n_threads, capture=self.hook)

    def _collect(self, name: str, rows: np.ndarray) -> None:
        self._rows.setdefault(self.names[name], []).append(rows.copy())
        return None

    def _head(self, tokens: list[int]) -> tuple[list[int], int]:
        """The tokens to decode (the prompt minus its last token, BOS kept so that the rows are the ones the
        real decode computes) and how many leading rows to leave out of the mean (a BOS row, the same for every
        prompt)."""
        head = list(tokens[:-1]) or list(tokens)
        return head, int(len(head) > 1 and head[0] == self.model.bos)

    def features(self, token_lists: list[list[int]], tail: int = 0) -> np.ndarray:
        """One (n_embd,) feature per prompt at the (first) block, as an (n, n_embd) float64 array; ``tail``: the
        mean over the head's last ``tail`` tokens only (0: all of them)."""
        return self.features_by_block(token_lists, tail)[self.blocks[0]]

    def features_by_block(self, token_lists: list[list[int]], tail: int = 0) -> dict[int, np.ndarray]:
        """Every block's (n, n_embd) features, from one decode of each prompt."""
        grid = self.features_grid(token_lists, (tail,))
        return {b: grid[b, tail] for b in self.blocks}

    def features_grid(self, token_lists: list[list[int]], tails: tuple[int, ...] = (0,)
                      ) -> dict[tuple[int, int], np.ndarray]:
        """The (n, n_embd) features for every block × tail, from one decode of each prompt."""
        for t in tails:
            check_tail(t)
        heads = [self._head(t) for t in token_lists]
        for h, _ in heads:
            if not h:
                raise UsageError("empty prompt")
            if len(h) + 1 > self.ctx.n_ctx:
                raise UsageError(f"prompt is {len(h) + 1} tokens but the context holds {self.ctx.n_ctx}")
        out: dict[tuple[int, int], list[np.ndarray]] = {(b, t): [] for b in self.blocks for t in tails}
        i = 0
        while i < len(heads):
            group: list[tuple[list[int], int]] = []
            used = 0
            while (i < len(heads) and len(group) < self.n_seq
                   and (not group or used + len(heads[i][0]) <= self.ctx.n_ctx)):
                group.append(heads[i])
                used += len(heads[i][0])
                i += 1
            for key, feats in self._decode(group, tails).items():
                out[key].extend(feats)
        return {k: np.stack(v) if v else np.zeros((0, self.model.n_embd)) for k, v in out.items()}

    def features_and_head(self, tokens: list[int], tail: int = 0) -> tuple[np.ndarray, bytes]:
        """One prompt's feature at the first block, and the KV state of its head (prompt minus the last token,
        decoded without a vector): a side that would decode the same head can import it instead."""
        head = self._head(tokens)
        if len(head[0]) + 1 > self.ctx.n_ctx:
            raise UsageError(f"prompt is {len(head[0]) + 1} tokens but the context holds {self.ctx.n_ctx}")
        check_tail(tail)
        feats = self._decode([head], (tail,), keep=True)
        try:
            state = self.ctx.export_seq(0)
        finally:
            self.ctx.clear()
        return feats[self.blocks[0], tail][0], state

    def _decode(self, group: list[tuple[list[int], int]], tails: tuple[int, ...], keep: bool = False
                ) -> dict[tuple[int, int], list[np.ndarray]]:
        self.ctx.clear()
        self.ctx.set_control_vector(None)
        self._rows = {}
        self.hook.names = set(self.names)
        try:
            self.ctx.decode_multi([(k, h) for k, (h, _) in enumerate(group)], logits="none")
        finally:
            self.hook.names = set()
            if not keep:
                self.ctx.clear()
        n = sum(len(h) for h, _ in group)
        out: dict[tuple[int, int], list[np.ndarray]] = {}
        for b in self.blocks:
            rows = np.concatenate(self._rows.get(b, [np.zeros((0, self.model.n_embd), np.float32)]))
            if len(rows) != n:
                raise UsageError(f"captured {len(rows)} rows of l_out-{b} for {n} tokens")
            rows = rows.astype(np.float64)
            for t in tails:
                feats, at = [], 0
                for h, skip in group:
                    start = at + skip if not t else max(at + skip, at + len(h) - t)
                    feats.append(rows[start:at + len(h)].mean(0))
                    at += len(h)
                out[b, t] = feats
        return out
