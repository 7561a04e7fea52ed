"""Which block and method make the best harm gate, per frame (the sweep behind the shipped vector's gate).

Dev (fit and threshold): what ``safeinfer vectors gate`` uses, AdvBench ``dev`` vs XSTest ``safe`` at odd positions
and the project's benign requests. Evaluation (disjoint): CatQA
(``--catqa`` per category) + AdvBench ``eval`` vs XSTest ``safe`` at even positions; and the lexically matched
XSTest ``unsafe`` vs ``safe`` pairs (even positions). Prints AUROC and TPR/FPR at the threshold (``--fpr`` of
dev-benign flagged) per frame × block × method.

    python benchmarks/gate_sweep.py [--blocks 2,4,6,8,10,12,14] [--out docs/results/gate_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.datasets import advbench, catqa, xstest
from safeinfer_local.core.frames import FRAMES
from safeinfer_local.core.gate import METHODS, auroc, fit_frame
from safeinfer_local.decode.gating import FeatureReader
from safeinfer_local.workflows.gatebuild import dev_sources


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="2,4,6,8,10,12,14")
    ap.add_argument("--catqa", type=int, default=10)
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--frames", default=",".join(FRAMES))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    t0 = time.time()
    si = SafeInfer.default()
    blocks = tuple(int(x) for x in a.blocks.split(","))
    reader = FeatureReader(si.model, blocks)
    safe = xstest("safe")
    unsafe = xstest("unsafe")
    src = dev_sources().values()  # what `safeinfer vectors gate` fits on
    dev_h, dev_b = ([q for h, ps in src if h is side for q in ps] for side in (True, False))
    sets = {"dev_h": dev_h, "dev_b": dev_b,
            "ev_h": [p.text for p in catqa(a.catqa)] + [p.text for p in advbench("eval")],
            "ev_b": [p.text for p in safe[0::2]], "xs_u": [p.text for p in unsafe[0::2]]}
    rows = []
    for frame in a.frames.split(","):
        feats = {k: reader.features_by_block([si.encode_prompt(q, frame=frame)[0] for q in v]) for k, v in sets.items()}
        for b in blocks:
            for m in METHODS:
                g = fit_frame(feats["dev_h"][b], feats["dev_b"][b], m, a.fpr)
                s = {k: g.score(feats[k][b]) for k in sets}
                row = {"frame": frame, "block": b, "method": m, "dev_auroc": g.dev["auroc"],
                       "auroc": round(auroc(s["ev_h"], s["ev_b"]), 4),
                       "xstest_unsafe_vs_safe_auroc": round(auroc(s["xs_u"], s["ev_b"]), 4),
                       "tpr": round(float(np.mean(s["ev_h"] >= g.threshold)), 4),
                       "fpr": round(float(np.mean(s["ev_b"] >= g.threshold)), 4),
                       "xstest_unsafe_flagged": round(float(np.mean(s["xs_u"] >= g.threshold)), 4)}
                rows.append(row)
                print(f"{frame:8} block {b:2} {m:9} AUROC {row['auroc']:.3f} (dev {row['dev_auroc']:.3f}, "
                      f"XSTest unsafe/safe {row['xstest_unsafe_vs_safe_auroc']:.3f})  at threshold: TPR "
                      f"{row['tpr']:.2f} FPR {row['fpr']:.2f}", flush=True)
    n = {k: len(v) for k, v in sets.items()}
    print(f"{time.time() - t0:.0f} s; prompts: {n}")
    if a.out:
        a.out.write_text(json.dumps({"fpr_target": a.fpr, "n": n, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
