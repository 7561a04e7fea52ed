"""Prompts per minute: ``screen`` (the harm gate alone, many prompts per decode) against ``filter`` (a reply per
prompt) on the same prompts, side by side in one process; then the gate's reader alone with the graph cut after the
last block it reads (what ``screen`` runs) against the whole graph, alternating, ``--rounds`` each. A figure, never
an assertion.

    python benchmarks/screen_throughput.py [--prompts 24] [--max-tokens 64] [--parallel 4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.datasets import catqa, xstest
from safeinfer_local.decode.gating import FeatureReader
from safeinfer_local.workflows import filter as flt
from safeinfer_local.workflows import inputs, screen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    texts = [p.text for p in catqa(2)][: a.prompts // 2] + [p.text for p in xstest("safe")[0::2]][: a.prompts // 2]
    items = [inputs.Item(i, str(i), t) for i, t in enumerate(texts)]
    si = SafeInfer.default()
    with contextlib.redirect_stdout(io.StringIO()):  # the records (no -o) are not the point here
        screen.run(si, items[:2])  # warm-up: the gate's reading context
        t0 = time.perf_counter()
        s = screen.run(si, items)
        t_screen = time.perf_counter() - t0
        t0 = time.perf_counter()
        f = flt.run(si, items, parallel=a.parallel, max_tokens=a.max_tokens, temperature=0.0)
        t_filter = time.perf_counter() - t0
    n = len(items)
    print(f"{n} prompts: screen {n / t_screen * 60:.0f} prompts/min ({t_screen:.2f} s; flagged "
          f"{s.counts['flagged']}), filter --parallel {a.parallel} -n {a.max_tokens} {n / t_filter * 60:.0f} "
          f"prompts/min ({t_filter:.1f} s; flagged {sum(bool(r.get('flagged')) for r in f.written)}); "
          f"screen / filter = {t_filter / t_screen:.0f}x")
    read = si.gate.read
    toks = [si.encode_prompt(t, frame="template")[0] for t in texts]
    readers = {"cut": FeatureReader(si.model, read.blocks),
               "whole graph": FeatureReader(si.model, read.blocks, cut=False)}
    rates: dict[str, list[float]] = {k: [] for k in readers}
    for r in readers.values():
        r.features(toks[:2], read)  # warm-up
    for _ in range(a.rounds):
        for name, r in readers.items():
            t0 = time.perf_counter()
            r.features(toks, read)
            rates[name].append(n / (time.perf_counter() - t0) * 60)
    print(f"the gate's reader alone (blocks {read.blocks}, final={read.final}), {a.rounds} rounds: "
          + "; ".join(f"{k} {min(v):,.0f}-{max(v):,.0f} prompts/min" for k, v in rates.items()))


if __name__ == "__main__":
    main()
