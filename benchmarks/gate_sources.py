"""Which gate read holds on prompt sources it never saw? Leave-one-source-out over the gate's dev sources.

Reads every dev source's features once per frame for a grid of reads (blocks x tails x pooling, final token
included, and the shipped gate's head read for comparison), caches them (--cache, an .npz), and prints, per read
and method, the leave-one-source-out figures of core.gate.loso_scores (a harmful and a benign source held out at a
time, the rest fitted): per source the lowest AUROC and TPR at --fpr over the sources it was paired with, and for a
benign source the share flagged at the threshold from the other benign sources' held-out scores, per frame.

    python benchmarks/gate_sources.py --cache /tmp/gate_feats.npz [--frames template,none,qa] [--top 15] [--fit-all]

--fit-all then fits each of the top reads on every source, as a shipped gate would be, and scores prompts disjoint
from all of them (bench harm's evaluation sets, the held-out 40).
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


def eval_sets() -> dict[str, list[str]]:
    """Prompts disjoint from every dev source: bench harm's evaluation sets and benchmarks/data's held-out 40."""
    import json

    from safeinfer_local.core.datasets import advbench, catqa, xstest

    held = [json.loads(x) for x in (Path(__file__).with_name("data") / "gate_heldout.jsonl").read_text()
            .splitlines() if x.strip()]
    return {"catqa+advbench-eval": [p.text for p in catqa(10)] + [p.text for p in advbench("eval")],
            "xstest-safe-eval": [p.text for p in xstest("safe")[0::2]],
            "xstest-unsafe-eval": [p.text for p in xstest("unsafe")[0::2]],
            "heldout-harmful": [r["prompt"] for r in held if r["harmful"]],
            "heldout-benign": [r["prompt"] for r in held if not r["harmful"]]}


def fit_all_and_evaluate(si: SafeInfer, feats: dict, frames: list[str], reads, fpr: float) -> None:
    """A gate fitted on every dev source (what `vectors gate` would ship), on the evaluation sets: AUROC of the
    harmful sets against XSTest safe, of XSTest unsafe against safe, of the held-out 40, and the shares flagged at
    the LOSO threshold (the benign sources' held-out scores; other fits', so only roughly on this fit's scale)."""
    from safeinfer_local.core.gate import _direction, auroc
    from safeinfer_local.decode.gating import FeatureReader

    sets = eval_sets()
    reader = FeatureReader(si.model, tuple(sorted({b for r, _ in reads for b in r.blocks})), si.n_ctx, si.n_threads)
    names = sorted({n for _, n in feats})
    for f in frames:
        ev = {k: reader.features_grid([si.encode_prompt(p, frame=f)[0] for p in v], tuple({r for r, _ in reads}))
              for k, v in sets.items()}
        for r, m in reads:
            h = np.concatenate([feats[f, n][1][r] for n in names if feats[f, n][0]]).astype(np.float64)
            b = np.concatenate([feats[f, n][1][r] for n in names if not feats[f, n][0]]).astype(np.float64)
            g = _direction(h, b, m, 0.1)
            thr = loso_scores([Source(n, feats[f, n][0], feats[f, n][1][r]) for n in names], m, fpr)["threshold"]
            sc = {k: g.score(v[r]) for k, v in ev.items()}
            flag = {k: float(np.mean(v >= thr)) for k, v in sc.items()}
            print(f"{f:8s} {r.describe():44s} {m:9s} AUROC harmful/xstest-safe "
                  f"{auroc(sc['catqa+advbench-eval'], sc['xstest-safe-eval']):.3f}, xstest unsafe/safe "
                  f"{auroc(sc['xstest-unsafe-eval'], sc['xstest-safe-eval']):.3f}, held-out 40 "
                  f"{auroc(sc['heldout-harmful'], sc['heldout-benign']):.3f} | flagged: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in flag.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--frames", default="template,none,qa")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--fit-all", action="store_true", help="Also fit the top reads on every source and score the "
                    "evaluation sets.")
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
    # by the worst held-out harmful source's TPR, then (ties) by the mean AUROC over sources and frames
    rows.sort(key=lambda x: (-x[0], -np.mean([s["auroc"] for p in x[3].values() for s in p["sources"]])))
    shipped = [x for x in rows if not x[1].final and x[1].blocks == (2,) and x[2] == "lda"]
    for worst, r, m, per in rows[: a.top] + shipped:
        print(f"\n{r.describe()}, {m}: worst held-out harmful source's TPR at {a.fpr:.0%} FPR: {worst:.2f}")
        for f, p in per.items():
            print(f"  {f:8s} " + "  ".join(
                f"{x['source']}: AUROC {x['auroc']:.3f} " + (f"TPR {x['tpr']:.2f}" if x["harmful"] else
                                                            f"FPR {x['fpr']:.2f}") for x in p["sources"]))
    if a.fit_all:
        print("\nfitted on every dev source, scored on the evaluation sets:")
        fit_all_and_evaluate(si, feats, frames, [(r, m) for _, r, m, _ in rows[: a.top] + shipped], a.fpr)


if __name__ == "__main__":
    main()
