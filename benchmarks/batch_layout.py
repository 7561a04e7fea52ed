"""Where do a guided batch's target and guidance rows go? Prompts per minute of ``generate_many`` (what
``filter --parallel N`` runs) with ``safeinfer`` and the shipped settings (``negative`` guidance), greedy, for both
layouts side by side in one process:

- ``split``: two llama.cpp contexts on the same weights, one per side, each with its control vector, decoding at
  the same time on half the threads each (every side's batch is what an unguided variant's would be);
- ``shared``: one context holding both sides' sequences, one ``llama_decode`` per step on every thread, the vector
  added per row through a ``cb_eval`` patch of ``l_out-B`` (``decode.sides.SharedContext``).

``auto`` (the default of ``filter``, ``serve`` and the API) picks ``shared`` from 2 slots on; the ratios printed
compare each row with ``split`` at ``--parallel 1`` (what ``auto`` runs at 1).

    python benchmarks/batch_layout.py [--parallel 1,2,4,8] [--prompts 16] [--tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.datasets import xstest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", default="1,2,4,8")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "batch_layout.json"))
    a = ap.parse_args()
    si = SafeInfer.default(gate="off", n_threads=a.threads)
    texts = [f"Q: {p.text}\nA:" for p in xstest("safe")[: a.prompts]]
    # raw prompts, no stop string: every prompt decodes `tokens` tokens (unless it ends itself), in both layouts
    gen = dict(variant="safeinfer", raw=True, max_tokens=a.tokens, temperature=0)
    par = [int(x) for x in a.parallel.split(",")]
    for layout in ("split", "shared"):  # warm-up: make every context once
        for n in par:
            if n > 1 or layout == "split":
                list(si.generate_many(list(enumerate(texts[:2])), n_parallel=n, layout=layout, **{**gen,
                                                                                                   "max_tokens": 2}))
    best: dict[str, dict[int, float]] = {"split": {}, "shared": {}}
    tokens: dict[str, dict[int, int]] = {"split": {}, "shared": {}}
    for _ in range(a.rounds):
        for n in par:
            for layout in ("split", "shared"):
                if layout == "shared" and n == 1:
                    continue
                t = time.perf_counter()
                res = dict(si.generate_many(list(enumerate(texts)), n_parallel=n, layout=layout, **gen))
                ppm = len(texts) / (time.perf_counter() - t) * 60
                best[layout][n] = max(best[layout].get(n, 0.0), ppm)
                tokens[layout][n] = sum(r.n_tokens for r in res.values())
    base = best["split"][1] if 1 in best["split"] else float("nan")
    for layout, rows in best.items():
        for n, ppm in rows.items():
            print(f"{layout:6} --parallel {n}: {ppm:6.1f} prompts/min ({ppm / base:.2f}x split at --parallel 1; "
                  f"{tokens[layout][n]} tokens)")
    Path(a.out).write_text(json.dumps({"model": si.model.name, "prompts": len(texts), "tokens": a.tokens,
                                       "settings": si.settings.describe("safeinfer"), "prompts_per_min": best,
                                       "tokens_decoded": tokens, "rounds": a.rounds}, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
