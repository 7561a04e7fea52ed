"""Does the fv head budget keep the heads a full AIE scan picks? On the default model (Gemma 3 270M, 18 x 4 = 72
heads): the full scan (every head patched into each of the 16 corrupted prompts), then for a screen on the first
1, 2 or 4 prompts where the full scan's top 10 rank, and for budgets of 16, 32 and 64 heads whether a budgeted build
picks the same top 10. (A budgeted build's AIE of a measured head is the full scan's, so its top 10 is the full
scan's top 10 among the heads its screen kept.)

    python benchmarks/fv_budget_check.py [--threads 1]     # ~8 min on 2 cores: the capture, then 16 x 73 passes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from safeinfer_local.core.demos import N_PROMPTS, N_SHOTS, icl_prompts, load_demos, qa_prompt
from safeinfer_local.core.fv import heads_to_scan, top_heads
from safeinfer_local.core.models import resolve_model
from safeinfer_local.llama.engine import Model
from safeinfer_local.workflows.build import (
    DEFAULT_AIE_PROMPTS,
    DEFAULT_HEADS,
    BuildPlan,
    Stage,
    _capture_means,
    _corrupted_prompts,
    _Meter,
    head_aie,
)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "fv_budget_check.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    demos = load_demos(ROOT / "vectors" / "safe_demos.jsonl")
    m = Model(resolve_model(None))
    L, H = m.n_layer, m.n_head
    icl = [m.tokenize(qa_prompt(q, s), add_bos=True) for q, s in icl_prompts(demos, N_PROMPTS, N_SHOTS, 0)]
    quiet = _Meter(BuildPlan("fv", (Stage("capture", len(icl), 1), Stage("heads", L * H + 1, 1)), L, H), None, None)
    cap = _capture_means(m, icl, [], want_kqv=True, want_resid=False, meter=quiet, n_ctx=4096, n_threads=a.threads)
    corrupted = _corrupted_prompts(m, demos, DEFAULT_AIE_PROMPTS)
    # every head on each prompt alone: the full scan is their mean, a screen on k prompts the mean of the first k
    per = np.stack([head_aie(m, cap.kqv, [c], L * H, quiet, n_threads=a.threads)[0] for c in corrupted])
    full = per.mean(axis=0)
    top = top_heads(full, DEFAULT_HEADS)
    print("full scan's top heads (block, head, AIE):", [(i, h, round(float(full[i, h]), 3)) for i, h in top])
    screens = {}
    for k in (1, 2, 4):
        order = np.argsort(-per[:k].mean(axis=0), axis=None, kind="stable")
        rank = {(int(x // H), int(x % H)): r + 1 for r, x in enumerate(order)}
        ranks = [rank[t] for t in top]
        budgets = {}
        for n in (16, 32, 64):
            kept = heads_to_scan(per[:k].mean(axis=0), L, H, n)
            masked = np.full_like(full, np.nan)
            for i, h in kept:
                masked[i, h] = full[i, h]
            budgets[n] = top_heads(masked, DEFAULT_HEADS) == top
        screens[k] = {"ranks_of_full_top": ranks, "worst": max(ranks), "same_top_at_budget": budgets}
        print(f"screen on {k} prompt(s): the full scan's top {DEFAULT_HEADS} rank {ranks} (worst {max(ranks)}); "
              "same top heads at --max-heads " + ", ".join(f"{n}: {'yes' if v else 'no'}" for n, v in budgets.items()))
    doc = {"model": m.name, "n_layer": L, "n_head": H, "aie_prompts": len(corrupted),
           "full_top": [{"layer": i, "head": h, "aie": round(float(full[i, h]), 5)} for i, h in top],
           "screens": screens, "per_prompt_aie": np.round(per, 4).tolist(), "seconds": time.perf_counter() - t0}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
