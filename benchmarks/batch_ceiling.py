"""How much batching can buy on this machine: one llama.cpp decode step for N sequences (one new token each) on
the default model, against N single-sequence steps. This bounds what ``filter --parallel`` can gain, before any
guidance work: a guided step decodes 2 rows per prompt (target and guidance).

    python benchmarks/batch_ceiling.py [--threads 1,2] [--seqs 1,2,4,8] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

from safeinfer_local.core.models import default_model_path
from safeinfer_local.llama.engine import Model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seqs", default="1,2,3,4,6,8")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    seqs = [int(x) for x in a.seqs.split(",")]
    m = Model(default_model_path())
    print("threads  seqs  ms/step  ms/row  gain vs 1 seq (best of 3)")
    for threads in (int(x) for x in a.threads.split(",")):
        ctx = m.context(n_ctx=1024, n_seq_max=max(seqs), n_threads=threads)
        one = None
        for n in seqs:
            best = float("inf")
            for _ in range(3):
                ctx.clear()
                ctx.decode_multi([(s, [2, 100 + s]) for s in range(n)])
                t0 = time.perf_counter()
                for k in range(a.steps):
                    ctx.decode_multi([(s, [200 + k]) for s in range(n)])
                best = min(best, (time.perf_counter() - t0) / a.steps)
            one = best if n == 1 else one
            gain = f"{one * n / best:.2f}x" if one else "-"
            print(f"{threads:7}  {n:4}  {best * 1000:7.1f}  {best * 1000 / n:6.1f}  {gain}", flush=True)


if __name__ == "__main__":
    main()
