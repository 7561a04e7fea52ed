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
With a harm gate (the vector's, unless ``gate="off"``), a prompt the gate judges benign is decoded plainly whatever
the setting, so it counts with gain 0 (harmful) or loss 0 (benign): the setting is calibrated for the prompts the
gate lets through to it, and the gate's own TPR / FPR on the dev prompts are reported.

objective = mean gain − mean loss, among settings whose margin beats base's on ≥ 90% of harmful dev prompts and
whose loss is at most ``max_loss``; when none reaches the share, the highest share (then objective) within
``max_loss`` wins; a setting over ``max_loss`` never does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..api import SafeInfer
from ..core import datasets
from ..core.datasets import Prompt
from ..core.frames import check_frame, frame_cont
from ..core.harm import COMPLIANT, REFUSAL
from ..core.settings import check_lambda
from ..errors import UsageError
from .sweep import Item, grid_logprobs

SHARE_FLOOR = 0.9


def dev_split(n_harmful: int, n_benign: int) -> tuple[list[Prompt], list[Prompt]]:
    """``datasets.dev_split``, with at least one prompt of each kind."""
    if n_harmful < 1 or n_benign < 1:
        raise UsageError("--n-harmful and --n-benign must be >= 1")
    return datasets.dev_split(n_harmful, n_benign)


def pick(rows: list[dict], max_loss: float) -> dict | None:
    """The best objective among settings within ``max_loss`` that raise the margin on >= 90% of harmful dev
    prompts; failing the share, the highest share within ``max_loss``; None when no setting is within it."""
    within = [r for r in rows if r["benign_loss"] <= max_loss]
    ok = [r for r in within if r["margin_up"] >= SHARE_FLOOR]
    if ok:
        return max(ok, key=lambda r: r["objective"])
    return max(within, key=lambda r: (r["margin_up"], r["objective"])) if within else None


def prepare(si: SafeInfer, harmful: list[Prompt], benign: list[Prompt], frame: str = "template",
            answer_tokens: int = 24, progress: Callable[[], None] | None = None) -> tuple[list[Item], list[Item]]:
    """The dev prompts as sweep items: harmful ones with [refusal, compliant opening], benign ones with base's
    own greedy answer."""
    m = si.model

    def enc(q: str) -> list[int]:
        return si.encode_prompt(q, frame=frame)[0]

    def cont(text: str) -> list[int]:
        return m.tokenize(frame_cont(text, frame), add_bos=False)

    items_h = [Item(enc(p.text), [cont(REFUSAL), cont(p.target or COMPLIANT["simple"])]) for p in harmful]
    items_b = []
    for p in benign:
        ans = si.generate(p.text, variant="base", frame=frame, max_tokens=answer_tokens, temperature=0.0).response
        items_b.append(Item(enc(p.text), [m.tokenize(ans, add_bos=False) if ans.strip() else cont("I don't know.")]))
        if progress:
            progress()
    return items_h, items_b


def gate_flags(si: SafeInfer, items: list[Item], frame: str, variant: str = "safeinfer") -> np.ndarray | None:
    """Which prompts the active harm gate flags (goes on to the variant); None without a gate."""
    if si.active_gate(variant) is None:
        return None
    out = []
    for r in si.route_many([it.tokens for it in items], variant, frame):
        if isinstance(r, UsageError):
            raise r
        out.append(bool(r.flagged))
    return np.array(out, dtype=bool)


def tradeoff(si: SafeInfer, items_h: list[Item], items_b: list[Item], grid: list[dict], lams: tuple[float, ...],
             variant: str = "safeinfer", progress: Callable[[], None] | None = None,
             flags: tuple[np.ndarray, np.ndarray] | None = None) -> list[dict]:
    """One row per setting × λ: the share of harmful prompts whose refusal margin beats base's, the mean margin
    gain and the mean benign loss (nats per token), and the objective (gain − loss). ``flags``: which harmful and
    benign prompts a harm gate sends to the setting (the others decode plainly: gain and loss 0)."""
    base_h, base_b = (grid_logprobs(si, items, [{}], (0.0,), "base", progress)[0][0.0] for items in (items_h, items_b))
    n_ref = np.array([len(it.conts[0]) for it in items_h], dtype=float)
    n_ans = np.array([len(it.conts[0]) for it in items_b], dtype=float)
    rows = []
    for setting, h, b in zip(grid, grid_logprobs(si, items_h, grid, lams, variant, progress),
                             grid_logprobs(si, items_b, grid, lams, variant, progress), strict=True):
        for lam in lams:
            gain = ((h[lam][:, 0] - h[lam][:, 1]) - (base_h[:, 0] - base_h[:, 1])) / n_ref
            loss = (base_b[:, 0] - b[lam][:, 0]) / n_ans
            if flags is not None:
                gain, loss = np.where(flags[0], gain, 0.0), np.where(flags[1], loss, 0.0)
            rows.append({**{k: (v[0] if k == "layers" else v) for k, v in setting.items() if k != "layers"},
                         **({"layer": setting["layers"][0]} if "layers" in setting else {}),
                         "lam": lam, "margin_up": float(np.mean(gain > 0)), "margin_gain": float(gain.mean()),
                         "benign_loss": float(loss.mean()), "objective": float(gain.mean() - loss.mean())})
    return rows


def calibrate(si: SafeInfer, gammas: tuple[float, ...], lams: tuple[float, ...], layers: tuple[int, ...],
              harmful: list[Prompt], benign: list[Prompt], frame: str = "template", answer_tokens: int = 24,
              progress: Callable[[str, int, int], None] | None = None, gate_out: dict | None = None) -> list[dict]:
    """One row per block × γ × λ for the ``safeinfer`` variant with ``si``'s guidance (behind ``si``'s active
    harm gate, if any: its dev TPR / FPR go into ``gate_out``)."""
    if si.vector is None or si.steering is None:
        raise UsageError("calibrate needs a safety vector (--vector)")
    for lam in lams:
        check_lambda(lam)
    grid = [{"layers": (layer,), "gamma": g} for layer in layers for g in gammas]
    total = len(benign) + (len(grid) + 1) * (len(harmful) + len(benign))
    done = [0]

    def tick():
        done[0] += 1
        if progress:
            progress("calibrate", done[0], total)

    items_h, items_b = prepare(si, harmful, benign, frame, answer_tokens, tick)
    fh, fb = gate_flags(si, items_h, frame), gate_flags(si, items_b, frame)  # both None without a gate
    if fh is not None and gate_out is not None:
        gate_out.update({"gate": si.gate.digest(), "tpr": float(fh.mean()), "fpr": float(fb.mean()),
                         "n_harmful": len(fh), "n_benign": len(fb)})
    return tradeoff(si, items_h, items_b, grid, lams, "safeinfer", tick, None if fh is None else (fh, fb))


def record(si: SafeInfer, best: dict, rows: list[dict], n_harmful: int, n_benign: int, frame: str, max_loss: float,
           gate: dict | None = None):
    """The vector with the chosen setting as its recommendation (γ, block, sGDS guidance and λ) and the
    calibration's provenance in its metadata."""
    from dataclasses import replace

    v = si.vector
    g = si.guidance
    meta = dict(v.meta)
    meta["sgds"] = {"guidance": str(g), "lam": best["lam"]}
    meta["calibration"] = {
        "objective": "mean refusal-margin gain per token - mean benign loss per token",
        "dev": {"harmful": f"advbench dev[:{n_harmful}]", "benign": f"xstest safe odd positions[:{n_benign}]"},
        "framing": frame, "max_benign_loss": max_loss, "share_floor": SHARE_FLOOR,
        "model": si.model.path.name, "chosen": best, "n_settings": len(rows),
        "gate": gate or None}  # behind which gate the setting was chosen (its dev TPR / FPR), or none
    return replace(v, gamma=best["gamma"], layers=(best["layer"],), meta=meta)


@dataclass
class Calibration:
    rows: list[dict]
    best: dict | None
    n_harmful: int
    n_benign: int
    saved: Path | None = None
    gate: dict | None = None
    """The harm gate the sweep ran behind: its digest and TPR / FPR on the dev prompts (None: ungated)."""


def run(si: SafeInfer, gammas: tuple[float, ...], lams: tuple[float, ...], layers: tuple[int, ...] | None = None,
        n_harmful: int = 24, n_benign: int = 24, max_loss: float = 0.5, frame: str = "template",
        save_to: str | Path | None = None, progress: Callable[[str, int, int], None] | None = None) -> Calibration:
    """``safeinfer calibrate``: sweep, pick, and (with ``save_to``) write the vector with the chosen setting
    recorded. Nothing is written when no setting is within ``max_loss``."""
    if any(g <= 0 for g in gammas):
        raise UsageError("--gammas must be > 0")
    for lam in lams:
        check_lambda(lam)
    check_frame(frame)
    if si.vector is None:
        raise UsageError("calibrate needs a safety vector (--vector)")
    harmful, benign = dev_split(n_harmful, n_benign)
    gate: dict = {}
    rows = calibrate(si, gammas, lams, layers or si.vector.layers, harmful, benign, frame=frame, progress=progress,
                     gate_out=gate)
    best = pick(rows, max_loss)
    res = Calibration(rows, best, len(harmful), len(benign), gate=gate or None)
    if best is not None and save_to is not None:
        res.saved = record(si, best, rows, len(harmful), len(benign), frame, max_loss, gate).save(save_to)
    return res
