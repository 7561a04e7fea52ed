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
from pathlib import Path

import numpy as np

from ..core.gate import Read
from ..core.sampling import log_softmax, token_logprobs
from ..core.settings import DEFAULT_N_CTX, GUIDED_VARIANTS, SA_VARIANTS, check_parallel
from ..errors import UsageError
from ..llama.engine import Model, default_threads
from .batch import BatchGenerator, GenConfig, Result, Step
from .gating import FeatureReader, Handoff
from .guidance import PLAIN, GuidanceSource, GuidanceSpec, SideSpec
from .sides import SharedContext, Side, check_same_vocab
from .steering import NO_VECTOR, Buffers, Steering, check_plan_steerable, position_buffers

LAYOUTS = ("auto", "split", "shared")


@dataclass(frozen=True)
class Plan:
    """Which sides a variant runs on and the control vector for each chunk; ``combine`` joins the two sides' rows
    (None without guidance)."""

    target: SideSpec
    tbuf: Buffers
    guide: SideSpec | None = None
    gbuf: Buffers | None = None
    source: GuidanceSource | None = None

    @property
    def same_weights(self) -> bool:
        """Both sides run the same weights with no prefix (the shared layout applies)."""
        t, g = self.target, self.guide
        return (g is not None and not t.prefix and not g.prefix and t.lora is None and g.lora is None
                and t.model is None and g.model is None)


def _prefix(model: Model, spec: SideSpec) -> list[int]:
    """The tokens of a side's fixed prefix (``prompt`` guidance's demonstrations), BOS first; none without one."""
    return model.tokenize(spec.prefix, add_bos=True) if spec.prefix else []


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
    def side(self, spec: SideSpec, slots: int = 1) -> Side:
        """The side ``spec`` describes (made on first use and kept: a prefix is decoded once per process). An
        unguided variant's :data:`~.guidance.PLAIN` side decodes on every thread, a guided variant's two on half
        the threads each."""
        full = (spec, slots)
        side = self._sides.get(full)
        if side is None:
            model = self._guide_model(spec.model) if spec.model is not None else self.model
            side = self._sides[full] = Side(model, self.n_ctx, self._threads(spec), _prefix(model, spec),
                                            lora=spec.lora, slots=slots)
        return side

    def _threads(self, spec: SideSpec) -> int:
        return self.n_threads if spec == PLAIN else self._half_threads

    def _blocks(self, *bufs: np.ndarray | None) -> tuple[int, ...]:
        """The blocks where any of these vector buffers adds something."""
        blocks = set()
        for buf in bufs:
            if buf is not None:
                rows = buf.reshape(self.model.n_layer - 1, self.model.n_embd)
                blocks.update(int(b) + 1 for b in np.flatnonzero(np.any(rows != 0, axis=1)))
        return tuple(sorted(blocks))

    def _steered_side(self, spec: SideSpec, bufs: Buffers, slots: int) -> Side:
        """``spec``'s side alone in a :class:`SharedContext` that adds its vector per row (made once and kept)."""
        blocks = self._blocks(*bufs)
        key = ("rows", spec, blocks, slots)
        side = self._sides.get(key)
        if side is None:
            t = self._threads(spec)
            prefix = _prefix(self.model, spec)
            sc = SharedContext(self.model, self.n_ctx, t, slots, blocks, n_sides=1, prefix=bool(prefix))
            side = self._sides[key] = Side(self.model, self.n_ctx, t, prefix, slots=slots, shared=sc)
        return side

    def _split_side(self, spec: SideSpec, bufs: Buffers, slots: int, pieces: bool) -> Side:
        """A side of the split layout. With prefill in ``pieces``, a side whose prompt head and steps carry
        different vector states is steered per row, so that a head's piece rides in the step's ``llama_decode``
        (with llama.cpp's one control vector per context, it would be a decode of its own: a second pass over the
        weights for a few tokens); only a side on the target's weights with no LoRA can be."""
        if (pieces and spec.lora is None and spec.model is None
                and not (bufs[0] is bufs[1] is bufs[2])):
            return self._steered_side(spec, bufs, slots)
        return self.side(spec, slots)

    def _shared_sides(self, p: Plan, slots: int) -> tuple[Side, Side]:
        """Target and guidance sides in one :class:`SharedContext`, steered at the blocks the plan's vectors use."""
        blocks = self._blocks(*p.tbuf, *p.gbuf)
        key = ("shared", blocks, slots)
        pair = self._sides.get(key)
        if pair is None:
            sc = SharedContext(self.model, self.n_ctx, self._all_threads, slots, blocks)
            pair = self._sides[key] = (Side(self.model, self.n_ctx, self._all_threads, slots=slots, shared=sc),
                                       Side(self.model, self.n_ctx, self._all_threads, slots=slots, shared=sc,
                                            base=slots))
        return pair

    def _guide_model(self, path: Path) -> Model:
        gm = self._guide_models.get(str(path))
        if gm is None:
            gm = Model(path, n_gpu_layers=self.model.n_gpu_layers)  # offloaded as the target is
            check_same_vocab(self.model, gm)
            self._guide_models[str(path)] = gm
        return gm

    def check(self, variant: str, steering: Steering | None, guidance: GuidanceSpec) -> GuidanceSource:
        """What :meth:`plan` refuses, without building anything: a vector the variant or the guidance source needs
        and does not have, or one this architecture's graph would ignore. Returns the source."""
        if variant in SA_VARIANTS and steering is None:
            raise UsageError(f"variant {variant!r} needs a safety vector (--vector)")
        src = guidance.source
        if variant in GUIDED_VARIANTS and src.guide_vector and steering is None:
            raise UsageError(f"--guidance {src.kind} needs a safety vector (--vector)")
        check_plan_steerable(self.model, steering, variant, src, self.n_threads)
        return src

    def plan(self, variant: str, steering: Steering | None, guidance: GuidanceSpec) -> Plan:
        """The sides and vectors of ``variant`` under ``guidance`` (its :class:`~.guidance.GuidanceSource` says
        what each side sees)."""
        n_layer = self.model.n_layer
        src = self.check(variant, steering, guidance)
        sa = steering if variant in SA_VARIANTS else None
        guide = src.guide() if variant in GUIDED_VARIANTS else None
        if guide is None:
            return Plan(PLAIN, position_buffers(sa, n_layer))
        gbuf = position_buffers(steering, n_layer, sign=src.guide_vector) if src.guide_vector else NO_VECTOR
        return Plan(src.target(), position_buffers(sa, n_layer), guide, gbuf, src)

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
              slots: int = 1, speculate: int = 0, layout: str = "auto", prefill_chunk: int = 0) -> BatchGenerator:
        """A batch generator with ``slots`` request slots for one variant and its settings; ``speculate``: tokens
        the target drafts per round before the guidance verifies them (guided variants only).

        ``layout`` of a guided variant's two sides: ``split``, a context each, decoding at the same time on half
        the threads; ``shared``, one context for both, one decode per step on every thread, the vector added per
        row (:class:`~.sides.SharedContext`: only where both sides run the same weights with no prefix and no
        LoRA, i.e. ``negative`` guidance); ``auto``: ``shared`` where it applies with 2 or more slots and no
        speculation, else ``split`` (measured on a 2-core CPU: benchmarks/batch_layout.py, docs/RESULTS.md).
        ``prefill_chunk``: see :attr:`BatchGenerator.prefill_chunk`."""
        check_parallel(slots)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        p = self.plan(variant, steering, guidance)
        can_share = p.same_weights and not speculate
        if layout == "shared" and not can_share:
            raise UsageError("the shared layout needs guidance on the same weights without a prefix (--guidance "
                             "negative) and no --speculate")
        if layout == "shared" or (layout == "auto" and can_share and slots >= 2):
            target, guide = self._shared_sides(p, slots)
        else:
            pieces = prefill_chunk > 0
            target = self._split_side(p.target, p.tbuf, slots, pieces)
            guide = self._split_side(p.guide, p.gbuf, slots, pieces) if p.guide else None
        combine = p.source.combine(lam) if p.source is not None else None
        return BatchGenerator(self.model, target, p.tbuf, guide, p.gbuf, combine, self._both, variant,
                              head_threads=self._all_threads if guide is not None else None,
                              speculate=speculate if guide is not None else 0, prefill_chunk=prefill_chunk)

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
        target = self.side(p.target)
        guide = self.side(p.guide) if p.guide else None
        return self._both(lambda: self._rows(target, p.tbuf, prompt_tokens, cont_tokens),
                          (lambda: self._rows(guide, p.gbuf, prompt_tokens, cont_tokens)) if guide else None)

    def score(self, prompt_tokens: list[int], cont_tokens: list[int], variant: str, steering: Steering | None,
              guidance: GuidanceSpec, lam: float) -> np.ndarray:
        """Per-token log-probabilities of ``cont_tokens`` after the prompt, teacher-forced, under the variant's
        own next-token distribution at T = 1 (guided variants: softmax of the guided scores)."""
        rows_t, rows_u = self.score_rows(prompt_tokens, cont_tokens, variant, steering, guidance)
        if rows_u is None:
            return token_logprobs(rows_t, cont_tokens)
        return token_logprobs(guidance.source.combine(lam)(rows_t, log_softmax(rows_u)), cont_tokens)

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
