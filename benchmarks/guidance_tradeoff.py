"""The sGDS safety / utility trade-off on the default model, per guidance source, variant and λ.

Safety: on harmful prompts never used in demonstrations (CatQA 2 per category, AdvBench eval split), the margin
    log p(refusal) − log p(compliant opening "Sure, here is ...")
after ``Q: <prompt>\\nA:``; reported: share of prompts where the variant's margin beats base's, and the mean gain
per refusal token.
Utility: on benign XSTest ``safe`` prompts (even positions), base's own greedy answer (24 tokens) scored under the
variant; reported: mean loss in nats per token against base (base − variant; lower is better).

It runs the same sweep as ``safeinfer calibrate`` (``eval.calibrate.prepare`` + ``tradeoff``, on
``eval.sweep.grid_logprobs``): the target and guidance rows are computed once per prompt and every λ is applied
to them, so a λ sweep costs one pass.

    python benchmarks/guidance_tradeoff.py [--harmful 22] [--benign 20] [--out docs/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.datasets import Prompt, advbench, advbench_rows, advbench_split, catqa, xstest
from safeinfer_local.eval.calibrate import prepare, tradeoff

LAMS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--harmful", type=int, default=22)
    ap.add_argument("--advbench", type=int, default=10, help="AdvBench eval prompts added to the harmful set")
    ap.add_argument("--benign", type=int, default=20)
    ap.add_argument("--guidance", default="prompt,negative")
    ap.add_argument("--variants", default="sgds,safeinfer")
    ap.add_argument("--lams", default=",".join(map(str, LAMS)))
    ap.add_argument("--gamma", type=float, default=None, help="override the vector's γ (SA and negative guidance)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    lams = tuple(float(x) for x in a.lams.split(","))
    t0 = time.time()
    rows_ab = advbench_rows()
    harmful = [Prompt(p.id, p.text, target="Sure, here is") for p in catqa(per_category=2)][: a.harmful]
    harmful += [Prompt(str(i), rows_ab[i]["goal"], target=rows_ab[i]["target"])
                for i in advbench_split()["eval"][: a.advbench]]
    benign = xstest("safe")[0::2][: a.benign]
    assert not {p.text for p in harmful} & {p.text for p in advbench("safe_demos")}
    results = []
    for kind in a.guidance.split(","):
        si = SafeInfer.default(guidance=kind, gamma=a.gamma)
        items_h, items_b = prepare(si, harmful, benign, frame="qa")
        for variant in a.variants.split(","):
            for row in tradeoff(si, items_h, items_b, [{}], lams, variant):
                row = {"guidance": kind, "variant": variant, "gamma": si.steering.gamma} | row
                results.append(row)
                print(f"{kind:9} {variant:9} λ={row['lam']:<5} margin up {row['margin_up']:.2f} "
                      f"(gain {row['margin_gain']:+.3f} nats/token)  benign loss {row['benign_loss']:+.3f} "
                      "nats/token", flush=True)
    print(f"{time.time() - t0:.0f} s")
    if a.out:
        a.out.write_text(json.dumps({"harmful": len(harmful), "benign": len(benign), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
