"""Safety-amplification figures for a vector on the default (or any) model, printed and written as JSON.

    python benchmarks/sa_acceptance.py [--vector V] [--out docs/results/sa_acceptance.json]

1. Likelihood: per-token log-prob of the refusal continuation after ``Q: <prompt>\\nA:`` (raw), base vs sa, on
   harmful prompts never used in demonstrations (CatQA, 2 per category) and on benign XSTest ``safe`` prompts
   (the even positions; the odd ones are the sweep's dev set).
2. Free generation: greedy replies (raw Q/A and through the chat template), refusal rate by the built-in
   refusal detector, base vs sa.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.datasets import catqa, xstest
from safeinfer_local.core.demos import REFUSAL_PROBE, qa_prompt
from safeinfer_local.core.judge import is_refusal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vector", default="default")
    ap.add_argument("--model", default=None)
    ap.add_argument("--benign", type=int, default=60, help="XSTest safe prompts (reporting half)")
    ap.add_argument("--gen-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    si = SafeInfer(model=a.model, vector=a.vector)
    st = si.steering
    harmful = [p.text for p in catqa(per_category=2)]
    benign = [p.text for p in xstest("safe")][0::2][: a.benign]
    t0 = time.time()

    def per_token(q: str, v: str) -> float:
        s = si.score(qa_prompt(q), REFUSAL_PROBE, variant=v, raw=True)
        return s.logprob / s.n_tokens

    res: dict = {"model": si.model.name, "vector": str(a.vector), "gamma": st.gamma, "layers": list(st.layers),
                 "positions": st.positions, "probe": REFUSAL_PROBE}
    for name, prompts in (("harmful_catqa", harmful), ("benign_xstest", benign)):
        b = np.array([per_token(q, "base") for q in prompts])
        s = np.array([per_token(q, "sa") for q in prompts])
        res[name] = {"n": len(prompts), "base_mean": float(b.mean()), "sa_mean": float(s.mean()),
                     "raised_share": float(np.mean(s > b)), "mean_delta": float((s - b).mean())}
        print(f"{name:14} n={len(prompts):3}  base {b.mean():7.3f}  sa {s.mean():7.3f}  "
              f"raised on {np.mean(s > b):.0%} (Δ {np.mean(s - b):+.3f} nats/token)", flush=True)
    gen = {}
    for mode in ("raw", "chat"):
        for v in ("base", "sa"):
            for name, prompts in (("harmful_catqa", harmful), ("benign_xstest", benign[:22])):
                refused = 0
                for q in prompts:
                    p = qa_prompt(q) if mode == "raw" else q
                    r = si.generate(p, variant=v, raw=mode == "raw", max_tokens=a.gen_tokens, temperature=0,
                                    stop=("\nQ:",))
                    refused += is_refusal(r.response)
                gen[f"{mode}/{v}/{name}"] = {"n": len(prompts), "refusal_rate": refused / len(prompts)}
                print(f"free generation {mode:4} {v:4} {name:14} refused {refused}/{len(prompts)}", flush=True)
    res["free_generation"] = gen
    res["seconds"] = round(time.time() - t0, 1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
