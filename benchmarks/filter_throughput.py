"""Prompts per minute of `filter --parallel N` against `--parallel 1`, side by side in one process.

    python benchmarks/filter_throughput.py [--variant safeinfer] [--prompts 12] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import time

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.datasets import xstest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="safeinfer")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--parallel", default="1,2,4,8")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    si = SafeInfer.default()
    prompts = [(str(i), f"Q: {p.text}\nA:") for i, p in enumerate(xstest("safe")[: a.prompts])]
    list(si.generate_many(prompts[:2], variant=a.variant, raw=True, n_parallel=2, max_tokens=2, temperature=0))
    best: dict[int, float] = {}
    for _ in range(a.rounds):
        for n in (int(x) for x in a.parallel.split(",")):
            t = time.perf_counter()
            res = list(si.generate_many(prompts, variant=a.variant, raw=True, n_parallel=n, max_tokens=a.tokens,
                                        temperature=0))
            ppm = len(res) / (time.perf_counter() - t) * 60
            best[n] = max(best.get(n, 0.0), ppm)
    for n, ppm in best.items():
        print(f"--parallel {n}: {ppm:6.1f} prompts/min  ({ppm / best[1]:.2f}x --parallel 1)")
    print(json.dumps({"variant": a.variant, "prompts": a.prompts, "tokens": a.tokens, "prompts_per_min": best}))


if __name__ == "__main__":
    main()
