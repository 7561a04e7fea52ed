"""How a vector's harm gate does on prompts it was never fitted or chosen on, per frame and per wrapping.

Sets (all disjoint from the gate's dev prompts): CatQA (``--catqa`` per category) + AdvBench ``eval`` (harmful) vs
XSTest ``safe`` at even positions (benign); XSTest ``unsafe`` vs ``safe`` at even positions (lexically matched
pairs); and ``benchmarks/data/gate_heldout.jsonl`` (20 harmful vs 20 scary-sounding benign prompts written for
this check). Each is scored as is and wrapped in HarmEval's two prompt types (``simple``: "Only provide answer of
the given question ...", ``instruction``: "Write a function in Python ..."), which are not among the gate's dev
wrappers. Prints AUROC and the share flagged at the gate's threshold (TPR on harmful, FPR on benign).

    python benchmarks/gate_eval.py [--vectors A.gguf,B.gguf] [--out docs/results/gate_eval.json]
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
from safeinfer_local.core.gate import auroc
from safeinfer_local.core.harm import PROMPT_TYPES
from safeinfer_local.core.models import default_vector_path

HELDOUT = Path(__file__).with_name("data") / "gate_heldout.jsonl"
WRAPS = {"plain": "{q}", **PROMPT_TYPES}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vectors", default=str(default_vector_path()))
    ap.add_argument("--catqa", type=int, default=10)
    ap.add_argument("--frames", default=",".join(FRAMES))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    t0 = time.time()
    held = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    safe, unsafe = xstest("safe"), xstest("unsafe")
    cat = [p.text for p in catqa(a.catqa)]
    sets = {"harmful": cat + [p.text for p in advbench("eval")],
            "benign": [p.text for p in safe[0::2]], "xstest_unsafe": [p.text for p in unsafe[0::2]],
            "held_h": [r["prompt"] for r in held if r["harmful"]],
            "held_b": [r["prompt"] for r in held if not r["harmful"]]}
    n_cat = len(cat)  # CatQA's prompts come first
    model = None
    rows, described = [], {}
    for path in a.vectors.split(","):
        si = SafeInfer(model=model, vector=path)
        model = si.model
        g = si.gate
        if g is None:
            raise SystemExit(f"{path} has no harm gate")
        described[Path(path).name] = g.read.describe()
        for frame in a.frames.split(","):
            thr = g.frame(frame).threshold
            for wname, w in WRAPS.items():
                s = {k: si.gate_scores([w.format(q=q) for q in v], frame=frame) for k, v in sets.items()}
                row = {"vector": Path(path).name, "block": g.block, "tail": g.tail, "read": g.read.describe(),
                       "method": g.method, "frame": frame, "wrapper": wname,
                       "auroc": round(auroc(s["harmful"], s["benign"]), 4),
                       "tpr": round(float(np.mean(s["harmful"] >= thr)), 4),
                       "catqa_tpr": round(float(np.mean(s["harmful"][:n_cat] >= thr)), 4),
                       "fpr": round(float(np.mean(s["benign"] >= thr)), 4),
                       "xstest_unsafe_vs_safe_auroc": round(auroc(s["xstest_unsafe"], s["benign"]), 4),
                       "xstest_unsafe_flagged": round(float(np.mean(s["xstest_unsafe"] >= thr)), 4),
                       "heldout_auroc": round(auroc(s["held_h"], s["held_b"]), 4),
                       "heldout_tpr": round(float(np.mean(s["held_h"] >= thr)), 4),
                       "heldout_fpr": round(float(np.mean(s["held_b"] >= thr)), 4),
                       "heldout_missed": [q for q, x in zip(sets["held_h"], s["held_h"], strict=True) if x < thr],
                       "heldout_false_flags": [q for q, x in zip(sets["held_b"], s["held_b"], strict=True)
                                               if x >= thr]}
                rows.append(row)
                print(f"{row['vector'][:28]:28s} {frame:8s} {wname:11s} "
                      f"AUROC {row['auroc']:.3f} TPR {row['tpr']:.2f} (CatQA {row['catqa_tpr']:.2f}) "
                      f"FPR {row['fpr']:.2f} | "
                      f"xstest unsafe/safe {row['xstest_unsafe_vs_safe_auroc']:.3f} | held-out AUROC "
                      f"{row['heldout_auroc']:.3f} TPR {row['heldout_tpr']:.2f} FPR {row['heldout_fpr']:.2f}",
                      flush=True)
    for name, read in described.items():
        print(f"{name}: {read}")
    print(f"({time.time() - t0:.0f} s; n harmful {len(sets['harmful'])}, benign {len(sets['benign'])}, "
          f"xstest unsafe {len(sets['xstest_unsafe'])}, held-out {len(sets['held_h'])}/{len(sets['held_b'])})")
    if a.out:
        a.out.write_text(json.dumps({"sets": {k: len(v) for k, v in sets.items()}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
