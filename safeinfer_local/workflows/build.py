"""Building safety vectors from the model's own activations on safe demonstrations.

``fv`` — the paper's function vector (Todd et al., ICLR 2024, as used by SafeInfer): the mean attention output
before W_O (``kqv_out``) at the last token of in-context prompts (10 safe demonstrations + 1 held-out query),
for the top-K heads ranked by average indirect effect (AIE) *on this model*, each projected through its slice
of W_O and summed.

``mean-diff`` — per layer, the mean residual (``l_out``) at the last token with safe demonstrations in context
minus without (the query alone): in-context vectors / ``cvec-generator --method mean`` / repeng's pca_diff.

AIE, as here: the corrupted prompt is the query alone (``Q: <query>\\nA:``, no demonstrations — the setting the
vector is used in); the clean run's mean head output is patched into it at the last token, one head at a time,
and the gain in log-probability of that query's own written refusal is averaged over prompts. Each corrupted
prompt's prefix is decoded once and kept in the KV cache; only the last token and the continuation are
re-decoded per head. The scan measures every head on every prompt, or under ``--max-heads N`` (default
:data:`~safeinfer_local.core.fv.DEFAULT_MAX_HEADS`) screens every head on one prompt and measures the N best on
the rest (:mod:`safeinfer_local.core.fv`): per head one pass instead of one per prompt, for all but N heads.

Before the first pass a build states its plan (forward passes and prompt tokens per stage), and after the first
few passes of each stage an estimate of the time left; every stage reports progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.demos import N_PROMPTS, N_SHOTS, Demo, demos_hash, icl_prompts, qa_prompt
from ..core.fv import DEFAULT_MAX_HEADS, heads_to_scan, project_heads, scan_passes, screen_prompts, top_heads
from ..core.sampling import token_logprobs
from ..core.settings import check_gamma, check_positions
from ..core.vectors import SafetyVector
from ..decode.steering import check_steerable
from ..errors import UsageError
from ..llama.engine import ActivationHook, Model

METHODS = ("fv", "mean-diff")
DEFAULT_HEADS = 10
"""Top-K heads summed into a function vector (the paper: 10)."""
DEFAULT_AIE_PROMPTS = 16
"""Corrupted prompts per head in the AIE ranking (more is slower and steadier)."""

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``."""


def default_layer(model: Model) -> int:
    """Block ≈ n_layer / 3 (the paper injects at block 8 of Llama-2-7B's 32, 0-based)."""
    return max(1, round(model.n_layer / 3))


def parse_layers(spec: str | None, model: Model, method: str) -> tuple[int, ...]:
    """``None`` -> the default layer; ``all`` -> every steerable block (mean-diff only); ``6`` or ``4,6,8``."""
    if spec is None:
        return (default_layer(model),)
    if spec == "all":
        if method == "fv":
            raise UsageError("--layer all is for mean-diff; a function vector is injected at one layer")
        return tuple(range(1, model.n_layer))
    try:
        layers = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--layer must be a block number, a comma list or 'all', not {spec!r}") from None
    for i in layers:
        if not 1 <= i <= model.n_layer - 1:
            raise UsageError(f"layer {i} is out of range: {model.name} has blocks 1..{model.n_layer - 1} "
                             "that can be steered (block 0 cannot)")
    return layers


@dataclass
class _Capture:
    kqv: np.ndarray  # (n_layer, n_head * head_dim), mean over ICL prompts
    with_demos: np.ndarray  # (n_layer, n_embd)
    without: np.ndarray  # (n_layer, n_embd)


@dataclass(frozen=True)
class Stage:
    """One phase of a build: its forward passes and the tokens they decode."""
    name: str
    passes: int
    tokens: int


@dataclass(frozen=True)
class BuildPlan:
    """What a build will decode, known before it starts (``vectors build`` prints it)."""
    method: str
    stages: tuple[Stage, ...]
    n_layer: int
    n_head: int
    scan_heads: int = 0  # fv: heads measured on every AIE prompt
    aie_prompts: int = 0  # fv: corrupted prompts
    screen_prompts: int = 0  # fv: prompts every head is screened on first (0: no screen, every head measured)

    @property
    def passes(self) -> int:
        return sum(s.passes for s in self.stages)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def describe(self) -> str:
        parts = "; ".join(f"{s.name} {s.passes:,} passes / {s.tokens:,} tokens" for s in self.stages)
        text = f"{self.method} build: {self.passes:,} forward passes, {self.tokens:,} prompt tokens ({parts})"
        if self.method == "fv":
            total = self.n_layer * self.n_head
            heads = f"{self.n_layer} layers x {self.n_head} heads = {total}"
            if self.screen_prompts:
                rest = self.aie_prompts - self.screen_prompts
                text += (f"; head scan: all {heads} screened on {self.screen_prompts} prompt(s), then the top "
                         f"{self.scan_heads} (--max-heads) on the other {rest}: {total * self.screen_prompts:,} + "
                         f"{self.scan_heads * rest:,} patched passes (every head on every prompt: "
                         f"{total * self.aie_prompts:,})")
            else:
                text += (f"; head scan: {heads} x {self.aie_prompts} prompts = {total * self.aie_prompts:,} "
                         "patched passes")
        return text


class _Meter:
    """Progress per stage (passes done of planned), and once the first few passes of a stage have run, one
    estimate of the time the whole build has left: the tokens still to decode at the rate measured so far (each
    stage at its own rate once measured; stages to come at the latest one)."""

    FIRST = 5

    def __init__(self, plan: BuildPlan, progress: Progress | None, note: Callable[[str], None] | None) -> None:
        self.plan = plan
        self.progress = progress
        self.note = note
        self.stages = {s.name: s for s in plan.stages}
        self.start: dict[str, float] = {}
        self.done: dict[str, tuple[int, int]] = {}  # stage -> (passes, tokens)
        self.rate: dict[str, float] = {}  # stage -> tokens/s

    def begin(self, stage: str) -> None:
        self.start[stage] = time.perf_counter()
        self.done[stage] = (0, 0)

    def step(self, stage: str, tokens: int) -> None:
        n, t = self.done[stage]
        n, t = n + 1, t + tokens
        self.done[stage] = (n, t)
        planned = self.stages[stage].passes
        if self.progress:
            self.progress(stage, n, planned)
        if stage not in self.rate and n == min(self.FIRST, planned):
            self.rate[stage] = t / max(1e-9, time.perf_counter() - self.start[stage])
            if self.note:
                left = self.left()
                self.note(f"time: about {f'{left / 60:.1f} min' if left >= 60 else f'{left:.0f} s'} left in all at "
                          "the rate of the passes so far "
                          f"({stage}: {self.rate[stage]:,.0f} tokens/s; each stage's bar re-estimates)")

    def left(self) -> float:
        latest = next(reversed(self.rate.values()))
        s = 0.0
        for st in self.plan.stages:
            done_tokens = self.done.get(st.name, (0, 0))[1]
            s += max(0, st.tokens - done_tokens) / self.rate.get(st.name, latest)
        return s


def _check_fits(n_tokens: int, n_ctx: int) -> None:
    if n_tokens >= n_ctx:
        raise UsageError(f"an in-context prompt is {n_tokens} tokens, over the context of {n_ctx}; "
                         "use shorter demonstrations or fewer shots")


def _capture_means(model: Model, icl: list[list[int]], queries: list[list[int]], want_kqv: bool, want_resid: bool,
                   meter: _Meter, n_ctx: int, n_threads: int | None = None) -> _Capture:
    """Mean ``kqv_out`` and/or ``l_out`` of every block at the last token of each in-context prompt (``icl``), and
    (``want_resid``) the mean ``l_out`` on the queries alone (``queries``); all token lists, BOS included."""
    names = set()
    if want_kqv:
        names |= {f"kqv_out-{i}" for i in range(model.n_layer)}
    if want_resid:
        names |= {f"l_out-{i}" for i in range(model.n_layer)}
    hook = ActivationHook(names)
    ctx = model.context(n_ctx=n_ctx, capture=hook, n_threads=n_threads)
    L = model.n_layer
    kqv_sum = np.zeros((L, model.n_head * model.head_dim()), np.float64)
    with_sum = np.zeros((L, model.n_embd), np.float64)
    without_sum = np.zeros((L, model.n_embd), np.float64)
    meter.begin("capture")
    for toks in icl:
        _check_fits(len(toks), ctx.n_ctx)
        ctx.clear()
        ctx.decode(toks)
        for i in range(L):
            if want_kqv:
                kqv_sum[i] += hook.captured[f"kqv_out-{i}"][-1]
            if want_resid:
                with_sum[i] += hook.captured[f"l_out-{i}"][-1]
        meter.step("capture", len(toks))
    if want_resid:
        for toks in queries:
            ctx.clear()
            ctx.decode(toks)
            for i in range(L):
                without_sum[i] += hook.captured[f"l_out-{i}"][-1]
            meter.step("capture", len(toks))
    return _Capture(kqv_sum / len(icl), with_sum / len(icl), without_sum / max(1, len(queries)))


@dataclass
class _Corrupted:
    prompt: list[int]  # the query alone, BOS included
    refusal: list[int]  # its written refusal, no BOS

    @property
    def tail(self) -> list[int]:
        """What each patched run decodes after the kept prefix: the last prompt token and the refusal but its
        last token (whose logits are not needed)."""
        return self.prompt[-1:] + self.refusal[:-1]


def _corrupted_prompts(model: Model, demos: list[Demo], n_prompts: int) -> list[_Corrupted]:
    return [_Corrupted(model.tokenize(qa_prompt(d.prompt), add_bos=True),
                       model.tokenize(" " + d.response, add_bos=False)) for d in demos[:n_prompts]]


class OutputWeights:
    """Each block's attention output projection W_O, (n_embd, n_head * head_dim), dequantized from the model GGUF
    when asked for (one block at a time: an 8B model's W_O are 2 GB in float32). The GGUF is opened once: parsing
    its vocabulary takes ~12 s for Gemma's 262k tokens."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._tensors: dict | None = None

    def __call__(self, layer: int) -> np.ndarray:
        import gguf

        if self._tensors is None:
            reader = gguf.GGUFReader(str(self.model.path))
            self._tensors = {}
            for t in reader.tensors:
                m = t.name.split(".")
                if len(m) == 4 and m[0] == "blk" and m[2] == "attn_output":
                    self._tensors[int(m[1])] = t
        t = self._tensors.get(layer)
        if t is None:
            raise UsageError(f"{self.model.path} has no attention output weights for block {layer} (needed by fv)")
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(w, dtype=np.float32).reshape(self.model.n_embd, -1)


def head_aie(model: Model, mean_kqv: np.ndarray, corrupted: list[_Corrupted], max_heads: int, meter: _Meter,
             n_ctx: int = 2048, n_threads: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Average indirect effect per head, shape (n_layer, n_head), NaN for heads not measured on every prompt: the
    mean gain in log-probability of the query's own refusal when that head's clean mean output replaces its output
    at the last prompt token of the zero-shot (corrupted) prompt. Measures every head, or under a budget screens
    every head on the first :data:`~safeinfer_local.core.fv.SCREEN_PROMPTS` prompt(s) and measures the
    ``max_heads`` best on the rest (:mod:`safeinfer_local.core.fv`). Returns the AIE and the heads measured."""
    L, H, hd = model.n_layer, model.n_head, model.head_dim()
    target: dict[str, tuple[int, np.ndarray]] = {}

    def patch(name: str, rows: np.ndarray) -> np.ndarray | None:
        if name not in target:
            return None
        h, value = target[name]
        rows = rows.copy()
        rows[0, h * hd:(h + 1) * hd] = value  # row 0 = the last prompt token in this batch
        return rows

    hook = ActivationHook((), patch=patch)
    ctx = model.context(n_ctx=n_ctx, capture=hook, n_threads=n_threads)
    gain = np.zeros((L, H))  # summed over the prompts each head was patched into

    def scan(stage: str, prompts: list[_Corrupted], heads: list[tuple[int, int]]) -> None:
        meter.begin(stage)
        for c in prompts:
            # the prefix and the baseline unpatched (a patch left set by the previous prompt's last head would
            # land on row 0 of the prefix)
            hook.names = set()
            target.clear()
            ctx.clear()
            ctx.decode(c.prompt[:-1], logits="none")
            base_pos = ctx.pos[0]

            def run(c: _Corrupted = c, base_pos: int = base_pos) -> float:
                logits = ctx.decode(c.tail, logits="all")
                ctx.truncate(0, base_pos)
                return float(token_logprobs(logits, c.refusal).sum())

            base = run()
            meter.step(stage, base_pos + len(c.tail))
            for i, h in heads:
                name = f"kqv_out-{i}"
                hook.names = {name}
                target.clear()
                target[name] = (h, mean_kqv[i, h * hd:(h + 1) * hd].astype(np.float32))
                gain[i, h] += run() - base
                meter.step(stage, len(c.tail))
        hook.names = set()
        target.clear()

    every = [(i, h) for i in range(L) for h in range(H)]
    n_screen = screen_prompts(L, H, max_heads, len(corrupted))
    if n_screen:
        scan("screen", corrupted[:n_screen], every)
        measured = heads_to_scan(gain / n_screen, L, H, max_heads)
    else:
        measured = every
    scan("heads", corrupted[n_screen:], measured)
    aie = np.full((L, H), np.nan)
    for i, h in measured:
        aie[i, h] = gain[i, h] / len(corrupted)
    return aie, measured


def plan_build(model: Model, method: str, icl: list[list[int]], queries: list[list[int]],
               corrupted: list[_Corrupted], max_heads: int) -> BuildPlan:
    """Forward passes and prompt tokens per stage, from the tokenized prompts."""
    if method == "mean-diff":
        return BuildPlan(method, (Stage("capture", len(icl) + len(queries),
                                        sum(map(len, icl)) + sum(map(len, queries))),), model.n_layer, model.n_head)
    L, H = model.n_layer, model.n_head
    n_heads = min(max_heads, L * H)
    n_screen = screen_prompts(L, H, max_heads, len(corrupted))
    screen_passes, heads_passes = scan_passes(L, H, max_heads, len(corrupted))

    def tokens(prompts: list[_Corrupted], n: int) -> int:  # prefix + baseline + n patched runs per prompt
        return sum(len(c.prompt) - 1 + (n + 1) * len(c.tail) for c in prompts)

    stages = [Stage("capture", len(icl), sum(map(len, icl)))]
    if n_screen:
        stages.append(Stage("screen", screen_passes, tokens(corrupted[:n_screen], L * H)))
    stages.append(Stage("heads", heads_passes, tokens(corrupted[n_screen:], n_heads)))
    return BuildPlan(method, tuple(stages), L, H, n_heads, len(corrupted), n_screen)


def check_max_heads(max_heads: int, heads: int) -> None:
    """``--max-heads`` (the AIE scan's budget) must be a positive count that leaves ``--heads`` to choose from."""
    if max_heads < 1:
        raise UsageError(f"--max-heads must be >= 1, not {max_heads}")
    if heads > max_heads:
        raise UsageError(f"--heads {heads} is more than the {max_heads} heads --max-heads lets the scan rank")


def build_vector(model: Model, demos: list[Demo], method: str = "mean-diff", layers: tuple[int, ...] | None = None,
                 heads: int = DEFAULT_HEADS, n_prompts: int = N_PROMPTS, n_shots: int = N_SHOTS, seed: int = 0,
                 aie_prompts: int = DEFAULT_AIE_PROMPTS, max_heads: int = DEFAULT_MAX_HEADS,
                 progress: Progress | None = None, note: Callable[[str], None] | None = None,
                 n_ctx: int = 4096, n_threads: int | None = None) -> SafetyVector:
    """Build a safety vector from safe demonstrations (see the module docstring for both methods). ``note``
    gets the plan before the first pass (:meth:`BuildPlan.describe`) and a time estimate after the first few."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    layers = layers or (default_layer(model),)
    check_steerable(model, layers, "a safety vector built for it", n_threads)
    if method == "fv" and len(layers) != 1:
        raise UsageError("a function vector is injected at exactly one layer")
    n_total_heads = model.n_layer * model.n_head
    if method == "fv":
        if not 1 <= heads <= n_total_heads:
            raise UsageError(f"--heads must be in 1..{n_total_heads} for this model, not {heads}")
        check_max_heads(max_heads, heads)
    prompts = icl_prompts(demos, n_prompts=n_prompts, n_shots=n_shots, seed=seed)
    icl = [model.tokenize(qa_prompt(q, shots), add_bos=True) for q, shots in prompts]
    queries = ([model.tokenize(qa_prompt(q), add_bos=True) for q in sorted({q for q, _ in prompts})]
               if method == "mean-diff" else [])
    corrupted = _corrupted_prompts(model, demos, aie_prompts) if method == "fv" else []
    plan = plan_build(model, method, icl, queries, corrupted, max_heads)
    if note:
        note(plan.describe())
    meter = _Meter(plan, progress, note)
    cap = _capture_means(model, icl, queries, want_kqv=method == "fv", want_resid=method == "mean-diff",
                         meter=meter, n_ctx=n_ctx, n_threads=n_threads)
    meta: dict = {"n_prompts": n_prompts, "n_shots": min(n_shots, len(demos) - 1), "seed": seed,
                  "n_demos": len(demos)}
    if method == "mean-diff":
        diff = cap.with_demos - cap.without
        directions = {i: diff[i] for i in layers}
    else:
        aie, scanned = head_aie(model, cap.kqv, corrupted, max_heads, meter, n_ctx=n_ctx, n_threads=n_threads)
        w_o = OutputWeights(model)
        top = top_heads(aie, heads)
        directions = {layers[0]: project_heads({li: w_o(li) for li in {li for li, _ in top}}, cap.kqv, top,
                                               model.head_dim())}
        meta["heads"] = [{"layer": li, "head": h, "aie": round(float(aie[li, h]), 5)} for li, h in top]
        meta["aie_prompts"] = len(corrupted)
        meta["max_heads"] = max_heads
        meta["heads_scanned"] = len(scanned)
        meta["screen_prompts"] = plan.screen_prompts  # 0: every head measured on every prompt
    return SafetyVector(directions=directions, model_hint=model.name, method=method, gamma=1.0,
                        layers=tuple(layers), positions="generation", source_model=model.path.name,
                        demos_sha256=demos_hash(demos), meta=meta)


def build_file(demos_path: str | Path, out: str | Path, model: str | Path | None = None, method: str = "mean-diff",
               layer: str | None = None, heads: int = DEFAULT_HEADS, n_prompts: int = N_PROMPTS,
               n_shots: int = N_SHOTS, aie_prompts: int = DEFAULT_AIE_PROMPTS, gamma: float = 1.0,
               positions: str = "generation", seed: int = 0, n_threads: int | None = None, n_gpu_layers: int = 0,
               command: str | None = None, progress: Progress | None = None, max_heads: int = DEFAULT_MAX_HEADS,
               note: Callable[[str], None] | None = None) -> SafetyVector:
    """``safeinfer vectors build``: load the model and the demonstrations, build, record the recommended γ and
    positions (and the command), and save the vector file."""
    from ..core.demos import load_demos
    from ..core.models import resolve_model

    if n_prompts < 1 or n_shots < 1 or aie_prompts < 1:
        raise UsageError("--prompts, --shots and --aie-prompts must be >= 1")
    if method == "fv":
        check_max_heads(max_heads, heads)
    check_gamma(gamma)
    check_positions(positions)
    demos = load_demos(demos_path)
    m = Model(resolve_model(model), n_gpu_layers=n_gpu_layers)
    v = build_vector(m, demos, method=method, layers=parse_layers(layer, m, method), heads=heads,
                     n_prompts=n_prompts, n_shots=n_shots, seed=seed, aie_prompts=aie_prompts, max_heads=max_heads,
                     progress=progress, note=note, n_threads=n_threads)
    v = v.recommend(gamma=gamma, positions=positions, **({"build_command": command} if command else {}))
    v.save(out)
    return v
