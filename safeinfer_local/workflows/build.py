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
re-decoded per head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.demos import N_PROMPTS, N_SHOTS, Demo, demos_hash, icl_prompts, qa_prompt
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


def _capture_means(model: Model, prompts: list[tuple[str, list[Demo]]], want_kqv: bool, want_resid: bool,
                   progress: Progress | None, n_ctx: int, n_threads: int | None = None) -> _Capture:
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
    queries = sorted({q for q, _ in prompts})
    total = len(prompts) + (len(queries) if want_resid else 0)
    for k, (q, shots) in enumerate(prompts):
        ctx.clear()
        toks = model.tokenize(qa_prompt(q, shots), add_bos=True)
        if len(toks) >= ctx.n_ctx:
            raise UsageError(f"an in-context prompt is {len(toks)} tokens, over the context of {ctx.n_ctx}; "
                             "use shorter demonstrations or fewer shots")
        ctx.decode(toks)
        for i in range(L):
            if want_kqv:
                kqv_sum[i] += hook.captured[f"kqv_out-{i}"][-1]
            if want_resid:
                with_sum[i] += hook.captured[f"l_out-{i}"][-1]
        if progress:
            progress("capture", k + 1, total)
    if want_resid:
        for k, q in enumerate(queries):
            ctx.clear()
            ctx.decode(model.tokenize(qa_prompt(q), add_bos=True))
            for i in range(L):
                without_sum[i] += hook.captured[f"l_out-{i}"][-1]
            if progress:
                progress("capture", len(prompts) + k + 1, total)
    n = len(prompts)
    return _Capture(kqv_sum / n, with_sum / n, without_sum / max(1, len(queries)))


def head_aie(model: Model, mean_kqv: np.ndarray, demos: list[Demo], n_prompts: int = DEFAULT_AIE_PROMPTS,
             progress: Progress | None = None, n_ctx: int = 2048, n_threads: int | None = None) -> np.ndarray:
    """Average indirect effect per head, shape (n_layer, n_head): the mean gain in log-probability of the
    query's own refusal when that head's clean mean output replaces its output at the last prompt token of
    the zero-shot (corrupted) prompt."""
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
    aie = np.zeros((L, H), np.float64)
    use = demos[:n_prompts]
    done, total = 0, len(use) * (L * H + 1)
    for d in use:
        p = model.tokenize(qa_prompt(d.prompt), add_bos=True)
        cont = model.tokenize(" " + d.response, add_bos=False)
        ctx.clear()
        ctx.decode(p[:-1], logits="none")
        base_pos = ctx.pos[0]
        tail = p[-1:] + cont[:-1]

        def run(tail: list[int] = tail, cont: list[int] = cont, base_pos: int = base_pos) -> float:
            logits = ctx.decode(tail, logits="all")
            ctx.truncate(0, base_pos)
            return float(token_logprobs(logits, cont).sum())

        hook.names = set()
        target.clear()
        base = run()
        done += 1
        for i in range(L):
            name = f"kqv_out-{i}"
            hook.names = {name}
            for h in range(H):
                target.clear()
                target[name] = (h, mean_kqv[i, h * hd:(h + 1) * hd].astype(np.float32))
                aie[i, h] += run() - base
                done += 1
            if progress:
                progress("heads", done, total)
    hook.names = set()
    return aie / len(use)


def output_projections(model: Model, layers: set[int]) -> dict[int, np.ndarray]:
    """W_O of the given blocks, dequantized from the model GGUF: each (n_embd, n_head * head_dim).
    (Opening the GGUF parses the whole vocabulary, ~12 s for Gemma's 262k tokens: do it once.)"""
    import gguf

    reader = gguf.GGUFReader(str(model.path))
    found = {}
    for t in reader.tensors:
        m = t.name.split(".")
        if len(m) == 4 and m[0] == "blk" and m[2] == "attn_output" and int(m[1]) in layers:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            found[int(m[1])] = np.asarray(w, dtype=np.float32).reshape(model.n_embd, -1)
    missing = sorted(layers - set(found))
    if missing:
        raise UsageError(f"{model.path} has no attention output weights for blocks {missing} (needed by fv)")
    return found


def build_vector(model: Model, demos: list[Demo], method: str = "mean-diff", layers: tuple[int, ...] | None = None,
                 heads: int = DEFAULT_HEADS, n_prompts: int = N_PROMPTS, n_shots: int = N_SHOTS, seed: int = 0,
                 aie_prompts: int = DEFAULT_AIE_PROMPTS, progress: Progress | None = None,
                 n_ctx: int = 4096, n_threads: int | None = None) -> SafetyVector:
    """Build a safety vector from safe demonstrations (see the module docstring for both methods)."""
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    layers = layers or (default_layer(model),)
    check_steerable(model, layers, "a safety vector built for it", n_threads)
    if method == "fv" and len(layers) != 1:
        raise UsageError("a function vector is injected at exactly one layer")
    n_total_heads = model.n_layer * model.n_head
    if method == "fv" and not 1 <= heads <= n_total_heads:
        raise UsageError(f"--heads must be in 1..{n_total_heads} for this model, not {heads}")
    prompts = icl_prompts(demos, n_prompts=n_prompts, n_shots=n_shots, seed=seed)
    cap = _capture_means(model, prompts, want_kqv=method == "fv", want_resid=method == "mean-diff",
                         progress=progress, n_ctx=n_ctx, n_threads=n_threads)
    meta: dict = {"n_prompts": n_prompts, "n_shots": min(n_shots, len(demos) - 1), "seed": seed,
                  "n_demos": len(demos)}
    if method == "mean-diff":
        diff = cap.with_demos - cap.without
        directions = {i: diff[i] for i in layers}
    else:
        aie = head_aie(model, cap.kqv, demos, n_prompts=aie_prompts, progress=progress, n_ctx=n_ctx,
                       n_threads=n_threads)
        order = np.argsort(-aie, axis=None)[:heads]
        top = [(int(k // model.n_head), int(k % model.n_head)) for k in order]
        hd = model.head_dim()
        sv = np.zeros(model.n_embd, np.float64)
        w_o = output_projections(model, {li for li, _ in top})
        for li, h in top:
            sl = slice(h * hd, (h + 1) * hd)
            sv += w_o[li][:, sl].astype(np.float64) @ cap.kqv[li, sl]
        directions = {layers[0]: sv}
        meta["heads"] = [{"layer": li, "head": h, "aie": round(float(aie[li, h]), 5)} for li, h in top]
        meta["aie_prompts"] = min(aie_prompts, len(demos))
    return SafetyVector(directions=directions, model_hint=model.name, method=method, gamma=1.0,
                        layers=tuple(layers), positions="generation", source_model=model.path.name,
                        demos_sha256=demos_hash(demos), meta=meta)


def build_file(demos_path: str | Path, out: str | Path, model: str | Path | None = None, method: str = "mean-diff",
               layer: str | None = None, heads: int = 10, n_prompts: int = N_PROMPTS, n_shots: int = N_SHOTS,
               aie_prompts: int = DEFAULT_AIE_PROMPTS, gamma: float = 1.0, positions: str = "generation",
               seed: int = 0, n_threads: int | None = None, n_gpu_layers: int = 0, command: str | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> SafetyVector:
    """``safeinfer vectors build``: load the model and the demonstrations, build, record the recommended γ and
    positions (and the command), and save the vector file."""
    from ..core.demos import load_demos
    from ..core.models import resolve_model

    if n_prompts < 1 or n_shots < 1 or aie_prompts < 1:
        raise UsageError("--prompts, --shots and --aie-prompts must be >= 1")
    check_gamma(gamma)
    check_positions(positions)
    demos = load_demos(demos_path)
    m = Model(resolve_model(model), n_gpu_layers=n_gpu_layers)
    v = build_vector(m, demos, method=method, layers=parse_layers(layer, m, method), heads=heads,
                     n_prompts=n_prompts, n_shots=n_shots, seed=seed, aie_prompts=aie_prompts, progress=progress,
                     n_threads=n_threads)
    v = v.recommend(gamma=gamma, positions=positions, **({"build_command": command} if command else {}))
    v.save(out)
    return v
