"""The decoder: the sides a model needs for each variant and guidance, made on first use and kept, and the calls
that run requests through the one loop (:class:`~.batch.BatchGenerator`) or score a continuation.

Nothing outside this package touches it: :class:`~safeinfer_local.api.SafeInfer` is the façade, and passes the
settings (steering, guidance, λ) with every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..core.gate import Read
from ..core.sampling import guided_logits, token_logprobs
from ..core.settings import DEFAULT_N_CTX, GUIDED_VARIANTS, SA_VARIANTS, check_parallel
from ..errors import UsageError
from ..llama.engine import Model, default_threads
from .batch import BatchGenerator, GenConfig, Result, Step
from .gating import FeatureReader, Handoff
from .guidance import GuidanceSpec, prefix_text, safe_demos, unsafe_demos
from .sides import SharedContext, Side, check_same_vocab
from .steering import NO_VECTOR, Buffers, Steering, check_plan_steerable, position_buffers

LAYOUTS = ("auto", "split", "shared")


@dataclass(frozen=True)
class Plan:
    """Which sides a variant runs on (keys of :meth:`Decoder.side`) and the control vector for each chunk."""

    target: str
    tbuf: Buffers
    guide: str | None = None
    gbuf: Buffers | None = None


class Decoder:
    """A model's sides and the decode calls. Sides are llama.cpp contexts keyed by (role, slots); they are made
    on first use and reused across requests, so the ``prompt`` guidance prefix is decoded once per process."""

    def __init__(self, model: Model, n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None) -> None:
        self.model = model
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self._sides: dict[tuple, Side | tuple[Side, Side]] = {}
        self._guide_models: dict[str, Model] = {}
        self.decode_s = 0.0
        """Wall time spent in llama.cpp decoding so far (the speed benchmark's decode/Python split)."""
        # With two sides, each decodes on half the threads, at the same time (llama_decode releases the GIL):
        # measured here, 23.5 ms per step against 26.9 ms for the two decodes one after the other.
        total = n_threads or default_threads()
        self._all_threads = total
        self._half_threads = max(1, total // 2)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="guide") if total >= 2 else None
        self._readers: dict[tuple[int, ...], FeatureReader] = {}

    # -- the harm gate's features ---------------------------------------------------------------------------
    def _reader(self, read: Read) -> FeatureReader:
        r = self._readers.get(read.blocks)
        if r is None:
            r = self._readers[read.blocks] = FeatureReader(self.model, read.blocks, self.n_ctx, self.n_threads)
        return r

    def features(self, read: Read, token_lists: list[list[int]]) -> np.ndarray:
        """Gate features (``read``'s rows, pooled), many prompts per decode."""
        return self._reader(read).features(token_lists, read)

    def features_and_head(self, read: Read, tokens: list[int],
                          whole: Callable[[np.ndarray], bool] | None = None) -> tuple[np.ndarray, Handoff]:
        """One prompt's gate feature and its KV for the side that goes on (see
        :meth:`FeatureReader.features_and_head`)."""
        return self._reader(read).features_and_head(tokens, read, whole)

    # -- sides ----------------------------------------------------------------------------------------------
    def target_demos(self) -> list:
        """The target side's prefix under ``prompt`` guidance: matched safe demonstrations (see guidance.py)."""
        return safe_demos()

    def side(self, key: str, guidance: GuidanceSpec, slots: int = 1) -> Side:
        full = (key, str(guidance) if key.startswith("guide-") else "", slots)
        side = self._sides.get(full)
        if side is None:
            m = self.model
            t = self.n_threads if key == "plain" else self._half_threads
            if key in ("plain", "target-plain", "guide-plain"):
                side = Side(m, self.n_ctx, t, slots=slots)
            elif key == "target-prefixed":
                side = Side(m, self.n_ctx, t, m.tokenize(prefix_text(self.target_demos()), add_bos=True), slots=slots)
            elif key == "guide-prompt":
                side = Side(m, self.n_ctx, t, m.tokenize(prefix_text(unsafe_demos()), add_bos=True), slots=slots)
            elif key == "guide-lora":
                side = Side(m, self.n_ctx, t, lora=guidance.path, slots=slots)
            elif key == "guide-model":
                side = Side(self._guide_model(guidance), self.n_ctx, t, slots=slots)
            else:  # pragma: no cover
                raise KeyError(key)
            self._sides[full] = side
        return side

    def _shared_sides(self, p: Plan, slots: int) -> tuple[Side, Side]:
        """Target and guidance sides in one :class:`SharedContext`, steered at the blocks the plan's vectors use."""
        blocks = set()
        for buf in (*p.tbuf, *p.gbuf):
            if buf is not None:
                rows = buf.reshape(self.model.n_layer - 1, self.model.n_embd)
                blocks.update(int(b) + 1 for b in np.flatnonzero(np.any(rows != 0, axis=1)))
        key = ("shared", tuple(sorted(blocks)), slots)
        pair = self._sides.get(key)
        if pair is None:
            sc = SharedContext(self.model, self.n_ctx, self._all_threads, slots, tuple(blocks))
            pair = self._sides[key] = (Side(self.model, self.n_ctx, self._all_threads, slots=slots, shared=sc),
                                       Side(self.model, self.n_ctx, self._all_threads, slots=slots, shared=sc,
                                            base=slots))
        return pair

    def _guide_model(self, guidance: GuidanceSpec) -> Model:
        gm = self._guide_models.get(str(guidance.path))
        if gm is None:
            gm = Model(guidance.path, n_gpu_layers=self.model.n_gpu_layers)  # offloaded as the target is
            check_same_vocab(self.model, gm)
            self._guide_models[str(guidance.path)] = gm
        return gm

    def plan(self, variant: str, steering: Steering | None, guidance: GuidanceSpec) -> Plan:
        n_layer = self.model.n_layer
        sa = steering if variant in SA_VARIANTS else None
        if variant in SA_VARIANTS and steering is None:
            raise UsageError(f"variant {variant!r} needs a safety vector (--vector)")
        kind = guidance.kind
        check_plan_steerable(self.model, steering, variant, kind, self.n_threads)
        if variant not in GUIDED_VARIANTS or kind == "none":
            return Plan("plain", position_buffers(sa, n_layer))
        if kind == "prompt":
            return Plan("target-prefixed", position_buffers(sa, n_layer), "guide-prompt", NO_VECTOR)
        if kind == "negative":
            if steering is None:
                raise UsageError("--guidance negative needs a safety vector (--vector)")
            return Plan("target-plain", position_buffers(sa, n_layer), "guide-plain",
                        position_buffers(steering, n_layer, sign=-1.0))
        return Plan("target-plain", position_buffers(sa, n_layer), f"guide-{kind}", NO_VECTOR)

    def _both(self, target_call, guide_call):
        """Run the target's and the guidance's call together (guidance on the worker thread). The wall time
        spent here is decode time (``decode_s``)."""
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

    # -- generation -----------------------------------------------------------------------------------------
    def batch(self, variant: str, steering: Steering | None, guidance: GuidanceSpec, lam: float,
              slots: int = 1, speculate: int = 0, layout: str = "auto") -> BatchGenerator:
        """A batch generator with ``slots`` request slots for one variant and its settings; ``speculate``: tokens
        the target drafts per round before the guidance verifies them (guided variants only).

        ``layout`` of a guided variant's two sides: ``split``, a context each, decoding at the same time on half
        the threads; ``shared``, one context for both, one decode per step on every thread, the vector added per
        row (:class:`~.sides.SharedContext`: only where both sides run the same weights with no prefix and no
        LoRA, i.e. ``negative`` guidance); ``auto``: ``shared`` where it applies with 2 or more slots and no
        speculation, else ``split`` (measured on a 2-core CPU: benchmarks/batch_layout.py, docs/RESULTS.md)."""
        check_parallel(slots)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        p = self.plan(variant, steering, guidance)
        can_share = p.target == "target-plain" and p.guide == "guide-plain" and not speculate
        if layout == "shared" and not can_share:
            raise UsageError("the shared layout needs --guidance negative and no --speculate")
        if layout == "shared" or (layout == "auto" and can_share and slots >= 2):
            target, guide = self._shared_sides(p, slots)
        else:
            target = self.side(p.target, guidance, slots)
            guide = self.side(p.guide, guidance, slots) if p.guide else None
        return BatchGenerator(self.model, target, p.tbuf, guide, p.gbuf, lam, self._both, variant,
                              head_threads=self._all_threads if guide is not None else None,
                              speculate=speculate if guide is not None else 0)

    def stream(self, gen: BatchGenerator, prompt_tokens: list[int], cfg: GenConfig, prompt: str = "",
               handoff: Handoff | None = None) -> Iterator[tuple[Step, Result | None]]:
        """Run one request alone (a batch of one); yields each step, the last one with its result.
        ``handoff``: the prompt's KV, already decoded without a vector elsewhere (the gate's reader)."""
        if not prompt_tokens:
            raise UsageError("empty prompt")
        gen.insert(0, prompt_tokens, cfg, prompt, handoff)
        try:
            while gen:
                for ev in gen.step():
                    if ev.error is not None:
                        raise ev.error
                    yield ev.step, ev.result
        finally:
            gen.remove(0)

    def generate_many(self, gen: BatchGenerator, requests: Iterable[tuple[Hashable, str, list[int]]],
                      cfg: GenConfig) -> Iterator[tuple[Hashable, Result | UsageError]]:
        """Yield ``(key, Result or UsageError)`` for each ``(key, prompt_text, prompt_tokens)`` request, in the
        order they finish; free slots are refilled from ``requests`` as they come."""
        reqs = iter(requests)
        exhausted = False
        while True:
            while not exhausted and gen.n_waiting < gen.target.slots - gen.n_active + 1:
                try:
                    key, text, toks = next(reqs)
                except StopIteration:
                    exhausted = True
                    break
                gen.insert(key, toks, cfg, text)
            if not gen:
                return
            for ev in gen.step():
                if ev.error is not None:
                    yield ev.key, ev.error
                elif ev.result is not None:
                    yield ev.key, ev.result

    # -- teacher-forced scoring -----------------------------------------------------------------------------
    def score_rows(self, prompt_tokens: list[int], cont_tokens: list[int], variant: str, steering: Steering | None,
                   guidance: GuidanceSpec) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw next-token logits behind :meth:`score`: the target side's rows and the guidance side's
        (``None`` for unguided variants), one row per continuation token. Any λ applies to them afterwards
        (``guided_logits`` is a pure function), so a λ sweep costs one pass."""
        if not cont_tokens:
            raise UsageError("empty continuation")
        if not prompt_tokens:
            raise UsageError("empty prompt")
        p = self.plan(variant, steering, guidance)
        target = self.side(p.target, guidance)
        guide = self.side(p.guide, guidance) if p.guide else None
        return self._both(lambda: self._rows(target, p.tbuf, prompt_tokens, cont_tokens),
                          (lambda: self._rows(guide, p.gbuf, prompt_tokens, cont_tokens)) if guide else None)

    def score(self, prompt_tokens: list[int], cont_tokens: list[int], variant: str, steering: Steering | None,
              guidance: GuidanceSpec, lam: float) -> np.ndarray:
        """Per-token log-probabilities of ``cont_tokens`` after the prompt, teacher-forced, under the variant's
        own next-token distribution at T = 1 (guided variants: softmax of the guided scores)."""
        rows_t, rows_u = self.score_rows(prompt_tokens, cont_tokens, variant, steering, guidance)
        if rows_u is None:
            return token_logprobs(rows_t, cont_tokens)
        return token_logprobs(guided_logits(rows_t, rows_u, lam), cont_tokens)

    @staticmethod
    def _rows(side: Side, buffers: Buffers, prompt_tokens: list[int], cont_tokens: list[int]) -> np.ndarray:
        """The same layout as generation: head, last prompt token, then the continuation in one batch."""
        last = side.begin(0, prompt_tokens, buffers[0])
        first = side.decode_slots([(0, last)], buffers[1])[0]
        if side.room(0) < len(cont_tokens):
            raise UsageError(f"prompt + continuation do not fit the context of {side.n_ctx} tokens")
        rows = [first[None, :]]
        if len(cont_tokens) > 1:
            rows.append(side.rows(0, cont_tokens[:-1], buffers[2]))
        return np.concatenate(rows)
