"""``safeinfer vectors gate``: fit a harm gate for a vector's model and record it in the vector's metadata.

Dev prompts (default): nine shipped sources (:func:`dev_sources`): harmful AdvBench ``dev`` (requests in the
imperative), CatQA ``dev`` (questions), XSTest ``unsafe`` at odd positions, the project's 250 written harmful
requests (many forms and five languages) and PyRIT's harmful objectives; benign XSTest ``safe`` at odd positions,
the project's 30 benign demos, its 544 ordinary requests and its 246 contrast prompts (harm-adjacent words, benign
intent); all disjoint from every evaluation set. Or files of your own, each one source. Every prompt is framed each
way the commands frame prompts (template, none, qa) and the gate is calibrated per frame; each is read as it is and
wrapped in one generic instruction (:data:`safeinfer_local.core.gate.WRAPPERS`, in turn), the same on both sides.

The feature is the mean over the prompt's last ``tail`` tokens, the final one included, of one block's output.
``block``/``method``/``tail`` ``auto`` choose by leave-one-source-out: each fold holds a harmful and a benign source
out (and one copy of the prompts), fits on the rest, and scores the two; the objective is the TPR at ``fpr`` of the
worst held-out harmful source, in the worst frame (a gate must hold on a source it never saw, not on average). The
gate is then fitted on every source, and its threshold is the (1 − fpr) quantile of the benign sources' held-out
scores, so that about ``fpr`` of prompts from a *new* benign source are flagged. With ``--max-parts`` N > 1 and
``lda``, the best read is then averaged with others of the same decode, a read at a time, while the average ranks
higher by that objective (ties: the mean held-out AUROC); the gate keeps one direction per read and thresholds the
mean of their scaled scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..api import SafeInfer
from ..core.datasets import advbench, catqa, gate_written, pyrit_harmful, xstest
from ..core.frames import FRAMES, check_frame
from ..core.gate import (
    METHODS,
    TAILS,
    WRAPPERS,
    Gate,
    Read,
    Source,
    check_fpr,
    check_tail,
    cv_scores,
    fit_frame,
    fit_sources,
    loso_scores,
)
from ..decode.guidance import benign_demos
from ..errors import UsageError
from .inputs import read_items


def read_dev_file(path: str, flag: str) -> list[str]:
    """The prompts of a ``--harmful``/``--benign`` file (any ``filter`` input format): at least :data:`MIN_DEV`,
    none of them an evaluation prompt."""
    items = [it.prompt for it in read_items(path) if it.prompt]
    if len(items) < MIN_DEV:
        raise UsageError(f"--{flag} {path}: a gate needs at least {MIN_DEV} prompts, found {len(items)}")
    evals = evaluation_prompts()
    clash = next((q for q in items if _norm(q) in evals), None)
    if clash is not None:
        raise UsageError(f"--{flag} {path}: {clash[:60]!r} is an evaluation prompt (bench harm's datasets, "
                         "benchmarks/data); keep dev and evaluation prompts apart")
    return items


def dev_sources() -> dict[str, tuple[bool, list[str]]]:
    """The gate's shipped dev prompts by source, each ``(harmful, prompts)``: every one disjoint from every
    evaluation set (AdvBench's dev part, CatQA's dev part, XSTest's odd positions; ``bench harm`` uses the others)
    and from each other. Leave-one-source-out holds each out in turn."""
    return {
        "advbench-dev": (True, [p.text for p in advbench("dev")]),
        "catqa-dev": (True, [p.text for p in catqa(part="dev")]),
        "xstest-unsafe-dev": (True, [p.text for p in xstest("unsafe")[1::2]]),
        "written-harmful": (True, [p.text for p in gate_written("harmful")]),
        "pyrit": (True, [p.text for p in pyrit_harmful()]),
        "xstest-safe-dev": (False, [p.text for p in xstest("safe")[1::2]]),
        "benign-demos": (False, [d.prompt for d in benign_demos(1000)]),
        "written-benign": (False, [p.text for p in gate_written("benign")]),
        "written-contrast": (False, [p.text for p in gate_written("contrast")]),
    }


MIN_DEV = 20
"""The fewest prompts a --harmful or --benign file may hold (a direction and a threshold from fewer say little)."""


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def evaluation_prompts() -> set[str]:
    """Every prompt ``bench harm``'s datasets evaluate on, and the held-out prompts of ``benchmarks/data`` when the
    repository is there, normalised (case, spacing): no dev prompt may be one of them."""
    from ..core.harm import DATASETS, load_dataset

    out = {_norm(p.text) for name in DATASETS for p in load_dataset(name)}
    held = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "gate_heldout.jsonl"
    if held.is_file():
        out |= {_norm(json.loads(x)["prompt"]) for x in held.read_text(encoding="utf-8").splitlines() if x.strip()}
    return out


def _hash(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8", "replace")).hexdigest()[:16]


def check_tail_option(tail: str) -> tuple[int, ...]:
    """``--tail``: auto (choose among :data:`TAILS` by cross-validation) or a whole number >= 0."""
    if tail == "auto":
        return TAILS
    try:
        return (check_tail(int(tail)),)
    except ValueError:
        raise UsageError(f"--tail must be auto or a whole number >= 0 (0: every prompt token), not {tail!r}") from None


def auto_blocks(n_layer: int) -> tuple[int, ...]:
    """The blocks ``--block auto`` chooses from: every other block from a quarter of the way down to two from the
    top (the middle blocks, where harm is most linearly readable; 4, 6, ..., 14 of Gemma 3 270M's 18)."""
    return tuple(range(max(1, n_layer // 4), max(2, n_layer - 2), 2)) or (max(0, n_layer // 2),)


def gate_sources(harmful: tuple[str, ...] = (), benign: tuple[str, ...] = ()) -> dict[str, tuple[bool, list[str]]]:
    """The sources a gate is fitted on, each ``(harmful, prompts)``: the shipped :func:`dev_sources`, or for a side
    given files, each file as one source (any ``filter`` input format)."""
    out: dict[str, tuple[bool, list[str]]] = {}
    shipped = dev_sources() if not (harmful and benign) else {}  # loaded once, for the sides given no files
    for flag, files, is_harmful in (("harmful", harmful, True), ("benign", benign, False)):
        if not files:
            out.update({k: v for k, v in shipped.items() if v[0] is is_harmful})
        for path in files:
            if path in out:
                raise UsageError(f"--{flag} {path} is given twice")
            out[path] = (is_harmful, read_dev_file(path, flag))
    return out


def check_per_source(n: int | None) -> int | None:
    """``--max-per-source``: None (every prompt) or at least :data:`MIN_DEV`."""
    if n is not None and n < MIN_DEV:
        raise UsageError(f"--max-per-source must be at least {MIN_DEV}, not {n}")
    return n


def _spread(prompts: list[str], n: int | None) -> list[str]:
    """At most ``n`` of ``prompts``, evenly spaced (all of them when ``n`` is None or not fewer)."""
    if n is None or len(prompts) <= n:
        return prompts
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, n).round().astype(int)]


def wrapped_copies(prompts: list[str], wrappers: tuple[str, ...]) -> list[str]:
    """Each prompt twice, copy-major: as it is, then wrapped in one of ``wrappers`` in turn (prompt i in wrapper
    i mod len(wrappers)), the same on both sides, so that an instruction around a request does not read as harm."""
    return list(prompts) + [wrappers[i % len(wrappers)].replace("{q}", q) for i, q in enumerate(prompts)]


def check_max_parts(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UsageError(f"--max-parts must be 1 or more, not {n}")
    return n


def build_gate(si: SafeInfer, block: str = "auto", method: str = "auto", fpr: float = 0.05,
               harmful: tuple[str, ...] = (), benign: tuple[str, ...] = (), frames: tuple[str, ...] = FRAMES,
               progress: Callable[[str, int, int], None] | None = None, tail: str = "auto",
               wrappers: tuple[str, ...] = WRAPPERS[1:], per_source: int | None = None,
               max_parts: int = 1) -> tuple[Gate, list[dict]]:
    """The gate and the cross-validation table it was chosen from (one row per block × tail × method, and per
    average of reads tried).

    Features read the whole prompt, its final token included (mean over the last ``tail`` tokens of one block's
    output). With two or more sources on each side (the shipped ones, or several files) the choice and the
    threshold come from leave-one-source-out (:func:`~safeinfer_local.core.gate.loso_scores`): the objective is the
    held-out TPR at ``fpr`` of the worst harmful source, in the worst frame (ties: the mean held-out AUROC), and
    the gate fitted on every source flags scores at or above the benign sources' held-out (1 − ``fpr``) quantile.
    With leave-one-source-out, ``lda`` and ``max_parts`` > 1, reads are then averaged (up to ``max_parts``, see
    :mod:`~safeinfer_local.core.gate`) as long as the average ranks higher.
    With one source on a side it falls back to k-fold CV within the sources. Each fold also holds one copy of
    the prompts out (as they are, or wrapped: :func:`wrapped_copies`). ``per_source``: read at most that many
    prompts of each source, evenly spaced (for a large model, where the reads are most of the cost)."""
    check_fpr(fpr)
    for f in frames:
        check_frame(f)
    if method not in (*METHODS, "auto"):
        raise UsageError(f"--method must be auto, {' or '.join(METHODS)}, not {method!r}")
    tails = check_tail_option(tail)
    n_layer = si.model.n_layer
    if block == "auto":
        blocks = auto_blocks(n_layer)
    else:
        try:
            blocks = (int(block),)
        except ValueError:
            raise UsageError(f"--block must be a number or auto, not {block!r}") from None
        if not 0 <= blocks[0] < n_layer - 1:
            raise UsageError(f"--block must be in 0..{n_layer - 2} for {si.model.name}, not {blocks[0]}")
    methods = METHODS if method == "auto" else (method,)
    check_per_source(per_source)
    check_max_parts(max_parts)
    sources = {n: (h, _spread(p, per_source)) for n, (h, p) in gate_sources(tuple(harmful), tuple(benign)).items()}
    wrappers = tuple(wrappers) or ("{q}",)
    loso = sum(v[0] for v in sources.values()) >= 2 and sum(not v[0] for v in sources.values()) >= 2
    if max_parts > 1 and (not loso or "lda" not in methods):
        raise UsageError("--max-parts above 1 averages lda reads under leave-one-source-out: it needs --method lda "
                         "or auto and at least two sources on each side")
    from ..decode.gating import FeatureReader  # the engine, only once the arguments are checked

    reader = FeatureReader(si.model, blocks, si.n_ctx, si.n_threads)
    reads = {(blk, t): Read((blk,), t, True) for blk in blocks for t in tails}
    feats: dict[str, dict[str, dict]] = {f: {} for f in frames}  # frame -> source -> read key -> (2n, d)
    done = 0
    for f in frames:
        for name, (_, prompts) in sources.items():
            grid = reader.features_grid([si.encode_prompt(q, frame=f)[0] for q in wrapped_copies(prompts, wrappers)],
                                        tuple(reads.values()))
            feats[f][name] = {key: grid[r] for key, r in reads.items()}
            done += 1
            if progress:
                progress("gate features", done, len(frames) * len(sources))

    def srcs(f: str, parts: tuple) -> list[Source]:
        return [Source(n, sources[n][0], np.hstack([feats[f][n][key] for key in parts])) for n in sources]

    def side(f: str, key: tuple[int, int], harm: bool) -> np.ndarray:
        return np.concatenate([feats[f][n][key] for n in sources if sources[n][0] is harm])

    def rank(c: tuple) -> tuple[float, float]:
        return c[2]["objective"], c[2]["mean_auroc"]

    def candidate(parts: tuple, m: str) -> tuple[tuple, str, dict]:
        """(parts, method, row): a read (or reads averaged) and method, cross-validated."""
        row = ({"block": parts[0][0], "tail": parts[0][1]} if len(parts) == 1 else
               {"block": "+".join(str(k[0]) for k in parts), "tail": "+".join(str(k[1]) for k in parts)})
        row["method"] = m
        if loso:
            per = {f: loso_scores(srcs(f, parts), m, fpr, groups=2, parts=len(parts)) for f in frames}
            folds[parts, m] = per
            row |= {"objective": round(min(p["worst_tpr"] for p in per.values()), 4),
                    "mean_auroc": round(float(np.mean([s["auroc"] for p in per.values() for s in p["sources"]])), 4),
                    **{f"{f}_{k}": round(p[k], 4) for f, p in per.items()
                       for k in ("worst_tpr", "worst_auroc", "worst_fpr")}}
        else:
            cv = {f: cv_scores(side(f, parts[0], True), side(f, parts[0], False), m, fpr, groups=2) for f in frames}
            row |= {"objective": round(sum(c["worst"] for c in cv.values()), 4),
                    "mean_auroc": round(float(np.mean([c["auroc"] for c in cv.values()])), 4),
                    **{f"{f}_{k}": round(v, 4) for f, c in cv.items() for k, v in c.items()
                       if k not in ("objective", "worst")}}
        return parts, m, row

    folds: dict = {}
    cands = [candidate((key,), m) for key in reads for m in methods]
    if loso and max_parts > 1 and "lda" in methods:
        # average reads while that ranks higher: add, to the best lda read, the read that ranks the average
        # highest, and so on (the parts' scores on one scale, one threshold on their mean)
        cur = max((c for c in cands if c[1] == "lda"), key=rank)
        while len(cur[0]) < max_parts:
            if progress:
                progress("averaging reads", len(cur[0]), max_parts)
            trials = [candidate(cur[0] + (key,), "lda") for key in reads if key not in cur[0]]
            cands += trials
            top = max(trials, key=rank, default=None)
            if top is None or rank(top) <= rank(cur):
                break
            cur = top
        if progress:
            progress("averaging reads", max_parts, max_parts)
    parts, m, best = max(cands, key=rank)
    rows = [c[2] for c in cands]
    if loso:
        fitted = {f: fit_sources(srcs(f, parts), m, fpr, groups=2, loso=folds[parts, m][f], parts=len(parts))
                  for f in frames}
    else:
        fitted = {f: fit_frame(side(f, parts[0], True), side(f, parts[0], False), m, fpr, groups=2, cross_fit=True)
                  for f in frames}
    read = Read(tuple(k[0] for k in parts), parts[0][1], True, "mean", tuple(k[1] for k in parts)
                if len(parts) > 1 else ())
    gate = Gate(read.blocks[0], m, fitted, {
        "sources": {n: {"harmful": h, "n": len(p), "sha256": _hash(p)} for n, (h, p) in sources.items()},
        "wrappers": {"n": len(wrappers), "sha256": _hash(list(wrappers)), "copies": "each prompt as it is and in "
                     "one wrapper, in turn"},
        "fpr_target": fpr,
        "chosen_by": ("leave-one-source-out (a harmful and a benign source held out per fold, and one copy): "
                      "the worst held-out harmful source's TPR at the FPR target, in the worst frame"
                      if loso else "k-fold CV within the sources (one source on a side), one copy held out per "
                      "fold: held-out TPR - FPR of the worst fold, summed over frames") if len(rows) > 1 else "given",
        "threshold": ("(1 - fpr) quantile of the benign sources' leave-one-source-out scores" if loso else
                      "(1 - fpr) quantile of 5-fold out-of-fold benign dev scores, the higher over the copies"),
        "cv": dict(best), **({"parts": f"{len(parts)} reads averaged ({read.describe()})"} if len(parts) > 1 else {})},
        read.tail, read.blocks, read.final, read.pool, read.tails)
    return gate, rows

