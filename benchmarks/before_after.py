"""Decode speed of this tree against another checkout of the project, side by side in one run.

Runs ``python cli.py bench speed --json`` alternately in the two trees (each on its own code: PYTHONPATH points
at the tree), ``--pairs`` times, and keeps each variant's best tokens/s per tree. Prints per variant the
before/after ratio of the greedy rows and, for this tree, sampled (T 0.8, top-k 40, top-p 0.95) ÷ greedy.
A figure, never an assertion: this machine is noisy, so the two trees are interleaved.

    git worktree add /tmp/before <commit>      # or: git archive <commit> | tar -x -C /tmp/before
    python benchmarks/before_after.py --before /tmp/before [--pairs 3] [--tokens 64] [--out docs/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def bench(tree: Path, tokens: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, str(tree / "cli.py"), "bench", "speed", "--tokens", str(tokens), "--rounds",
                        "1", "--json"], capture_output=True, text=True, env=env, cwd=tree, check=True)
    return json.loads(p.stdout)["results"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, required=True, help="another checkout of the project")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    best: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    t0 = time.time()
    for i in range(a.pairs):
        for name, tree in (("before", a.before.resolve()), ("after", HERE)):
            for k, r in bench(tree, a.tokens).items():
                best[name][k] = max(best[name].get(k, 0.0), r["tokens_per_s"])
        print(f"pair {i + 1}/{a.pairs} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for k in best["after"]:
        b, n = best["before"].get(k), best["after"][k]
        greedy = best["after"].get(k.replace(" (sampled)", ""))
        row = {"run": k, "before_tok_s": b, "after_tok_s": n, "after_vs_before": n / b if b else None,
               "sampled_vs_greedy": n / greedy if "(sampled)" in k and greedy else None}
        rows.append(row)
        print(f"{k:22} before {b or float('nan'):6.1f}  after {n:6.1f}  "
              f"after/before {row['after_vs_before'] or float('nan'):5.2f}  "
              f"sampled/greedy {row['sampled_vs_greedy'] or float('nan'):5.2f}")
    if a.out:
        a.out.write_text(json.dumps({"tokens": a.tokens, "pairs": a.pairs, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
