"""``safeinfer vectors gate``: fit a harm gate for a vector's model and record it in the vector's metadata.

Dev prompts (default): AdvBench ``dev`` (harmful requests in the imperative) and CatQA ``dev`` (harmful questions)
against XSTest ``safe`` at odd positions and the project's 30 benign requests (``data/benign_demos.jsonl``), all
disjoint from every evaluation set; or your own files. Every
prompt is framed each way the commands frame prompts
(template, none, qa) and the gate is calibrated per frame. Each prompt is also wrapped in a few generic
instructions (:data:`safeinfer_local.core.gate.WRAPPERS`, the same on both sides), so that an instruction around a
question does not read as harm. ``block``/``method``/``tail`` ``auto`` choose by cross-validation on the dev prompts
alone, each fold leaving one wrapper and one share of the prompts out: the held-out TPR − FPR of the fold that does
worst, summed over frames (a gate must hold under a wrapping it never saw, not on average). The chosen gate's
threshold is the highest over the wrappers of the (1 − fpr) quantile of out-of-fold benign dev scores, so that about
``fpr`` of *new* benign prompts are flagged in any wrapping, not of the ones the direction was fitted on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ..api import SafeInfer
from ..core.datasets import advbench, catqa, gate_written, pyrit_harmful, xstest
from ..core.frames import FRAMES, check_frame
from ..core.gate import METHODS, TAILS, WRAPPERS, Gate, Read, check_fpr, check_tail, cv_scores, fit_frame
from ..decode.guidance import benign_demos
from ..errors import UsageError
from .filter import read_items


def dev_prompts(harmful: str | None = None, benign: str | None = None) -> tuple[list[str], list[str]]:
    """The gate's dev prompts: files of your own (any ``filter`` input format), or the shipped dev split."""
    def read(path: str, what: str) -> list[str]:
        items = [it.prompt for it in read_items(path) if it.prompt]
        if len(items) < MIN_DEV:
            raise UsageError(f"--{what} {path}: a gate needs at least {MIN_DEV} prompts, found {len(items)}")
        evals = evaluation_prompts()
        clash = next((q for q in items if _norm(q) in evals), None)
        if clash is not None:
            raise UsageError(f"--{what} {path}: {clash[:60]!r} is an evaluation prompt (bench harm's datasets, "
                             "benchmarks/data); keep dev and evaluation prompts apart")
        return items

    # harmful: AdvBench's requests (imperative) and CatQA's dev questions, so that the gate does not learn "a
    # request in the imperative" as the mark of harm and miss harmful questions
    h = read(harmful, "harmful") if harmful else [p.text for p in advbench("dev")] + [
        p.text for p in catqa(part="dev")]
    # benign: XSTest's questions, and the project's benign requests in the imperative ("Write a short recipe
    # ..."), so that the gate does not learn "an instruction" as harmful from AdvBench's imperative requests
    b = read(benign, "benign") if benign else [p.text for p in xstest("safe")[1::2]] + [
        d.prompt for d in benign_demos(1000)]
    return h, b


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


def build_gate(si: SafeInfer, block: str = "auto", method: str = "auto", fpr: float = 0.05,
               harmful: str | None = None, benign: str | None = None, frames: tuple[str, ...] = FRAMES,
               progress: Callable[[str, int, int], None] | None = None, tail: str = "auto",
               wrappers: tuple[str, ...] = WRAPPERS) -> tuple[Gate, list[dict]]:
    """The gate and the cross-validation table it was chosen from (one row per block × method × tail).

    Every dev prompt is wrapped in each of ``wrappers`` (the same on both sides) before it is framed, and the
    cross-validation keeps a prompt's wrapped copies in one fold."""
    check_fpr(fpr)
    for f in frames:
        check_frame(f)
    if method not in (*METHODS, "auto"):
        raise UsageError(f"--method must be auto, {' or '.join(METHODS)}, not {method!r}")
    tails = check_tail_option(tail)
    n_layer = si.model.n_layer
    if block == "auto":
        blocks = tuple(range(1, n_layer - 1))
    else:
        try:
            blocks = (int(block),)
        except ValueError:
            raise UsageError(f"--block must be a number or auto, not {block!r}") from None
        if not 0 <= blocks[0] < n_layer - 1:
            raise UsageError(f"--block must be in 0..{n_layer - 2} for {si.model.name}, not {blocks[0]}")
    methods = METHODS if method == "auto" else (method,)
    h, b = dev_prompts(harmful, benign)
    wrappers = tuple(wrappers) or ("{q}",)
    from ..decode.gating import FeatureReader  # the engine, only once the arguments are checked

    reader = FeatureReader(si.model, blocks, si.n_ctx, si.n_threads)
    feats = {}

    def wrapped(prompts: list[str], frame: str) -> list[list[int]]:  # wrapper-major: copy w of prompt i at w*n + i
        return [si.encode_prompt(w.replace("{q}", q), frame=frame)[0] for w in wrappers for q in prompts]

    reads = {(blk, t): Read((blk,), t) for blk in blocks for t in tails}
    for k, f in enumerate(frames):
        hg, bg = (reader.features_grid(wrapped(x, f), tuple(reads.values())) for x in (h, b))
        feats[f] = ({key: hg[r] for key, r in reads.items()}, {key: bg[r] for key, r in reads.items()})
        if progress:
            progress("gate features", k + 1, len(frames))
    rows = []
    for blk in blocks:
        for t in tails:
            for m in methods:
                cv = {f: cv_scores(feats[f][0][blk, t], feats[f][1][blk, t], m, fpr, groups=len(wrappers))
                      for f in frames}
                rows.append({"block": blk, "tail": t, "method": m,
                             "objective": round(sum(c["worst"] for c in cv.values()), 4),
                             "mean_objective": round(sum(c["objective"] for c in cv.values()), 4),
                             **{f"{f}_{k}": round(v, 4) for f, c in cv.items() for k, v in c.items()
                                if k not in ("objective", "worst")}})
    best = max(rows, key=lambda r: r["objective"])
    blk, t, m = best["block"], best["tail"], best["method"]
    gate = Gate(blk, m, {f: fit_frame(feats[f][0][blk, t], feats[f][1][blk, t], m, fpr, groups=len(wrappers),
                                      cross_fit=True) for f in frames},
                {"harmful": {"source": harmful or "advbench dev + catqa dev", "n": len(h), "sha256": _hash(h)},
                 "benign": {"source": benign or "xstest safe, odd positions + data/benign_demos.jsonl", "n": len(b),
                            "sha256": _hash(b)},
                 "wrappers": {"n": len(wrappers), "sha256": _hash(list(wrappers))},
                 "fpr_target": fpr, "chosen_by": "leave-one-wrapper-out CV on dev (a fold holds out one wrapper and "
                 "a share of the prompts, a prompt's copies in one fold): held-out TPR - FPR of the worst fold, "
                 "summed over frames" if len(rows) > 1 else "given",
                 "threshold": "(1 - fpr) quantile of 5-fold out-of-fold benign dev scores, the highest over wrappers",
                 "cv": {k: v for k, v in best.items()}}, t)
    return gate, rows
