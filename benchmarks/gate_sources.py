"""Which gate read holds on prompt sources it never saw? Leave-one-source-out over the gate's dev sources.

Reads every dev source's features once per frame for a grid of reads (blocks x tails x pooling, final token
included, and the shipped gate's head read for comparison), caches them (--cache, an .npz), and prints, per read
and method, the leave-one-source-out figures of core.gate.loso_scores (a harmful and a benign source held out at a
time, the rest fitted): per source the lowest AUROC and TPR at --fpr over the sources it was paired with, and for a
benign source the share flagged at the threshold from the other benign sources' held-out scores, per frame.

    python benchmarks/gate_sources.py --cache /tmp/gate_feats.npz [--frames template,none,qa] [--top 15]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.gate import METHODS, Read, Source, loso_scores
from safeinfer_local.workflows.gatebuild import dev_sources

BLOCKS = (4, 6, 8, 10, 12, 14)
READS = tuple(Read((b,), t, True, p) for b in BLOCKS for t, p in ((1, "mean"), (4, "mean"), (4, "max"), (16, "mean"),
                                                                 (16, "max"))) + (Read((2,), 16), Read((12,), 16))


def features(si: SafeInfer, frames: list[str], cache: Path | None) -> dict:
    from safeinfer_local.decode.gating import FeatureReader

    key = lambda f, s, r: f"{f}|{s}|{'+'.join(map(str, r.blocks))}|{r.tail}|{int(r.final)}|{r.pool}"  # noqa: E731
    have = dict(np.load(cache)) if cache and cache.exists() else {}
    sources = dev_sources()
    reader = None
    out = {}
    for f in frames:
        for name, (harmful, prompts) in sources.items():
            if all(key(f, name, r) in have for r in READS):
                feats = {r: have[key(f, name, r)] for r in READS}
            else:
                if reader is None:
                    reader = FeatureReader(si.model, tuple(sorted({b for r in READS for b in r.blocks})), si.n_ctx,
                                           si.n_threads)
                t0 = time.time()
                toks = [si.encode_prompt(p, frame=f)[0] for p in prompts]
                feats = reader.features_grid(toks, READS)
                print(f"{f:8s} {name:22s} {len(prompts):4d} prompts in {time.time() - t0:5.1f} s", flush=True)
                have.update({key(f, name, r): v.astype(np.float32) for r, v in feats.items()})
                if cache:
                    np.savez(cache, **have)
            out[f, name] = (harmful, feats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--frames", default="template,none,qa")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    frames = a.frames.split(",")
    si = SafeInfer(vector="default", n_threads=a.threads)
    feats = features(si, frames, a.cache)
    names = sorted({n for _, n in feats}, key=lambda n: (not feats[frames[0], n][0], n))
    rows = []
    for r in READS:
        for m in METHODS:
            per = {f: loso_scores([Source(n, feats[f, n][0], feats[f, n][1][r]) for n in names], m, a.fpr)
                   for f in frames}
            rows.append((min(p["worst_tpr"] for p in per.values()), r, m, per))
    rows.sort(key=lambda x: -x[0])
    shipped = [x for x in rows if not x[1].final and x[1].blocks == (2,) and x[2] == "lda"]
    for worst, r, m, per in rows[: a.top] + shipped:
        print(f"\n{r.describe()}, {m}: worst held-out harmful source's TPR at {a.fpr:.0%} FPR: {worst:.2f}")
        for f, p in per.items():
            print(f"  {f:8s} " + "  ".join(
                f"{x['source']}: AUROC {x['auroc']:.3f} " + (f"TPR {x['tpr']:.2f}" if x["harmful"] else
                                                            f"FPR {x['fpr']:.2f}") for x in p["sources"]))

if __name__ == "__main__":
    main()
