"""``vectors build``, ``inspect``, ``convert`` and ``sweep``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from ..core.fv import DEFAULT_MAX_HEADS
from ..errors import UsageError
from . import options as o
from .app import vectors_app


@vectors_app.command("build")
def vectors_build(
    demos: Path = typer.Option(..., "--demos", help="JSONL of {prompt, response} safe demonstrations."),
    out: Path = typer.Option(..., "--out", "-o", help="Output control-vector GGUF."),
    model: str | None = o.ModelOpt,
    method: str = typer.Option("mean-diff", "--method", help="fv (function vector) | mean-diff."),
    layer: str | None = typer.Option(None, "--layer", help="Block to write (default ≈ n_layer/3); mean-diff "
                                        "also takes a comma list or 'all'."),
    heads: int = typer.Option(10, "--heads", help="fv: top-K heads by average indirect effect."),
    prompts: int = typer.Option(100, "--prompts", help="In-context prompts averaged (the paper: 100)."),
    shots: int = typer.Option(10, "--shots", help="Demonstrations per prompt (the paper: 10)."),
    aie_prompts: int = typer.Option(16, "--aie-prompts", help="fv: corrupted prompts per head in the AIE ranking."),
    max_heads: int = typer.Option(DEFAULT_MAX_HEADS, "--max-heads", help="fv: heads the AIE scan measures on "
                                  "every prompt; the others are screened on one prompt only (per head one pass "
                                  "instead of --aie-prompts)."),
    gamma: float = typer.Option(1.0, "--gamma", help="Recommended γ to record in the file."),
    positions: str = typer.Option("generation", "--positions", help="Recommended positions to record."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt, force: bool = o.ForceOpt,
) -> None:
    """Build a safety vector from the model's activations on safe demonstrations."""
    from ..core.vectors import VECTOR_FILE
    from ..workflows.build import build_file

    o.check_threads(threads)
    o.check_out(out, VECTOR_FILE, inputs=[("--demos file", demos), o.model_input(model)], force=force)
    with o.Progress() as prog:
        v = build_file(demos, out, model, method, layer, heads, prompts, shots, aie_prompts, gamma, positions, seed,
                       threads, n_gpu_layers, command=o.command_line(), progress=prog, max_heads=max_heads,
                       note=prog.note)
    print(f"wrote {out} ({method}, layers {list(v.layers)}, n_embd {v.n_embd})", file=sys.stderr)


@vectors_app.command("gate")
def vectors_gate(
    vector: Path = typer.Argument(..., help="Vector file to add a harm gate to."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the vector with its gate here (default: "
                                    "update VECTOR in place)."),
    block: str = typer.Option("auto", "--block", help="Block whose output the gate reads, or auto "
                              "(leave-one-source-out over the middle blocks)."),
    method: str = typer.Option("auto", "--method", help="mean-diff | lda | auto."),
    tail: str = typer.Option("auto", "--tail", help="Pool the feature over the prompt's last N tokens, the final "
                             "one included (0: all of them), or auto (4 or 16, by cross-validation)."),
    fpr: float = typer.Option(0.05, "--fpr", help="Share of prompts from a new benign source the threshold may flag "
                              "(set on the benign sources' held-out scores)."),
    harmful: list[str] | None = typer.Option(None, "--harmful", help="A file of harmful dev prompts (any filter "
                                             "input format), one source; repeat for more. Default: the shipped "
                                             "five harmful sources."),
    benign: list[str] | None = typer.Option(None, "--benign", help="A file of benign dev prompts, one source; "
                                            "repeat for more. Default: the shipped four benign sources."),
    per_source: int | None = typer.Option(None, "--max-per-source", help="Read at most N prompts of each source, "
                                          "evenly spaced (default: all; the reads are most of the cost on a large "
                                          "model)."),
    max_parts: int = typer.Option(1, "--max-parts", help="Average up to N reads of the one decode (lda, a block and "
                                  "tail each), adding a read while the leave-one-source-out rank rises (default 1: "
                                  "one read)."),
    on_flag: str | None = typer.Option(None, "--on-flag", help="Record what a flagged prompt should get by default "
                                       "with this vector: steer (the variant) or refuse (the fixed refusal; for a "
                                       "model that cannot be steered into refusing). Default: keep the vector's."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the sweep and the choice; write nothing."),
    model: str | None = o.ModelOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    as_json: bool = o.JsonOpt, force: bool = o.ForceOpt,
) -> None:
    """Fit a harm gate (condition direction, centre and threshold per frame, read from one block's output at the
    prompt's last tokens, or the mean of a few such reads) on dev prompts from several sources, chosen and
    thresholded by leave-one-source-out, and record it in the vector's metadata; llama.cpp still loads the file as
    a control vector."""
    import time

    from ..core.gate import ON_FLAG, check_fpr
    from ..core.settings import check_choice
    from ..core.vectors import VECTOR_FILE
    from ..workflows.gatebuild import build_gate, check_max_parts, check_per_source, check_tail_option

    check_fpr(fpr)
    check_tail_option(tail)
    check_per_source(per_source)
    check_max_parts(max_parts)
    if on_flag is not None:
        check_choice("on-flag", on_flag, ON_FLAG)
    harmful, benign = tuple(harmful or ()), tuple(benign or ())
    for paths, what in ((harmful, "--harmful"), (benign, "--benign")):
        for path in paths:
            if path != "-" and not Path(path).is_file():
                raise UsageError(f"{what} file not found: {path}")
    target = out or vector
    if not dry_run:  # VECTOR itself may be updated in place when it is a vector of ours
        o.check_out(target, VECTOR_FILE, force=force,
                    inputs=[*(("--harmful file", h) for h in harmful), *(("--benign file", b) for b in benign),
                            o.model_input(model)])
    si = o.load(model=model, vector=vector, threads=threads, n_gpu_layers=n_gpu_layers, gate="off")
    t0 = time.perf_counter()
    with o.Progress() as prog:
        gate, rows = build_gate(si, block, method, fpr, harmful, benign, progress=prog, tail=tail,
                                per_source=per_source, max_parts=max_parts)
    seconds = time.perf_counter() - t0
    doc = {"block": gate.block, "method": gate.method, "tail": gate.tail, "read": gate.read.describe(),
           "seconds": round(seconds, 1),
           "frames": {k: {"threshold": g.threshold, "dev": g.dev} for k, g in gate.frames.items()}, "cv": rows}
    if as_json:
        print(json.dumps(doc))
    else:
        _print_gate_tables(gate, rows)
    print(f"gate: fitted in {seconds:.0f} s", file=sys.stderr)
    if not dry_run:
        guard = {"guard": {"on_flag": on_flag}} if on_flag else {}
        si.vector.recommend(gate=gate.to_meta(), **guard).save(target)
        print(f"gate: {gate.read.describe()}, {gate.method}; recorded in {target}", file=sys.stderr)


def _print_gate_tables(gate, rows: list[dict]) -> None:
    from rich.table import Table

    frames = list(gate.frames)
    loso = "worst_tpr" in gate.frames[frames[0]].dev
    chosen = ("+".join(map(str, gate.read.blocks)), "+".join(map(str, gate.read.block_tails)), gate.method)
    if loso:
        t = Table(title="harm gate: leave-one-source-out (a harmful and a benign source held out per fold); per "
                        "frame the worst held-out harmful source's TPR at the FPR target / worst AUROC / worst "
                        "benign source's FPR; objective: the worst TPR over frames")
        cols = [f"{f} TPR/AUROC/FPR" for f in frames]
        cells = lambda r: [f"{r[f + '_worst_tpr']:.2f}/{r[f + '_worst_auroc']:.3f}/{r[f + '_worst_fpr']:.2f}"  # noqa: E731
                           for f in frames]
    else:
        t = Table(title="harm gate: k-fold CV within the sources, one copy held out per fold (held-out AUROC / "
                        "TPR / FPR per frame; objective: TPR - FPR of the worst fold, summed over frames)")
        cols = [f"{f} AUROC/TPR/FPR" for f in frames]
        cells = lambda r: [f"{r[f + '_auroc']:.3f}/{r[f + '_tpr']:.2f}/{r[f + '_fpr']:.2f}" for f in frames]  # noqa: E731
    for c in ["block", "tail", "method", "objective", "mean AUROC", *cols, ""]:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["block"]), str(r["tail"]), r["method"], f"{r['objective']:+.3f}", f"{r['mean_auroc']:.3f}",
                  *cells(r), "◀ chosen" if (str(r["block"]), str(r["tail"]), r["method"]) == chosen else "")
    o.console().print(t)
    if loso:
        t = Table(title="the chosen gate, each source held out: AUROC (lowest over the sources it was paired "
                        "with), TPR at 1% and 5% FPR (harmful), FPR at the threshold (benign)")
        t.add_column("source")
        t.add_column("n", justify="right")
        for f in frames:
            t.add_column(f"{f} AUROC / TPR@1% / TPR@5% / FPR", justify="right")
        per = {f: {s["source"]: s for s in gate.frames[f].dev["sources"]} for f in frames}
        for name in per[frames[0]]:
            s0 = per[frames[0]][name]
            t.add_row(name + (" (harmful)" if s0["harmful"] else " (benign)"), str(s0["n"]), *[
                f"{s['auroc']:.3f} / {s['tpr_1']:.2f} / {s['tpr_5']:.2f} / -" if s["harmful"] else
                f"{s['auroc']:.3f} / - / - / {s['fpr']:.2f}" for s in (per[f][name] for f in frames)])
        o.console().print(t)


@vectors_app.command("inspect")
def vectors_inspect(file: Path = typer.Argument(..., help="Vector file."), as_json: bool = o.JsonOpt) -> None:
    """Show a vector's layers, norms and provenance."""
    from ..core.vectors import SafetyVector

    d = SafetyVector.load(file).describe()
    if as_json:
        print(json.dumps(d, ensure_ascii=False))
        return
    for k, v in d.items():
        print(f"{k:20} {v}")


@vectors_app.command("convert")
def vectors_convert(
    src: Path = typer.Argument(..., help=".npy (n_layer x n_embd), .npz (one array per layer) or a GGUF "
                               "control vector (e.g. from repeng)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output control-vector GGUF."),
    model_hint: str | None = typer.Option(None, "--model-hint", help="Model name to record."),
    layers: str | None = typer.Option(None, "--layers", help="Keep only these blocks; also the recommended ones."),
    gamma: float | None = typer.Option(None, "--gamma", help="Recommended γ to record."),
    positions: str | None = typer.Option(None, "--positions", help="Recommended positions to record."),
    guidance: str | None = typer.Option(None, "--guidance", help="Recommended sGDS guidance to record."),
    lam: float | None = typer.Option(None, "--lam", help="Recommended sGDS λ to record."),
    force: bool = o.ForceOpt,
) -> None:
    """Convert a vector to our GGUF (loads in llama.cpp as a control vector), optionally setting metadata."""
    from ..core.settings import check_lambda
    from ..core.vectors import VECTOR_FILE, SafetyVector
    from ..decode.guidance import GuidanceSpec

    o.check_out(out, VECTOR_FILE, inputs=[("source file", src)], force=force)
    sgds = {}
    if guidance is not None:
        sgds["guidance"] = str(GuidanceSpec.parse(guidance))
    if lam is not None:
        sgds["lam"] = check_lambda(lam)
    v = SafetyVector.load(src)
    lay = o.parse_layers(layers)
    if lay:
        v = v.select(lay)
    v = v.recommend(model_hint=model_hint, gamma=gamma, positions=positions, sgds=sgds)
    v.save(out)
    print(f"wrote {out} (layers {sorted(v.directions)}, n_embd {v.n_embd})", file=sys.stderr)


@vectors_app.command("sweep")
def vectors_sweep(
    vector: Path = typer.Argument(..., help="Vector file holding every layer to try."),
    layers: str = typer.Option(..., "--layers", help="Blocks to try, e.g. 4,6,8,10."),
    gammas: str = typer.Option("0.25,0.5,1,2", "--gammas", help="γ values to try."),
    positions: str = typer.Option("generation,last", "--positions", help="Position modes to try."),
    n_harmful: int = typer.Option(40, "--harmful", help="Harmful dev prompts (AdvBench dev split)."),
    n_benign: int = typer.Option(40, "--benign", help="Benign dev prompts (XSTest safe, every other one)."),
    model: str | None = o.ModelOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    out: Path | None = typer.Option(None, "--out", help="Also write the rows as JSON Lines."),
    as_json: bool = o.JsonOpt, force: bool = o.ForceOpt,
) -> None:
    """Sweep layer × γ × positions: how each raises the refusal continuation's log-probability over base on
    harmful dev prompts, and how much refusal pressure lands on benign ones."""
    from ..core.settings import check_gamma, check_positions
    from ..eval.sweep import SWEEP_ROWS, dev_prompts, pick_best, sweep_sa

    lay = o.parse_layers(layers)
    gs = o.parse_floats("--gammas", gammas, check_gamma)
    pos = tuple(check_positions(p) for p in positions.split(","))
    if out:
        o.check_out(out, SWEEP_ROWS, inputs=[("VECTOR file", vector), o.model_input(model)], force=force)
    if n_harmful < 1 or n_benign < 1:
        raise UsageError("--harmful and --benign must be >= 1")
    si = o.load(model=model, vector=vector, threads=threads, n_gpu_layers=n_gpu_layers)
    harmful, benign = dev_prompts(n_harmful, n_benign)
    with o.Progress() as prog:
        rows = sweep_sa(si, lay, gs, pos, harmful, benign, progress=prog)
    if out:
        from .. import files

        files.replace(out, "".join(json.dumps(r) + "\n" for r in rows))
    best = pick_best(rows)
    if as_json:
        print(json.dumps({"rows": rows, "best": best}))
        return
    from rich.table import Table

    t = Table(title="SA sweep: refusal continuation, per-token log-prob change vs base")
    for c in ("layer", "gamma", "positions", "harmful up", "harmful Δ", "benign up", "benign Δ", "score"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["layer"]), f"{r['gamma']:g}", r["positions"], f"{r['harmful_up']:.2f}",
                  f"{r['harmful_delta']:+.3f}", f"{r['benign_up']:.2f}", f"{r['benign_delta']:+.3f}",
                  f"{r['score']:+.3f}")
    o.console().print(t)
    print(f"best: layer {best['layer']}, gamma {best['gamma']:g}, positions {best['positions']}")
