"""``bench speed``, ``bench harm``, ``bench report`` and ``calibrate``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .. import jsonl
from ..core.frames import resolve_frame
from ..errors import SafeInferError, UsageError
from . import options as o
from .app import app, bench_app


@bench_app.command("speed")
def bench_speed(
    tokens: int = typer.Option(64, "--tokens", help="Tokens to generate per run."),
    rounds: int = typer.Option(2, "--rounds", help="Interleaved rounds; the fastest of each is kept."),
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, guidance: str | None = o.GuidanceOpt,
    lam: float | None = o.LamOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    speculate: str | None = typer.Option(None, "--speculate", help="Also safeinfer with --speculate K for each K "
                                         "in this comma-separated list (e.g. 2,4,8), with its acceptance rate."),
    as_json: bool = o.JsonOpt,
) -> None:
    """Tokens/s and time to first token: llama-cpp-python's Llama.create_completion vs our four variants, greedy
    and sampled (T 0.8, top-k 40, top-p 0.95)."""
    from ..eval.bench import speed

    if tokens < 2 or rounds < 1:
        raise UsageError("--tokens must be >= 2 and --rounds >= 1")
    ks = o.parse_speculate_list(speculate)
    si = o.load(model=model, vector=vector, threads=threads, n_gpu_layers=n_gpu_layers, guidance=guidance, lam=lam,
                gate="off")
    if si.steering is None:
        raise UsageError("bench speed needs a safety vector (--vector) for the sa and safeinfer variants")
    with o.progress() as prog:
        res = speed(si, tokens=tokens, rounds=rounds, progress=prog, speculate=ks)
    if as_json:
        print(json.dumps({"model": si.model.name, "guidance": str(si.guidance), "lam": si.lam, "results": res}))
        return
    from rich.table import Table

    t = Table(title=f"{si.model.name}: {tokens} tokens, guidance {si.guidance}, λ {si.lam:g}")
    for c in ("run", "tok/s", "× reference", "× base", "× greedy", "TTFT ms", "TTFT × base", "decode share",
              "Python ms/step", "accepted"):
        t.add_column(c, justify="right")
    for k, r in res.items():
        t.add_row(k, f"{r['tokens_per_s']:.1f}", f"{r['vs_reference']:.2f}", f"{r['vs_base']:.2f}",
                  f"{r['vs_greedy']:.2f}" if "vs_greedy" in r else "-",
                  f"{r['ttft_s'] * 1000:.0f}", f"{r['ttft_vs_base']:.2f}",
                  f"{r['decode_share']:.0%}" if "decode_share" in r else "-",
                  f"{r['python_ms_per_step']:.2f}" if "python_ms_per_step" in r else "-",
                  f"{r['acceptance']:.0%}" if "acceptance" in r else "-")
    o.console().print(t)


@bench_app.command("harm")
def bench_harm(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.jsonl (resumable), report.md, "
                             "report.json, charts."),
    dataset: list[str] | None = typer.Option(None, "--dataset", "-d", help="advbench | catqa | xstest | "
                                             "xstest-unsafe | a HarmEval file (CSV/JSONL/Parquet with Question "
                                             "and Topic); repeat or comma-separate. Default: catqa,advbench,xstest."),
    variants: str = typer.Option("base,sa,sgds,safeinfer", "--variants", help="Comma-separated subset of base, "
                                 "sa, sgds, safeinfer; VARIANT:gated runs VARIANT behind the vector's harm gate "
                                 "and VARIANT:refuse answers flagged prompts with the fixed refusal (whatever "
                                 "--gate says), so gated and ungated rows share one report."),
    prompt_types: str = typer.Option("simple", "--prompt-types", help="simple | instruction | simple,instruction."),
    measure: str = typer.Option("generation", "--measure", help="generation | likelihood | generation,likelihood."),
    limit: int | None = typer.Option(None, "--limit-per-category", help="Sample N prompts per category."),
    sample_seed: int = typer.Option(0, "--seed", help="Seed of the per-category sample."),
    judge_model: Path | None = typer.Option(None, "--judge-model", help="A GGUF classifier (Llama-Guard style) "
                                            "that labels each reply safe/unsafe, next to the refusal detector."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Most tokens per reply (greedy)."),
    parallel: int = o.ParallelOpt,
    redact: bool = typer.Option(False, "--redact", help="Leave the text of replies to harmful prompts, and the "
                                "questions of a HarmEval file, out of results.jsonl (verdicts, lengths and hashes "
                                "stay): for results you publish."),
    quiet: bool = o.QuietOpt,
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    layers: str | None = o.LayersOpt, positions: str | None = o.PositionsOpt, guidance: str | None = o.GuidanceOpt,
    lam: float | None = o.LamOpt, raw: bool = o.RawOpt, frame: str | None = o.FrameOpt,
    gate: str = typer.Option("off", "--gate", help="auto | on | off (default off here: the protocol's variants "
                             "as the paper runs them; auto gates sa, sgds and safeinfer with the vector's gate)."),
    n_ctx: int = o.NCtxOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    chat_format: str | None = o.ChatFmtOpt, force: bool = o.ForceOpt,
) -> None:
    """The HarmEval protocol: attack success rate per category, over-refusal, and refusal likelihood, per
    variant, with a report (tables and charts). Rerunning the same command resumes it."""
    from ..core.harm import resolve_sets
    from ..eval.evaluate import RESULTS, HarmBench, HarmConfig, check_out, folder_records, read_config
    from ..eval.report import check_report, write_report

    cfg = HarmConfig(datasets=o.csv_list(dataset) or ["catqa", "advbench", "xstest"],
                     variants=o.csv_list([variants]), prompt_types=o.csv_list([prompt_types]),
                     measures=o.csv_list([measure]), limit_per_category=limit, seed=sample_seed,
                     max_tokens=max_tokens, frame=resolve_frame(raw, frame), parallel=parallel,
                     judge_model=str(judge_model) if judge_model else None, redact=redact)
    cfg.check_names()
    sets = resolve_sets(cfg.datasets, limit, sample_seed, warn=o.warn)
    check_out(out)
    check_report(out, force)
    if judge_model is not None and not judge_model.is_file():
        raise UsageError(f"judge model not found: {judge_model}")
    si = o.load(model=model, vector=vector, gamma=gamma, layers=layers, positions=positions, n_ctx=n_ctx,
                threads=threads, n_gpu_layers=n_gpu_layers, chat_format=chat_format, guidance=guidance, lam=lam,
                gate=gate)
    judge = o.judge(judge_model, threads)
    with jsonl.locked(out / RESULTS, "bench harm run"), o.resumable(quiet, out / RESULTS) as (prog, resuming):
        hb = HarmBench(si, cfg, sets, out, progress=prog, judge=judge)
        hb.write_config(o.command_line())
        if hb.n_done:
            resuming(hb.n_done, hb.total)
        hb.run()
        # the report covers the whole folder (every run into it had the same settings), as `bench report` does
        paths = write_report(out, read_config(out), folder_records(out), force=force)
    if not quiet:
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


@bench_app.command("report")
def bench_report(out: Path = typer.Argument(..., help="A bench harm output folder."),
                 force: bool = o.ForceOpt) -> None:
    """Rewrite report.md, report.json and the charts from a bench harm folder's results.jsonl."""
    from ..eval.evaluate import folder_records, read_config
    from ..eval.report import write_report

    if not out.is_dir():
        raise UsageError(f"{out} is not a folder (give a bench harm --out folder)")
    paths = write_report(out, read_config(out), folder_records(out), force=force)
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


@app.command("calibrate")
def calibrate_cmd(
    gammas: str = typer.Option("0.25,0.5,0.75,1.0", "--gammas", help="γ values to try."),
    lams: str = typer.Option("0,0.1,0.3,0.5,0.7,0.9", "--lams", help="sGDS λ values to try (0 = the target "
                             "alone: SA alone with negative guidance)."),
    sweep_layers: str | None = typer.Option(None, "--sweep-layers", help="Blocks to try, one at a time (each must "
                                            "be in the vector; default: the vector's recommended ones, each alone)."),
    n_harmful: int = typer.Option(24, "--n-harmful", help="Harmful dev prompts (AdvBench dev split)."),
    n_benign: int = typer.Option(24, "--n-benign", help="Benign dev prompts (XSTest safe, odd positions)."),
    max_loss: float = typer.Option(0.5, "--max-benign-loss", help="Most benign utility loss (nats/token) a "
                                   "setting may cost."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the calibrated vector here (default: update "
                                    "the --vector file in place)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the sweep and the choice; write nothing."),
    as_json: bool = o.JsonOpt,
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, guidance: str | None = o.GuidanceOpt,
    positions: str | None = o.PositionsOpt, raw: bool = o.RawOpt, frame: str | None = o.FrameOpt,
    threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    gate: str = typer.Option("auto", "--gate", help="auto | off: with auto and a vector that has a harm gate, a "
                             "setting is judged on the prompts the gate sends to it (the others decode plainly)."),
    force: bool = o.ForceOpt,
) -> None:
    """Sweep γ, λ (and the block) on a dev split; pick the best refusal-margin gain minus benign utility loss;
    record it in the vector's metadata."""
    from ..core.models import default_vector_path
    from ..core.settings import check_choice, check_gamma, check_lambda
    from ..eval.calibrate import run

    g, lm = o.parse_floats("--gammas", gammas, check_gamma), o.parse_floats("--lams", lams, check_lambda)
    o.check_finite("--max-benign-loss", max_loss)
    fr = resolve_frame(raw, frame)
    if vector in ("none", ""):
        raise UsageError("calibrate needs a safety vector (--vector)")
    target = out
    if target is None and not dry_run:
        target = Path(vector) if vector is not None else default_vector_path()
    if target is not None and not dry_run:  # the --vector itself may be updated in place when it is ours
        from ..core.vectors import VECTOR_FILE

        o.check_out(target, VECTOR_FILE, inputs=[o.model_input(model)], force=force)
    check_choice("--gate", gate, ("auto", "off"))
    si = o.load(model=model, vector=vector, positions=positions, threads=threads, n_gpu_layers=n_gpu_layers,
                guidance=guidance, gate=gate)
    with o.Progress() as prog:
        res = run(si, g, lm, o.parse_layers(sweep_layers), n_harmful, n_benign, max_loss, fr,
                  None if dry_run else target, progress=prog)
    rows, best = res.rows, res.best
    if as_json:
        print(json.dumps({"rows": rows, "best": best, "gate": res.gate}))
    else:
        from rich.table import Table

        behind = (f"; behind the harm gate (dev TPR {res.gate['tpr']:.0%}, FPR {res.gate['fpr']:.0%})"
                  if res.gate else "")
        t = Table(title=f"calibrate {si.model.name}: safeinfer, guidance {si.guidance.kind}, "
                        f"{res.n_harmful} harmful / {res.n_benign} benign dev prompts{behind}")
        for c in ("block", "γ", "λ", "margin above base", "margin gain (nats/tok)", "benign loss (nats/tok)",
                  "objective", ""):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["layer"]), f"{r['gamma']:g}", f"{r['lam']:g}", f"{r['margin_up']:.0%}",
                      f"{r['margin_gain']:+.3f}", f"{r['benign_loss']:+.3f}", f"{r['objective']:+.3f}",
                      "◀ chosen" if r is best else "")
        o.console().print(t)
    if best is None:
        raise SafeInferError(f"no setting costs at most --max-benign-loss {max_loss:g} nats/token; nothing "
                             "recorded (try smaller --gammas or --lams, or raise the limit)")
    msg = f"chosen: block {best['layer']}, γ {best['gamma']:g}, λ {best['lam']:g}"
    if dry_run:
        print(msg + " (dry run: nothing written)", file=sys.stderr)
    else:
        print(f"{msg}; recorded in {target}", file=sys.stderr)
