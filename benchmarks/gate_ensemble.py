"""Several reads of one decode, their scores averaged: what it does to leave-one-source-out and to the evaluation sets.

The shipped gate scores a prompt with one read (block 8, the last 16 prompt tokens, shrinkage LDA). The reader's
decode computes every block's output anyway, so a gate could fit one direction per read and average their scores.
Here each read's score is put on a common scale (0 at the mean of its fit's benign dev scores, 1 at the mean of its
harmful ones) and the scaled scores are averaged (``core.gate``'s parts, as ``vectors gate`` fits them). Per frame,
over the nine shipped dev sources read bare:

- leave-one-source-out as in ``vectors gate`` (``core.gate.loso_scores``): for every pair of a harmful and a benign
  source, every read is fitted on the seven others and the pair is scored; the worst held-out source's AUROC and
  TPR at 5% FPR, the mean over sources of each one's lowest AUROC (what ``vectors gate`` breaks ties with), and the
  threshold from the benign sources' held-out scores;
- fitted on all nine, the evaluation sets of ``benchmarks/gate_eval.py`` bare and in HarmEval's ``simple`` wrapper
  (the cache of ``benchmarks/gate_twins.py``): AUROC (mean/lowest over frames and wrappers), and at the threshold
  the share flagged of CatQA's 110 evaluation prompts alone (the ``bench harm`` guard rows' set), of the bench sets'
  470 harmful and 125 benign prompts, and of the held-out 40.

    python benchmarks/gate_ensemble.py --cache /tmp/gate_feats.npz --eval-cache /tmp/gate_twin_eval.npz

Both caches are read by the scripts that write them (``benchmarks/gate_sources.py --cache``,
``benchmarks/gate_twins.py --eval-cache``); this one only fits (under a minute).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gate_twins import DEV, FRAMES, eval_features

from safeinfer_local.core.gate import Source, auroc, fit_sources, loso_scores

FPR, N_CATQA = 0.05, 110
ENSEMBLES = (((8, 16),), ((10, 4),), ((8, 16), (10, 4)), ((8, 16), (12, 4)), ((8, 16), (10, 4), (12, 4), (14, 4)),
             ((8, 16), (10, 4), (12, 4), (14, 4), (10, 16), (12, 16)))


def frame_row(dev: np.lib.npyio.NpzFile, ev: dict, frame: str, reads: tuple) -> list[tuple]:
    """The leave-one-source-out and evaluation figures of the mean of ``reads``, fitted on the dev sources."""
    srcs = [Source(n, h, np.hstack([dev[f"{frame}|{n}|{b}|{t}|1|mean"] for b, t in reads]).astype(np.float64))
            for n, h in DEV.items()]
    lo = loso_scores(srcs, "lda", FPR, parts=len(reads))
    g = fit_sources(srcs, "lda", FPR, loso=lo, parts=len(reads))
    mean_auc = float(np.mean([s["auroc"] for s in lo["sources"]]))
    got = []
    for w in ("plain", "simple"):
        s = {k: g.score(np.hstack([ev[f"{frame}|{k}|{w}|{b}|{t}"] for b, t in reads]).astype(np.float64))
             for k in ("harmful", "benign", "xunsafe", "held_h", "held_b")}
        flag = {k: float(np.mean(v >= g.threshold)) for k, v in s.items()}
        got.append((lo["worst_auroc"], lo["worst_tpr"], mean_auc, auroc(s["harmful"], s["benign"]),
                    auroc(s["xunsafe"], s["benign"]), auroc(s["held_h"], s["held_b"]),
                    float(np.mean(s["harmful"][:N_CATQA] >= g.threshold)), flag["harmful"], flag["benign"],
                    flag["held_h"], flag["held_b"]))
    return got


def spread(a: np.ndarray, i: int, high: bool = False) -> str:
    """Column ``i``'s mean and lowest (``high``: highest) value."""
    return f"{a[:, i].mean():.3f}/{(a[:, i].max() if high else a[:, i].min()):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, required=True, help="benchmarks/gate_sources.py's --cache")
    ap.add_argument("--eval-cache", type=Path, required=True, help="benchmarks/gate_twins.py's --eval-cache")
    args = ap.parse_args()
    dev, ev = np.load(args.cache), eval_features(args.eval_cache)
    print("reads (block/last)          | leave-one-source-out  | evaluation AUROC mean/lowest:          | at the "
          "threshold, mean/lowest (FPR mean/highest):")
    print("                            | worst AUROC TPR5 mean | bench sets   XSTest pairs  held-out 40 | CatQA      "
          "bench TPR   bench FPR   held TPR    held FPR")
    for reads in ENSEMBLES:
        a = np.array([g for f in FRAMES for g in frame_row(dev, ev, f, reads)])
        name = " + ".join(f"{b}/{t}" for b, t in reads)
        print(f"{name:27s} | {a[:, 0].min():.2f}  {a[:, 1].min():.2f}  {a[:, 2].mean():.3f} | {spread(a, 3)}  "
              f"{spread(a, 4)}  {spread(a, 5)} | {spread(a, 6)} {spread(a, 7)} {spread(a, 8, True)} "
              f"{spread(a, 9)} {spread(a, 10, True)}", flush=True)


if __name__ == "__main__":
    main()
