"""How often does greedy text with ``--speculate K`` differ from ``--speculate 0``? Speculative verification is
exact on the rows it is given (``core.speculative``), so a difference can only come from llama.cpp not being batch
invariant: the guidance side decodes K positions in one batch instead of one at a time, and a batch of 4 or more
tokens takes other matrix kernels on this CPU, whose logits differ from one-token steps (measured below on the first
prompt: the largest change of a top-20 log-probability).

60 prompts disjoint from every demonstration and dev set: 30 CatQA evaluation-part questions (harmful,
spread over its categories) and 30 XSTest `safe` prompts (benign), `qa` frame,
``safeinfer`` with the shipped settings, gate off, greedy, 64 tokens.

    python benchmarks/speculate_agreement.py [--ks 1,2,4,8] [--tokens 64] [--threads N]   # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from safeinfer_local.api import SafeInfer
from safeinfer_local.core import datasets
from safeinfer_local.core.sampling import log_softmax

ROOT = Path(__file__).resolve().parents[1]


def prompts() -> list[tuple[str, str]]:
    harm = datasets.catqa(part="eval")
    step = max(1, len(harm) // 30)
    benign = [p for p in datasets.xstest("safe") if int(p.id.split("-")[-1]) % 2 == 0]
    bstep = max(1, len(benign) // 30)
    return [("harmful", p.text) for p in harm[::step][:30]] + [("benign", p.text) for p in benign[::bstep][:30]]


def batch_drift(si: SafeInfer, text: str, ks: list[int]) -> dict[int, float]:
    """Largest |Δ log-prob| over each position's top 20 tokens: rows decoded K at a time vs one at a time."""
    m = si.model
    toks = si.encode_prompt(text, frame="qa")[0]
    ctx = m.context(n_ctx=512, n_seq_max=1, n_threads=si.n_threads)
    head, rest = toks[:-16], toks[-16:]
    ctx.decode(head, logits="none")
    one = log_softmax(np.stack([ctx.decode([t], logits="last") for t in rest]))
    top = np.argsort(-one, axis=1)[:, :20]
    out = {}
    for k in ks:
        ctx.truncate(0, 0)
        ctx.decode(head, logits="none")
        rows = log_softmax(np.concatenate([ctx.decode(rest[j:j + k], logits="all") for j in range(0, 16, k)]))
        out[k] = float(np.abs(np.take_along_axis(rows, top, 1) - np.take_along_axis(one, top, 1)).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "speculate_agreement.json"))
    a = ap.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    si = SafeInfer.default(n_threads=a.threads, gate="off")
    ps = prompts()
    gen = dict(variant="safeinfer", frame="qa", max_tokens=a.tokens, temperature=0)
    t0 = time.perf_counter()
    ref = [si.generate(p, **gen) for _, p in ps]
    rows = {}
    for k in ks:
        sk = si.with_(speculate=k)
        same = {"harmful": 0, "benign": 0}
        n = {"harmful": 0, "benign": 0}
        drafted = accepted = 0
        first_diff = []
        for (kind, p), r0 in zip(ps, ref, strict=True):
            r = sk.generate(p, **gen)
            n[kind] += 1
            same[kind] += r.response == r0.response
            drafted += r.drafted
            accepted += r.accepted
            if r.response != r0.response:
                a0, a1 = r0.response, r.response
                j = next((i for i, (x, y) in enumerate(zip(a0, a1, strict=False)) if x != y), min(len(a0), len(a1)))
                first_diff.append(j)
        rows[k] = {"identical": same["harmful"] + same["benign"], "of": len(ps),
                   "identical_harmful": same["harmful"], "identical_benign": same["benign"],
                   "acceptance": accepted / drafted if drafted else None, "drafted": drafted,
                   "first_difference_at_char_median": float(np.median(first_diff)) if first_diff else None}
        print(f"K={k}: {rows[k]['identical']}/{len(ps)} identical (harmful {same['harmful']}/{n['harmful']}, "
              f"benign {same['benign']}/{n['benign']}), acceptance {rows[k]['acceptance']:.1%}", flush=True)
    drift = batch_drift(si, ps[0][1], [k for k in ks if k > 1] or [2])
    for k, d in drift.items():
        print(f"batch of {k}: largest top-20 log-prob change vs one-token steps {d:.4f}")
    res = {"model": si.model.name, "settings": si.settings.describe("safeinfer"), "prompts": len(ps),
           "tokens": a.tokens, "frame": "qa", "greedy": True, "by_k": rows, "batch_drift_top20_logprob": drift,
           "guided_tokens_k0": sum(r.guided_tokens for r in ref), "seconds": round(time.perf_counter() - t0, 1)}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
