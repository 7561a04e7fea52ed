"""``safeinfer calibrate``: choose γ (and the block, when the vector has several) and sGDS's λ for a model, on a dev
split disjoint from every evaluation set, and record the choice in the vector file.

For each block × γ, the target's and the guidance's next-token rows are computed once per prompt and every λ is
applied to them afterwards (the guided formula is a pure function of the two rows), so a λ sweep costs nothing
more. λ = 0 is the target alone (SA alone with ``negative`` guidance; with ``prompt`` guidance the target also
carries its demonstration prefix). Blocks are tried one at a time.

Per setting, on harmful dev prompts (AdvBench ``dev``, each with its own compliant ``target``):
    margin = log p(refusal) − log p(compliant opening)        (summed over tokens)
    gain   = (margin − base's margin) / refusal tokens         (nats per token)
and on benign dev prompts (XSTest ``safe`` at odd positions), base's own greedy answer scored under the setting:
    loss   = base's log p(answer) − the setting's, per token   (nats per token; lower is better)
objective = mean gain − mean loss, among settings whose margin beats base's on ≥ 90% of harmful dev prompts and
whose loss is at most ``max_loss``; when none reaches the share, the highest share (then objective) within
``max_loss`` wins; a setting over ``max_loss`` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..api import SafeInfer
from ..core import datasets
from ..core.datasets import Prompt
from ..core.harm import COMPLIANT, QA_STOP, REFUSAL, frame, frame_cont
from ..core.sampling import check_lambda, guided_logits, token_logprobs
from ..decode.generate import Steering
from ..errors import UsageError

SHARE_FLOOR = 0.9


def dev_split(n_harmful: int, n_benign: int) -> tuple[list[Prompt], list[Prompt]]:
    """``datasets.dev_split``, with at least one prompt of each kind."""
    if n_harmful < 1 or n_benign < 1:
        raise UsageError("--n-harmful and --n-benign must be >= 1")
    return datasets.dev_split(n_harmful, n_benign)


@dataclass
class _Item:
    tokens: list[int]
    conts: list[list[int]]  # harmful: [refusal, compliant]; benign: [answer]
    base: float  # harmful: base margin; benign: base answer log-prob per token


def pick(rows: list[dict], max_loss: float) -> dict | None:
    """The best objective among settings within ``max_loss`` that raise the margin on >= 90% of harmful dev
    prompts; failing the share, the highest share within ``max_loss``; None when no setting is within it."""
    within = [r for r in rows if r["benign_loss"] <= max_loss]
    ok = [r for r in within if r["margin_up"] >= SHARE_FLOOR]
    if ok:
        return max(ok, key=lambda r: r["objective"])
    return max(within, key=lambda r: (r["margin_up"], r["objective"])) if within else None


def calibrate(si: SafeInfer, gammas: tuple[float, ...], lams: tuple[float, ...], layers: tuple[int, ...],
              harmful: list[Prompt], benign: list[Prompt], raw: bool = False, answer_tokens: int = 24,
              progress: Callable[[str, int, int], None] | None = None) -> list[dict]:
    """One row per block × γ × λ for the ``safeinfer`` variant with the runner's guidance."""
    if si.vector is None or si.steering is None:
        raise UsageError("calibrate needs a safety vector (--vector)")
    for lam in lams:
        try:
            check_lambda(lam)
        except ValueError as e:
            raise UsageError(f"--lams: {e}") from None
    progress = progress or (lambda *a: None)
    m, r = si.model, si.runner

    def enc(q: str) -> list[int]:
        return si.encode_prompt(frame(q, raw), raw)[0]

    def cont(text: str) -> list[int]:
        return m.tokenize(frame_cont(text, raw), add_bos=False)

    items_h, items_b = [], []
    total = len(harmful) + len(benign) + len(layers) * len(gammas) * (len(harmful) + len(benign))
    done = 0
    for p in harmful:
        toks = enc(p.text)
        cs = [cont(REFUSAL), cont(p.target or COMPLIANT["simple"])]
        lr, lc = (float(r.score(toks, c, None, "base").sum()) for c in cs)
        items_h.append(_Item(toks, cs, lr - lc))
        done += 1
        progress("calibrate", done, total)
    for p in benign:
        toks = enc(p.text)
        ans = si.generate(frame(p.text, raw), variant="base", raw=raw, max_tokens=answer_tokens,
                          temperature=0.0, stop=QA_STOP if raw else ()).response
        c = m.tokenize(ans, add_bos=False) if ans.strip() else cont("I don't know.")
        items_b.append(_Item(toks, [c], float(r.score(toks, c, None, "base").mean())))
        done += 1
        progress("calibrate", done, total)

    rows = []
    for layer in layers:
        for g in gammas:
            st = Steering.from_vector(si.vector, m, g, (layer,), si.steering.positions)
            gains = {lam: [] for lam in lams}
            losses = {lam: [] for lam in lams}
            for it in items_h:
                rr = [r.score_rows(it.tokens, c, st, "safeinfer") for c in it.conts]
                for lam in lams:
                    lr, lc = (float(token_logprobs(_mix(rt, ru, lam), c).sum())
                              for (rt, ru), c in zip(rr, it.conts, strict=True))
                    gains[lam].append((lr - lc - it.base) / len(it.conts[0]))
                done += 1
                progress("calibrate", done, total)
            for it in items_b:
                rt, ru = r.score_rows(it.tokens, it.conts[0], st, "safeinfer")
                for lam in lams:
                    lp = float(token_logprobs(_mix(rt, ru, lam), it.conts[0]).mean())
                    losses[lam].append(it.base - lp)
                done += 1
                progress("calibrate", done, total)
            for lam in lams:
                gain, loss = np.asarray(gains[lam]), np.asarray(losses[lam])
                rows.append({"layer": layer, "gamma": g, "lam": lam, "margin_up": float(np.mean(gain > 0)),
                             "margin_gain": float(gain.mean()), "benign_loss": float(loss.mean()),
                             "objective": float(gain.mean() - loss.mean())})
    return rows


def _mix(rt: np.ndarray, ru: np.ndarray | None, lam: float) -> np.ndarray:
    return rt if ru is None or lam == 0 else guided_logits(rt, ru, lam)


def record(si: SafeInfer, best: dict, rows: list[dict], n_harmful: int, n_benign: int, raw: bool, max_loss: float):
    """The vector with the chosen setting as its recommendation (γ, block, sGDS guidance and λ) and the
    calibration's provenance in its metadata."""
    from dataclasses import replace

    v = si.vector
    g = si.runner.guidance
    meta = dict(v.meta)
    meta["sgds"] = {"guidance": str(g), "lam": best["lam"]}
    meta["calibration"] = {
        "objective": "mean refusal-margin gain per token - mean benign loss per token",
        "dev": {"harmful": f"advbench dev[:{n_harmful}]", "benign": f"xstest safe odd positions[:{n_benign}]"},
        "framing": "qa" if raw else "chat", "max_benign_loss": max_loss, "share_floor": SHARE_FLOOR,
        "model": si.model.path.name, "chosen": best, "n_settings": len(rows)}
    return replace(v, gamma=best["gamma"], layers=(best["layer"],), meta=meta)
