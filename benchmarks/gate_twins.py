"""The style-paired twins as gate training data: what they do to leave-one-source-out, and to the evaluation sets.

Per read (block x tail, shrinkage LDA, as ``vectors gate`` fits) and per frame, a gate is fitted on the nine shipped
dev sources (read bare) with and without the twins of ``safeinfer_local/data/gate_paired.jsonl`` in every fit,
never held out (``core.gate.Source(held=False)``): the first 40 or 160 pairs, or all 640, once or three times.
Its threshold comes from leave-one-source-out, as the shipped gate's. Printed, over the three frames:

- leave-one-source-out: the worst held-out source's AUROC and TPR at 5% FPR (the issue's bar);
- the evaluation sets of ``benchmarks/gate_eval.py`` (CatQA 10 per category + AdvBench ``eval`` vs XSTest ``safe``
  at even positions; XSTest ``unsafe`` vs ``safe`` at even positions; the held-out 40), bare and in HarmEval's
  ``simple`` wrapper: AUROC (mean/lowest), and at the threshold the share of harmful prompts flagged (TPR) and of
  benign ones (FPR, mean/highest); on the held-out 40, TPR (mean/lowest) and FPR (mean).

    python benchmarks/gate_twins.py --cache /tmp/gate_feats.npz --eval-cache /tmp/gate_twin_eval.npz

--cache is benchmarks/gate_sources.py's (the dev prompts' features); --eval-cache holds the evaluation sets' and
the twins' features, read on the first run (about 9 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from safeinfer_local.core.gate import Source, auroc, fit_sources, loso_scores

DEV = {"advbench-dev": True, "catqa-dev": True, "xstest-unsafe-dev": True, "written-harmful": True, "pyrit": True,
       "xstest-safe-dev": False, "benign-demos": False, "written-benign": False, "written-contrast": False}
FRAMES = ("template", "none", "qa")
BLOCKS, TAILS = (8, 10, 12, 14), (4, 16)
HELDOUT = Path(__file__).with_name("data") / "gate_heldout.jsonl"


def eval_features(path: Path) -> dict:
    """The evaluation sets (bare and ``simple``-wrapped) and the twins, per frame and read; cached in ``path``."""
    if path.exists():
        return dict(np.load(path))
    from safeinfer_local.api import SafeInfer
    from safeinfer_local.core.datasets import advbench, catqa, gate_paired, xstest
    from safeinfer_local.core.gate import Read
    from safeinfer_local.core.harm import PROMPT_TYPES
    from safeinfer_local.decode.gating import FeatureReader

    held = [json.loads(x) for x in HELDOUT.read_text(encoding="utf-8").splitlines() if x.strip()]
    safe, unsafe = xstest("safe"), xstest("unsafe")
    sets = {"harmful": [p.text for p in catqa(10)] + [p.text for p in advbench("eval")],
            "benign": [p.text for p in safe[0::2]], "xunsafe": [p.text for p in unsafe[0::2]],
            "held_h": [r["prompt"] for r in held if r["harmful"]],
            "held_b": [r["prompt"] for r in held if not r["harmful"]]}
    jobs = {f"{k}|plain": v for k, v in sets.items()}
    jobs |= {f"{k}|simple": [PROMPT_TYPES["simple"].format(q=q) for q in v] for k, v in sets.items()}
    jobs |= {f"twin_{s[0]}|plain": [p.text for p in gate_paired(s)] for s in ("harmful", "benign")}
    si = SafeInfer(vector="default")
    reads = tuple(Read((b,), t, True, "mean") for b in BLOCKS for t in TAILS)
    reader = FeatureReader(si.model, BLOCKS, si.n_ctx, si.n_threads)
    out, t0 = {}, time.time()
    for frame in FRAMES:
        for name, prompts in jobs.items():
            grid = reader.features_grid([si.encode_prompt(q, frame=frame)[0] for q in prompts], reads)
            out |= {f"{frame}|{name}|{r.blocks[0]}|{r.tail}": v.astype(np.float32) for r, v in grid.items()}
    print(f"(evaluation and twin features read in {time.time() - t0:.0f} s)")
    np.savez(path, **out)
    return out


def row(dev: np.lib.npyio.NpzFile, ev: dict, block: int, tail: int, n_twins: int, times: int) -> str:
    got = []
    for f in FRAMES:
        srcs = [Source(n, h, dev[f"{f}|{n}|{block}|{tail}|1|mean"].astype(np.float64)) for n, h in DEV.items()]
        for i in range(times):
            srcs += [Source(f"twins-{s}-{i}", s == "h", ev[f"{f}|twin_{s}|plain|{block}|{tail}"][:n_twins], False)
                     for s in ("h", "b")]
        lo = loso_scores(srcs, "lda", 0.05)
        g = fit_sources(srcs, "lda", 0.05, loso=lo)
        for w in ("plain", "simple"):
            s = {k: g.score(ev[f"{f}|{k}|{w}|{block}|{tail}"].astype(np.float64))
                 for k in ("harmful", "benign", "xunsafe", "held_h", "held_b")}
            flag = {k: float(np.mean(v >= g.threshold)) for k, v in s.items()}
            got.append((lo["worst_auroc"], lo["worst_tpr"], auroc(s["harmful"], s["benign"]),
                        auroc(s["xunsafe"], s["benign"]), auroc(s["held_h"], s["held_b"]),
                        flag["harmful"], flag["benign"], flag["held_h"], flag["held_b"]))
    a = np.array(got)
    twins = "no twins" if not times else f"+{n_twins} twins" + (f" x{times}" if times > 1 else "")
    return (f"b{block:<2d} last {tail:<2d} {twins:14s} | {a[:, 0].min():.2f}  {a[:, 1].min():.2f} | "
            f"{a[:, 2].mean():.3f}/{a[:, 2].min():.3f}  {a[:, 3].mean():.3f}/{a[:, 3].min():.3f}  "
            f"{a[:, 4].mean():.3f}/{a[:, 4].min():.3f} | {a[:, 5].mean():.2f}  "
            f"{a[:, 6].mean():.2f}/{a[:, 6].max():.2f}  "
            f"{a[:, 7].mean():.2f}/{a[:, 7].min():.2f}  {a[:, 8].mean():.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True, help="benchmarks/gate_sources.py's --cache")
    ap.add_argument("--eval-cache", type=Path, required=True)
    a = ap.parse_args()
    dev, ev = np.load(a.cache), eval_features(a.eval_cache)
    print("read              twins          | LOSO worst     | evaluation AUROC mean/lowest:            "
          "| at the threshold: eval TPR  FPR mean/highest  held-out TPR  FPR")
    print("                                 | AUROC TPR@5%   | bench sets    XSTest pairs  held-out 40  |")
    for block in BLOCKS:
        for tail in TAILS:
            for n, times in ((0, 0), (40, 1), (160, 1), (640, 1), (640, 3)):
                print(row(dev, ev, block, tail, n, times), flush=True)


if __name__ == "__main__":
    main()
