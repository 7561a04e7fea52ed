"""What `vectors build` costs as models grow: build time against blocks x width on tiny random-weight GGUFs
(tests/tiny_gguf.py), a cost model fitted to it, calibrated on the real default model, and extrapolated to 1B/3B/8B
shapes. Raw figures go to docs/results/build_cost.json; BUILD.md ("Build cost") has the tables.

    python benchmarks/build_cost.py [--threads 1] [--layers 2,4,8] [--widths 64,128,256]

Every stage of a build is timed from its own progress (workflows/build.py's meter): its forward passes, the prompt
tokens they decode, seconds. The cost model, fitted on the stages of every tiny build:

    seconds = a * passes + b * weight MACs + c * attention MACs

a is the fixed cost of a forward pass (graph build, Python, the capture callback). Weight MACs = tokens x n_layer x
(the block's weights: Q, K, V, O and the FFN; 12-16 n_embd^2 in every shape here, so the per-token cost scales with
n_layer x n_embd^2) + logit rows x n_vocab x n_embd (the output layer: one row per capture pass, every tail token in
fv's head scan; on Gemma 3 270M's 262k vocabulary a row costs more than all 18 blocks). Attention MACs = new tokens x
context length x n_layer x the attention width, summed over passes (most of the work on the tiny models, whose
prompts are long for their width; ~2% of it on an 8B model). b is then recalibrated on short builds of the real
default model (quantized weights, real kernels; a and c kept), and the default builds (100 in-context prompts of
10 shots; fv: 16 AIE prompts, --max-heads 64 or every head) are extrapolated to other shapes with the default
model's token counts (a Llama 3 tokenizer's would differ a little). CPU figures only: nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safeinfer_local.core.demos import N_PROMPTS, N_SHOTS, icl_prompts, load_demos, qa_prompt  # noqa: E402
from safeinfer_local.core.fv import DEFAULT_MAX_HEADS, SCREEN_PROMPTS  # noqa: E402
from safeinfer_local.core.models import resolve_model  # noqa: E402
from safeinfer_local.llama.engine import Model  # noqa: E402
from safeinfer_local.workflows import build  # noqa: E402
from tests.tiny_gguf import write_tiny_gguf  # noqa: E402

DEMOS = ROOT / "vectors" / "safe_demos.jsonl"
# name -> (n_layer, n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab): the shapes the default builds are
# extrapolated to (the models' published configurations)
TARGETS = {"Gemma 3 270M": (18, 640, 4, 1, 256, 2048, 262144), "Llama-3.2-1B": (16, 2048, 32, 8, 64, 8192, 128256),
           "Llama-3.2-3B": (28, 3072, 24, 8, 128, 8192, 128256),
           "Llama-3.1-8B": (32, 4096, 32, 8, 128, 14336, 128256)}


def shape_of(model: Model) -> tuple[int, ...]:
    a = model.arch
    kv = int(model.meta(f"{a}.attention.head_count_kv") or model.n_head)
    ff = int(model.meta(f"{a}.feed_forward_length"))
    return model.n_layer, model.n_embd, model.n_head, kv, model.head_dim(), ff, model.n_vocab


def block_macs(shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per token in one block's weights: Q and O (n_head x head_dim), K and V (n_head_kv x
    head_dim), the gated FFN (3 x n_ff)."""
    _, d, h, kv, hd, ff, _ = shape
    return 2 * d * h * hd + 2 * d * kv * hd + 3 * d * ff


class _Timed(build._Meter):
    """The build's meter, also recording when each stage began and when its last pass ended."""

    log: dict[str, dict] = {}

    def begin(self, stage: str) -> None:
        super().begin(stage)
        _Timed.log[stage] = {"begin": time.perf_counter()}

    def step(self, stage: str, tokens: int) -> None:
        super().step(stage, tokens)
        _Timed.log[stage]["end"] = time.perf_counter()


def timed_build(model: Model, method: str, threads: int | None, **kw) -> dict:
    """One build; per stage its passes, tokens and seconds (fv: also the effect-size step and the projection)."""
    build._Meter = _Timed
    _Timed.log = {}
    notes: list[str] = []
    t0 = time.perf_counter()
    v = build.build_vector(model, load_demos(DEMOS), method=method, layers=(max(1, model.n_layer // 2),),
                           note=notes.append, n_threads=threads, **kw)
    total = time.perf_counter() - t0
    build._Meter = _Timed.__bases__[0]
    plan = {s.name: s for s in _plan(model, method, kw)}
    work = _work(model, method, kw)
    stages = {}
    for name, t in _Timed.log.items():
        if "end" not in t:  # a stage with no passes (fv's heads step when every prompt was screened)
            continue
        stages[name] = {"passes": plan[name].passes, "tokens": plan[name].tokens, "attention": work[name][0],
                        "logit_rows": work[name][1], "seconds": t["end"] - t["begin"]}
    last = max(t["end"] for t in _Timed.log.values() if "end" in t)
    first = min(t["begin"] for t in _Timed.log.values())
    stages["before"] = {"seconds": first - t0}  # the control-vector probe, tokenizing, the plan
    stages["after"] = {"seconds": t0 + total - last}  # after the last pass: fv's W_O read and projection
    return {"method": method, "seconds": total, "stages": stages, "plan": notes[0],
            "heads_scanned": v.meta.get("heads_scanned")}


def _prompts(model, method: str, kw: dict):
    demos = load_demos(DEMOS)
    prompts = icl_prompts(demos, kw.get("n_prompts", N_PROMPTS), kw.get("n_shots", N_SHOTS), 0)
    icl = [model.tokenize(qa_prompt(q, s), add_bos=True) for q, s in prompts]
    queries = ([model.tokenize(qa_prompt(q), add_bos=True) for q in sorted({q for q, _ in prompts})]
               if method == "mean-diff" else [])
    corrupted = (build._corrupted_prompts(model, demos, kw.get("aie_prompts", build.DEFAULT_AIE_PROMPTS))
                 if method == "fv" else [])
    return icl, queries, corrupted


def _plan(model, method: str, kw: dict) -> tuple[build.Stage, ...]:
    icl, queries, corrupted = _prompts(model, method, kw)
    return build.plan_build(model, method, icl, queries, corrupted, kw.get("max_heads", DEFAULT_MAX_HEADS)).stages


def _work(model, method: str, kw: dict) -> dict[str, tuple[int, int]]:
    """Per stage: (the sum over passes of new tokens x context length at the end of the pass, logit rows)."""
    icl, queries, corrupted = _prompts(model, method, kw)
    out = {"capture": (sum(len(t) ** 2 for t in icl + queries), len(icl) + len(queries))}
    if method == "fv":
        total = model.n_layer * model.n_head
        budget = kw.get("max_heads", DEFAULT_MAX_HEADS)
        k = min(SCREEN_PROMPTS, len(corrupted)) if budget < total else 0

        def work(prompts, runs: int) -> tuple[int, int]:  # the prefix, then `runs` tail decodes (every row's logits)
            return (sum((len(c.prompt) - 1) ** 2 + runs * len(c.tail) * (len(c.prompt) - 1 + len(c.tail))
                        for c in prompts), sum(runs * len(c.tail) for c in prompts))

        if k:
            out["screen"] = work(corrupted[:k], total + 1)
        out["heads"] = work(corrupted[k:], min(budget, total) + 1)
    return out


def _terms(s: dict, shape: tuple[int, ...]) -> list[float]:
    """passes, weight MACs, attention MACs of a stage."""
    L, d, h, _, hd, _, vocab = shape
    return [s["passes"], s["tokens"] * L * block_macs(shape) + s["logit_rows"] * vocab * d,
            s["attention"] * L * h * hd]


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares for seconds = a * passes + b * weight MACs + c * attention MACs over every timed stage, each
    weighted by 1 / its seconds (relative error: big stages do not drown small ones)."""
    X, y = [], []
    for r in rows:
        for s in r["stages"].values():
            if "passes" in s:
                X.append([t / s["seconds"] for t in _terms(s, tuple(r["shape"]))])
                y.append(1.0)
    (a, b, c), *_ = np.linalg.lstsq(np.array(X), np.array(y), rcond=None)
    return float(a), float(b), float(c)


def predict(coef: tuple[float, float, float], stages: list[dict], shape: tuple[int, ...]) -> float:
    return sum(k * t for s in stages if "passes" in s for k, t in zip(coef, _terms(s, shape), strict=True))


def _fmt(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="1: a busy 2-core machine is steadier on one thread")
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "build_cost.json"))
    a = ap.parse_args()
    small = {"mean-diff": dict(n_prompts=12, n_shots=4),
             "fv": dict(n_prompts=12, n_shots=4, aie_prompts=4, max_heads=8, heads=4)}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for L in map(int, a.layers.split(",")):
            for w in map(int, a.widths.split(",")):
                m = Model(write_tiny_gguf(Path(d) / f"t{L}x{w}.gguf", n_layer=L, n_embd=w, n_head=4))
                for method, kw in small.items():
                    r = timed_build(m, method, a.threads, **kw)
                    r.update(n_layer=L, n_embd=w, n_head=4, shape=shape_of(m), settings=kw)
                    rows.append(r)
                    print(f"{method:9} {L} x {w:3}: {r['seconds']:6.2f} s  " + ", ".join(
                        f"{k} {v['seconds']:.2f} s" for k, v in r["stages"].items()), flush=True)
    ca, cb, cc = fit(rows)
    for r in rows:
        r["model_seconds"] = predict((ca, cb, cc), list(r["stages"].values()), tuple(r["shape"]))
    print(f"fit on tiny models: {ca * 1e3:.2f} ms per pass + {cb * 1e12:.1f} ps per weight MAC + "
          f"{cc * 1e12:.1f} ps per attention MAC")

    # calibration on the real default model: short builds with its real prompts (10 shots)
    g = Model(resolve_model(None))
    calib = {"mean-diff": dict(n_prompts=8), "fv": dict(n_prompts=8, aie_prompts=2, max_heads=8, heads=4)}
    real = []
    for method, kw in calib.items():
        r = timed_build(g, method, a.threads, **kw)
        r.update(n_layer=g.n_layer, n_embd=g.n_embd, n_head=g.n_head, shape=shape_of(g), settings=kw)
        real.append(r)
        print(f"{g.name} {method}: {r['seconds']:.1f} s  " + ", ".join(
            f"{k} {v['seconds']:.2f} s" for k, v in r["stages"].items()), flush=True)
    # the per-token cost on real weights, the per-pass cost kept from the tiny fit
    num = den = 0.0
    for r in real:
        for s in r["stages"].values():
            if "passes" in s:
                pa, pb, pc = _terms(s, tuple(r["shape"]))
                num += s["seconds"] - ca * pa - cc * pc
                den += pb
    gb = num / den
    for r in real:
        r["model_seconds"] = predict((ca, gb, cc), list(r["stages"].values()), tuple(r["shape"]))
    print(f"calibrated on {g.name}: {gb * 1e12:.1f} ps per weight MAC ({gb / cb:.2f}x the tiny fit)")

    # the default builds, with the default model's token counts, at each target shape
    default = {"mean-diff": {}, f"fv --max-heads {DEFAULT_MAX_HEADS}": dict(max_heads=DEFAULT_MAX_HEADS),
               "fv, every head": dict(max_heads=10**6)}
    extrap = []
    for name, shape in TARGETS.items():
        L, w, H = shape[:3]
        proxy = _Shape(g, L, H)
        for label, kw in default.items():
            method = "mean-diff" if label == "mean-diff" else "fv"
            work = _work(proxy, method, kw)
            stages = [{"name": s.name, "passes": s.passes, "tokens": s.tokens, "attention": work[s.name][0],
                       "logit_rows": work[s.name][1]} for s in _plan(proxy, method, kw)]
            extrap.append({"model": name, "n_layer": L, "n_embd": w, "n_head": H, "shape": shape, "build": label,
                           "passes": sum(s["passes"] for s in stages), "tokens": sum(s["tokens"] for s in stages),
                           "stages": stages, "cpu_seconds": predict((ca, gb, cc), stages, shape)})
    print(f"\n{'model':14} {'shape':>10} {'build':18} {'passes':>7} {'tokens':>9} {'this CPU (1 thread)':>20}")
    for e in extrap:
        print(f"{e['model']:14} {e['n_layer']:>3} x {e['n_embd']:<5} {e['build']:18} {e['passes']:>7,} "
              f"{e['tokens']:>9,} {_fmt(e['cpu_seconds']):>20}")
    Path(a.out).write_text(json.dumps({
        "threads": a.threads, "machine": "2-core CPU, shared with other jobs", "tiny": rows,
        "fit": {"per_pass_s": ca, "per_weight_mac_s": cb, "per_attention_mac_s": cc},
        "default_model": real,
        "calibrated_per_weight_mac_s": gb, "extrapolation": extrap}, indent=1) + "\n")


class _Shape:
    """The default model's tokenizer under another shape: what plan_build needs to count a build's passes and
    tokens for a model of n_layer blocks x n_head heads (token counts are the default model's)."""

    def __init__(self, model: Model, n_layer: int, n_head: int) -> None:
        self._m, self.n_layer, self.n_head = model, n_layer, n_head

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._m.tokenize(text, add_bos=add_bos)


if __name__ == "__main__":
    main()
