"""A *side*: one llama.cpp context that follows requests in slots, for the target (served) side or the guidance
side of safety-guided decoding.

A control vector applies to a whole llama.cpp context, so the two sides, which need different ones, are two
contexts on the same weights (a ``model:`` guidance has its own weights). A side may carry a fixed prefix (the
matched demonstrations of ``prompt`` guidance), decoded once per process into KV sequence 0 and copied into a
slot's sequence for every request (``seq_cp`` shares the cells), never re-decoded. Slot ``i`` lives in KV
sequence ``slot_seq(i)``. There is one way to start a request on a side: :meth:`Side.begin`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..llama.engine import ActivationHook, Context, Model


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


class SharedContext:
    """One llama.cpp context that holds both sides of guided decoding on the same weights: target slot ``i`` in KV
    sequence ``i``, guidance slot ``i`` in ``slots + i``, so that a step decodes both sides' rows in one
    ``llama_decode``. llama.cpp's control vector belongs to a whole context, so here the vector is added per row
    instead: a ``cb_eval`` patch adds each row's block ``B`` direction to ``l_out-B`` (where llama.cpp adds its
    control vector), per decoded row, from the buffer its item asks for. No control vector is ever set on it.

    With ``n_sides=1`` it holds one side alone, steered per row: rows in different vector states (a prompt head's
    piece beside running slots' steps) then share one ``llama_decode``; that side may carry a prefix (``prefix``:
    one more sequence for it)."""

    def __init__(self, model: Model, n_ctx: int, n_threads: int | None, slots: int, blocks: tuple[int, ...],
                 n_sides: int = 2, prefix: bool = False) -> None:
        if prefix and n_sides != 1:
            raise ValueError("only a side alone in a shared context may carry a prefix")
        self.model, self.slots, self.n_threads, self.prefix = model, slots, n_threads, prefix
        self.blocks = tuple(sorted(set(blocks)))
        self.hook = ActivationHook({f"l_out-{b}" for b in self.blocks}, self._patch)
        # n_ctx cells per side: each side keeps the room it has in a context of its own (n_ctx positions per
        # sequence)
        self.ctx: Context = model.context(n_ctx=n_sides * n_ctx, n_seq_max=n_sides * slots + prefix,
                                          n_threads=n_threads, capture=self.hook)
        self.n_ctx = min(n_ctx, self.ctx.n_ctx)
        self.sides: list[Side] = []
        self._deltas: dict[int, np.ndarray] | None = None

    def decode(self, items: list[tuple[int, list[int], np.ndarray | None]],
               logits: str | list[str] = "last") -> list[np.ndarray]:
        """Decode ``(sequence, tokens, control-vector buffer or None)`` items in one batch (or as few as
        ``n_batch`` allows), each row steered by its item's buffer; ``logits``: one mode, or one per item."""
        steered = [(k, b) for k, (_, _, b) in enumerate(items) if b is not None]
        if not steered:
            self._deltas = None
        else:
            counts = np.array([len(t) for _, t, _ in items])
            per_row_item = np.repeat(np.arange(len(items)), counts)
            n_embd, n_layer = self.model.n_embd, self.model.n_layer
            self._deltas = {}
            for blk in self.blocks:
                by_item = np.zeros((len(items), n_embd), np.float32)
                for k, b in steered:
                    by_item[k] = b.reshape(n_layer - 1, n_embd)[blk - 1]
                self._deltas[blk] = by_item[per_row_item] if by_item.any() else None
        return self.ctx.decode_multi([(seq, toks) for seq, toks, _ in items], logits=logits)

    def _patch(self, name: str, rows: np.ndarray) -> np.ndarray | None:
        if self._deltas is None:
            return None
        d = self._deltas.get(int(name.rsplit("-", 1)[1]))
        if d is None:
            return None
        a, b = self.hook.rows
        return rows + d[a:b]

    def used(self) -> int:
        """KV cells in use by both sides (a head the guidance copied from the target counted once)."""
        return sum(side.own_used() for side in self.sides)


class Side:
    """One context with ``slots`` request slots, an optional cached prefix, and control-vector switching; or one
    side's part of a :class:`SharedContext` (``shared``: its sequences start at ``base``; a prefix only where it
    is the context's one side)."""

    def __init__(self, model: Model, n_ctx: int, n_threads: int | None, prefix: list[int] | None = None,
                 lora: Path | None = None, slots: int = 1, shared: SharedContext | None = None,
                 base: int = 0) -> None:
        self.model = model
        self.prefix = list(prefix or [])
        self.slots = slots
        self.n_threads = n_threads
        self.shared = shared
        self.base = base
        if shared is not None:
            if lora is not None or bool(self.prefix) != shared.prefix or (self.prefix and base):
                raise ValueError("a side in a shared context has no LoRA, and a prefix only alone in one made for "
                                 "it (sequence 0)")
            self.ctx: Context = shared.ctx
            shared.sides.append(self)
        else:
            self.ctx = model.context(n_ctx=n_ctx, n_seq_max=slots + (1 if self.prefix else 0), n_threads=n_threads)
        self.lora = lora
        if lora is not None:
            self.ctx.set_lora(lora)
        self._prefix_decoded = False
        self._borrowed = [0] * slots  # head cells copied from the other side of a shared context, per slot

    @property
    def n_ctx(self) -> int:
        """Positions a sequence may hold (a request's prompt and reply)."""
        return self.shared.n_ctx if self.shared is not None else self.ctx.n_ctx

    @property
    def capacity(self) -> int:
        """KV cells the context holds, what :meth:`used` counts against (both sides' in a shared context)."""
        return self.ctx.n_ctx

    def slot_seq(self, i: int) -> int:
        return self.base + i + (1 if self.prefix else 0)

    def _decode(self, items: list[tuple[int, list[int]]], buffer: np.ndarray | None,
                logits: str | list[str]) -> list[np.ndarray]:
        """Decode ``(sequence, tokens)`` items under one control vector: the context's own, or per row in a
        shared context (one logits mode for every item there)."""
        if self.shared is not None:
            return self.shared.decode([(seq, toks, buffer) for seq, toks in items], logits)
        self.ctx.set_control_vector(buffer)
        return self.ctx.decode_multi(items, logits=logits)

    def begin(self, i: int, prompt_tokens: list[int], head_buffer: np.ndarray | None,
              decode_head: bool = True) -> list[int]:
        """Reset slot ``i`` to the cached prefix and decode its prompt minus the last token (with
        ``head_buffer`` as control vector); returns the last prompt token, which the caller decodes (alone or
        batched with other slots). The prompt's own BOS is dropped after a prefix (the prefix starts with BOS).
        ``decode_head=False`` leaves the head to :meth:`import_head`."""
        ctx, seq = self.ctx, self.slot_seq(i)
        toks = self.own_tokens(prompt_tokens)
        if self.prefix:
            if not self._prefix_decoded:
                self._decode([(0, self.prefix)], None, "none")  # no vector: the context's, or per row
                self._prefix_decoded = True
            ctx.truncate(seq, 0)
            ctx.copy_seq(0, seq)
        else:
            ctx.truncate(seq, 0)
        if not toks:
            raise UsageError("empty prompt")
        if len(self.prefix) + len(toks) >= self.n_ctx:
            ctx.truncate(seq, 0)
            raise UsageError(f"prompt is {len(toks)} tokens (+{len(self.prefix)} of guidance prefix) but the "
                             f"context holds {self.n_ctx} (shorten it or raise --n-ctx)")
        self._borrowed[i] = 0
        if toks[:-1] and decode_head:
            self._decode([(seq, toks[:-1])], head_buffer, "none")
        return toks[-1:]

    def own_tokens(self, prompt_tokens: list[int]) -> list[int]:
        """The prompt as this side decodes it: its own BOS dropped after a prefix (the prefix starts with BOS)."""
        toks = list(prompt_tokens)
        return toks[1:] if self.prefix and toks and toks[0] == self.model.bos else toks

    def prefill(self, i: int, tokens: list[int], buffer: np.ndarray | None) -> None:
        """Decode a piece of slot ``i``'s prompt head (after :meth:`begin` with ``decode_head=False``), no logits:
        a long prompt admitted in pieces between decode steps."""
        if tokens:
            self._decode([(self.slot_seq(i), list(tokens))], buffer, "none")

    def shares_head_with(self, other: Side, buffers, other_buffers) -> bool:
        """Both sides would compute the same KV for the prompt head: same weights, no prefix, no LoRA, and no
        control vector on the head on either side."""
        return (self.model is other.model and not self.prefix and not other.prefix and not self.lora
                and not other.lora and buffers[0] is None and other_buffers[0] is None)

    def import_head(self, i: int, other: Side, prompt_tokens: list[int]) -> None:
        """Take slot ``i``'s prompt head KV from the same slot of ``other`` (decoded there) instead of decoding
        it again (``llama_state_seq_get/set_data``)."""
        if len(prompt_tokens) <= 1:
            return
        if self.ctx is other.ctx:  # one shared context: the cells are shared, nothing is copied
            self.ctx.copy_seq(other.slot_seq(i), self.slot_seq(i))
            self._borrowed[i] = len(prompt_tokens) - 1
        else:
            self.ctx.import_seq(other.ctx.export_seq(other.slot_seq(i)), self.slot_seq(i), len(prompt_tokens) - 1)

    def import_kv(self, i: int, state: bytes, n_tokens: int) -> None:
        """Load slot ``i``'s first ``n_tokens`` KV from a state exported from another context of the same model
        (the harm gate's reader), in place of decoding them."""
        self.ctx.import_seq(state, self.slot_seq(i), n_tokens)

    def decode_slots(self, items: list[tuple[int, list[int]]], buffer: np.ndarray | None,
                     pieces: list[tuple[int, list[int]]] = ()) -> list[np.ndarray]:
        """Decode tokens for several slots in one batch under one control vector; the last logits of each.
        ``pieces``: prompt-head pieces of other slots decoded in the same batch, no logits (chunked prefill)."""
        seqs = [(self.slot_seq(i), toks) for i, toks in [*items, *pieces]]
        modes = ["last"] * len(items) + ["none"] * len(pieces) if pieces else "last"
        return self._decode(seqs, buffer, modes)[:len(items)]

    def decode_steered(self, items: list[tuple[int, list[int], np.ndarray | None]],
                       pieces: list[tuple[int, list[int], np.ndarray | None]] = ()) -> list[np.ndarray]:
        """(A side steered per row: in a :class:`SharedContext`.) Decode several slots' tokens in one batch, each
        item ``(slot, tokens, buffer)`` under its own vector state; the last logits of each. ``pieces``: prompt-head
        pieces of other slots in the same batch, no logits."""
        seqs = [(self.slot_seq(i), toks, buf) for i, toks, buf in [*items, *pieces]]
        return self.shared.decode(seqs, ["last"] * len(items) + ["none"] * len(pieces))[:len(items)]

    def decode_rows(self, items: list[tuple[int, list[int]]], buffer: np.ndarray | None) -> list[np.ndarray]:
        """Decode tokens for several slots in one batch under one control vector; every position's logits
        (``(len(tokens), n_vocab)`` per item)."""
        return self._decode([(self.slot_seq(i), toks) for i, toks in items], buffer, "all")

    def pos(self, i: int) -> int:
        """Slot ``i``'s next position (tokens in its sequence, the prefix included)."""
        return self.ctx.pos[self.slot_seq(i)]

    def rollback(self, i: int, pos: int) -> None:
        """Drop slot ``i``'s tokens from position ``pos`` on (a rejected speculative draft)."""
        self.ctx.truncate(self.slot_seq(i), pos)

    def rows(self, i: int, tokens: list[int], buffer: np.ndarray | None) -> np.ndarray:
        """Decode ``tokens`` on slot ``i`` in one batch; the logits of every position (teacher forcing)."""
        return self.decode_rows([(i, list(tokens))], buffer)[0]

    def release(self, i: int) -> None:
        self.ctx.truncate(self.slot_seq(i), 0)
        self._borrowed[i] = 0

    def room(self, i: int) -> int:
        """Positions left in slot ``i``'s sequence."""
        return self.n_ctx - self.pos(i)

    def used(self) -> int:
        """KV cells in use in this side's context (the prefix's cells are shared, counted once; a shared context
        counts both sides)."""
        return self.shared.used() if self.shared is not None else self.own_used()

    def own_used(self) -> int:
        n = len(self.prefix)
        return n + sum(max(0, self.pos(i) - n - self._borrowed[i]) for i in range(self.slots))
