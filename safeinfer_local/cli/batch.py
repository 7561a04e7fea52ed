"""``filter`` and ``merge``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..core.frames import resolve_frame
from ..errors import UsageError
from . import options as o
from .app import app


@app.command("filter")
def filter_cmd(
    input: str = o.InputArg, out: Path | None = o.OutFileOpt, fmt: str | None = o.FormatOpt,
    field: str | None = o.FieldOpt, split: Path | None = o.SplitOpt, shard: str | None = o.ShardOpt,
    quiet: bool = o.QuietOpt, parallel: int = o.ParallelOpt, force: bool = o.ForceOpt,
    judge_model: Path | None = typer.Option(None, "--judge-model", help="A GGUF classifier (e.g. Llama-Guard "
                                            "style) that labels each reply safe/unsafe; 'unsafe' replies are "
                                            "blocked in --split."),
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    layers: str | None = o.LayersOpt, positions: str | None = o.PositionsOpt, variant: str | None = o.VariantOpt,
    guidance: str | None = o.GuidanceOpt, lam: float | None = o.LamOpt, raw: bool = o.RawOpt,
    speculate: int = o.SpeculateOpt,
    frame: str | None = o.FrameOpt, stop: list[str] | None = o.StopOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (the default here)."),
    top_k: int = o.TopKOpt, top_p: float = o.TopPOpt, seed: int | None = o.SeedOpt,
    n_ctx: int = o.NCtxOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    gate: str = o.GateOpt, gate_threshold: float | None = o.GateThresholdOpt, on_flag: str | None = o.OnFlagOpt,
    refusal: str = o.RefusalOpt,
    chat_format: str | None = o.ChatFmtOpt,
    ray: str | None = typer.Option(None, "--ray", metavar="local|auto|ADDRESS",
                                   help="Generate on Ray actors, one model each (needs safeinfer_local[ray]): local "
                                   "(a Ray instance of this command), auto (the Ray running on this machine) or a "
                                   "cluster's address (e.g. ray://head:10001). --threads is per actor (default 1), "
                                   "--parallel per actor; the output is the same as without --ray."),
    ray_actors: int | None = typer.Option(None, "--ray-actors", help="Ray actors (default: the cluster's CPUs // "
                                          "--threads)."),
) -> None:
    """Generate a reply for every prompt in a file and judge it (refused / answered / error)."""
    from ..workflows import filter as flt
    from ..workflows import inputs, runs

    gen = o.gen_options(max_tokens, temperature, top_k, top_p, seed, stop)
    fr = resolve_frame(raw, frame)
    o.check_parallel(parallel)
    sh = inputs.parse_shard(shard)
    if ray is None and ray_actors is not None:
        raise UsageError("--ray-actors needs --ray local|auto|ADDRESS")
    if ray is not None:
        if not ray.strip():
            raise UsageError("--ray takes local, auto or a Ray address, not an empty string")
        if ray_actors is not None and ray_actors < 1:
            raise UsageError(f"--ray-actors must be >= 1, not {ray_actors}")
        from .. import ray as sray

        sray.check()
        threads = 1 if threads is None else threads
    if out is not None:  # what is in it is checked by its header (jsonl.claim), once the settings are known
        o.check_out(out, inputs=[("input file", input)], force=force, flag="-o")
    runs.check_split(split, force, inputs=[("input file", input)])
    items = inputs.read_items(input, fmt, field)
    si = o.load_from(locals())
    judge = o.judge(judge_model, threads)
    with o.resumable(quiet, out) as (prog, resuming):
        if ray is None:
            res = flt.run(si, items, out, split, sh, parallel, fr, judge, progress=prog, on_resume=resuming,
                          force=force, **gen)
        else:
            res = sray.filter_run(si, items, out, split, sh, parallel, fr, judge, progress=prog,
                                  on_resume=resuming, force=force, address=ray.strip(), actors=ray_actors,
                                  threads=threads, **gen)
    if quiet:
        return
    counts, mean = res.counts, res.mean_tokens_per_s
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"filter: {res.wanted} prompts ({len(res.written)} new), variant {si.default_variant()}")
        for c in ("verdict", "count"):
            t.add_column(c, justify="right")
        for k in ("answered", "refused", "error"):
            t.add_row(k, str(counts.get(k, 0)))
        t.add_row("mean tok/s", f"{mean:.1f}")
        Console(stderr=True).print(t)
    else:
        summary = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("answered", "refused", "error"))
        print(f"done: {summary}; mean {mean:.1f} tok/s over {len(res.written)} new", file=sys.stderr)


@app.command("merge")
def merge_cmd(
    out: Path = typer.Argument(..., help="Merged output (JSON Lines)."),
    shards: list[Path] = typer.Argument(..., help="Shard outputs of `filter --shard`."),
    force: bool = o.ForceOpt,
) -> None:
    """Join shard outputs in input order; duplicates or gaps are refused."""
    from ..workflows.filter import merge

    o.check_out(out, inputs=[("shard", p) for p in shards], force=False, flag="OUT")
    n = merge(out, shards, force=force)
    print(f"wrote {out} ({n} records)", file=sys.stderr)


@app.command("screen")
def screen_cmd(
    input: str = o.InputArg, out: Path | None = o.OutFileOpt, fmt: str | None = o.FormatOpt,
    field: str | None = o.FieldOpt, split: Path | None = o.SplitOpt, shard: str | None = o.ShardOpt,
    quiet: bool = o.QuietOpt, force: bool = o.ForceOpt,
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, raw: bool = o.RawOpt,
    frame: str | None = o.FrameOpt, gate_threshold: float | None = o.GateThresholdOpt,
    n_ctx: int = o.NCtxOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    chat_format: str | None = o.ChatFmtOpt,
) -> None:
    """Screen prompts with the vector's harm gate, without generating: one record per prompt with its gate
    score and whether it is flagged. Many prompts share each decode."""
    from ..workflows import inputs, runs, screen

    fr = resolve_frame(raw, frame)
    sh = inputs.parse_shard(shard)
    if out is not None:
        o.check_out(out, inputs=[("input file", input)], force=force, flag="-o")
    runs.check_split(split, force, inputs=[("input file", input)])
    items = inputs.read_items(input, fmt, field)
    si = o.load(model=model, vector=vector, n_ctx=n_ctx, threads=threads, n_gpu_layers=n_gpu_layers,
                chat_format=chat_format, gate="on", gate_threshold=gate_threshold)

    with o.resumable(quiet, out) as (prog, resuming):
        res = screen.run(si, items, out, split, sh, fr, progress=prog, on_resume=resuming, force=force)
    if not quiet:
        c = res.counts
        print(f"done: flagged {c['flagged']}, passed {c['passed']}, error {c['error']} of {res.wanted}",
              file=sys.stderr)
