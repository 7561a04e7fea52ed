"""Inter-token latency of running streams while a long prompt is admitted, with and without chunked prefill.

Four streams decode (greedy, gate off) in the generator serve runs (``SafeInfer.batch(..., layout="split")``); once
each has produced ``--warm`` tokens, the gaps between their tokens are recorded for ``--window`` steps ("steady"),
then a prompt of about ``--long`` tokens arrives and the gaps are recorded until it produces its first token
("admission"). ``prefill_chunk`` 0 decodes the long prompt's head whole inside one step (every stream waits for
it); N > 0 decodes N tokens of it per step between the streams' steps. Each setting runs ``--rounds`` times,
alternating, and the figures are per setting over all rounds. A figure, never an assertion.

    python benchmarks/prefill_latency.py [--chunks 0,16,32,64] [--variants base,safeinfer] [--json FILE]

A variant written ``safeinfer@shared`` runs the shared layout instead (both sides in one context, the vector added
per row; it needs ``negative`` guidance, so that guidance is used for it); ``safeinfer@split/prompt`` names the
guidance source too (here ``prompt``: both sides carry a prefix of demonstrations).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from safeinfer_local.api import SafeInfer
from safeinfer_local.decode.batch import GenConfig

STREAM_PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain how bread rises, step by step.",
                  "List some facts about the planet Mars.", "Describe a walk through a quiet forest in autumn.")
PARAGRAPH = ("The history of the printing press is a story of many hands. Early presses used carved wooden "
             "blocks, and later movable metal type made it possible to print books far faster than scribes "
             "could copy them. Printers travelled between cities, carrying their skills and their tools. ")


def long_prompt(si: SafeInfer, n_tokens: int) -> str:
    text = ""
    while len(si.model.tokenize(text + PARAGRAPH)) < n_tokens:
        text += PARAGRAPH
    return text + "Summarise the passage above in one sentence."


def run(si: SafeInfer, variant: str, chunk: int, long_text: str, warm: int, window: int,
        layout: str = "split") -> dict:
    gen = si.batch(variant, slots=5, layout=layout, prefill_chunk=chunk)
    cfg = GenConfig(max_tokens=warm + window + 400, temperature=0.0)
    for k, p in enumerate(STREAM_PROMPTS):
        gen.insert(k, si.encode_prompt(p)[0], cfg, p)
    last: dict = {}
    counts = dict.fromkeys(range(len(STREAM_PROMPTS)), 0)
    steady: list[float] = []
    during: list[float] = []
    phase, t_long, ttft, steps = "warm", 0.0, None, 0
    long_toks = si.encode_prompt(long_text)[0]
    while gen and ttft is None:
        events = gen.step()
        now = time.perf_counter()
        for ev in events:
            if ev.key == "long":
                if ev.step is not None and ttft is None:
                    ttft = now - t_long
                continue
            if ev.step is None:
                continue
            if ev.key in last and phase != "warm":
                (steady if phase == "steady" else during).append(now - last[ev.key])
            last[ev.key] = now
            counts[ev.key] += 1
        if phase == "warm" and min(counts.values()) >= warm:
            phase = "steady"
        elif phase == "steady":
            steps += 1
            if steps >= window:
                phase, t_long = "admission", time.perf_counter()
                gen.insert("long", long_toks, GenConfig(max_tokens=4, temperature=0.0), long_text)
    for key in [*range(len(STREAM_PROMPTS)), "long"]:
        gen.remove(key)
    return {"steady": steady, "during": during, "ttft": ttft, "long_tokens": len(long_toks)}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1000) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="0,16,32,64")
    ap.add_argument("--variants", default="base,safeinfer")
    ap.add_argument("--long", type=int, default=1500)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--window", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    si = SafeInfer.default(gate="off")
    text = long_prompt(si, a.long)
    chunks = [int(c) for c in a.chunks.split(",")]
    out: dict = {"long_prompt_tokens": len(si.encode_prompt(text)[0]), "streams": len(STREAM_PROMPTS), "rows": []}
    for spec in a.variants.split(","):
        variant, _, how = spec.partition("@")
        layout, _, guidance = how.partition("/")
        layout = layout or "split"
        sv = si.with_(guidance=guidance or ("negative" if layout == "shared" else None))
        runs = {c: {"steady": [], "during": [], "ttft": []} for c in chunks}
        run(sv, variant, 0, long_prompt(si, 64), 2, 2, layout)  # warm-up: every side made, prefixes decoded
        for _ in range(a.rounds):
            for c in chunks:
                r = run(sv, variant, c, text, a.warm, a.window, layout)
                runs[c]["steady"] += r["steady"]
                runs[c]["during"] += r["during"]
                runs[c]["ttft"].append(r["ttft"])
        for c, r in runs.items():
            row = {"variant": variant, "layout": layout, "guidance": sv.guidance.kind, "prefill_chunk": c,
                   "steady_p50_ms": pct(r["steady"], 50), "steady_p95_ms": pct(r["steady"], 95),
                   "admission_p50_ms": pct(r["during"], 50), "admission_p95_ms": pct(r["during"], 95),
                   "admission_max_ms": max(r["during"]) * 1000 if r["during"] else float("nan"),
                   "long_ttft_s": float(np.median(r["ttft"]))}
            row["p95_ratio"] = row["admission_p95_ms"] / row["steady_p95_ms"]
            out["rows"].append(row)
            print(f"{spec:16s} chunk {c:3d}: steady p50/p95 {row['steady_p50_ms']:6.1f}/{row['steady_p95_ms']:6.1f}"
                  f" ms; during admission p50/p95/max {row['admission_p50_ms']:6.1f}/{row['admission_p95_ms']:6.1f}/"
                  f"{row['admission_max_ms']:7.1f} ms (p95 x{row['p95_ratio']:.2f}); long prompt's first token "
                  f"after {row['long_ttft_s']:.2f} s", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
