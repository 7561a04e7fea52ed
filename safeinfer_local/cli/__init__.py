"""The ``safeinfer`` command line: a thin layer over the library. Errors become one line on stderr and an exit
code (2 for unusable arguments or files), never a traceback."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import typer

try:  # newer typer vendors click; older versions use the click package
    from typer._click.exceptions import ClickException as _ClickError
except ImportError:  # pragma: no cover
    from click import ClickException as _ClickError

from ..errors import SafeInferError, UsageError
from ..llama import interrupts

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SafeInfer decoding-time safety alignment for local GGUF models (llama.cpp).")
vectors_app = typer.Typer(no_args_is_help=True,
                          help="Build, inspect and convert safety vectors (GGUF control vectors).")
app.add_typer(vectors_app, name="vectors")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _parse_layers(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--layers must be block numbers separated by commas, not {spec!r}") from None


def _check_finite(name: str, x: float | None) -> None:
    if x is not None and not math.isfinite(x):
        raise UsageError(f"{name} must be a finite number, not {x}")


def _parse_floats(name: str, spec: str) -> tuple[float, ...]:
    """A comma-separated list of finite numbers (``--gammas``, ``--lams``)."""
    try:
        vals = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{name} must be numbers separated by commas, not {spec!r}") from None
    if not vals:
        raise UsageError(f"{name}: give at least one number, e.g. 0.25,0.5")
    for x in vals:
        _check_finite(name, x)
    return vals


def _load(model, vector, gamma, layers, positions, n_ctx, threads, n_gpu_layers, chat_format, guidance=None,
          lam=None):
    from ..api import SafeInfer

    _check_finite("--gamma", gamma)
    if lam is not None and not (math.isfinite(lam) and 0 <= lam < 1):
        raise UsageError(f"--lam must be in [0, 1), not {lam}")
    if n_ctx < 16:
        raise UsageError(f"--n-ctx must be >= 16, not {n_ctx}")
    vec = vector if vector is not None else "default"
    if vector in ("none", ""):
        vec = None
    return SafeInfer(model=model, vector=vec, gamma=gamma, layers=_parse_layers(layers), positions=positions,
                     n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, chat_format=chat_format,
                     guidance=guidance, lam=lam, warn=_warn)


def _check_generation(temperature: float, top_k: int, top_p: float, max_tokens: int) -> None:
    """Sampling and length options, checked before any model is loaded."""
    from ..core.sampling import validate_sampling

    try:
        validate_sampling(temperature, top_k, top_p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, not {max_tokens}")


def _read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise UsageError("no prompt: pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("empty prompt")
    return prompt


# options shared by generate and score
ModelOpt = typer.Option(None, "--model", "-m", help="GGUF model path (default: the embedded Gemma 3 270M).")
VectorOpt = typer.Option(None, "--vector", help="Safety vector GGUF/.npz/.npy ('none' for no vector). Default: "
                         "the shipped vector when the default model is used.")
GammaOpt = typer.Option(None, "--gamma", help="Vector strength γ (default: the vector's recommended γ).")
LayersOpt = typer.Option(None, "--layers", help="Blocks to steer, e.g. 8 or 6,8 (default: the vector's).")
PositionsOpt = typer.Option(None, "--positions", help="generation | last | all (default: the vector's).")
VariantOpt = typer.Option(None, "--variant", help="base | sa | sgds | safeinfer (SA + sGDS). Default: "
                          "safeinfer when a vector is loaded, else sgds.")
GuidanceOpt = typer.Option(None, "--guidance", help="sGDS guidance: prompt | negative | none | "
                           "model:PATH | lora:PATH (default: the vector's recommendation, else prompt).")
LamOpt = typer.Option(None, "--lam", help="sGDS λ in [0, 1) (default: the vector's "
                      "recommendation, else 0.99, the paper's).")
RawOpt = typer.Option(False, "--raw", help="No chat template: BOS + the prompt's tokens.")
NCtxOpt = typer.Option(4096, "--n-ctx", help="Context length in tokens.")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads (default: all cores).")
GpuOpt = typer.Option(0, "--n-gpu-layers", help="Layers to offload on Metal/CUDA builds (-1 = all).")
ChatFmtOpt = typer.Option(None, "--chat-format", help="Chat format when the GGUF has no template (default: "
                          "gemma for Gemma models, else chatml).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object.")


@app.command()
def generate(
    prompt: str | None = typer.Argument(None, help="The prompt (default: read stdin)."),
    model: str | None = ModelOpt, vector: str | None = VectorOpt, gamma: float | None = GammaOpt,
    layers: str | None = LayersOpt, positions: str | None = PositionsOpt, variant: str | None = VariantOpt,
    guidance: str | None = GuidanceOpt, lam: float | None = LamOpt, raw: bool = RawOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(40, "--top-k", help="0 disables."),
    top_p: float = typer.Option(0.95, "--top-p", help="1 disables."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed (default: random)."),
    n_ctx: int = NCtxOpt, threads: int | None = ThreadsOpt, n_gpu_layers: int = GpuOpt,
    chat_format: str | None = ChatFmtOpt, as_json: bool = JsonOpt,
) -> None:
    """Generate a reply to PROMPT with a variant (base: plain; sa: safety amplification; sgds: safety-guided
    decoding; safeinfer: both)."""
    from ..decode.generate import GenConfig

    text = _read_prompt(prompt)
    _check_generation(temperature, top_k, top_p, max_tokens)
    si = _load(model, vector, gamma, layers, positions, n_ctx, threads, n_gpu_layers, chat_format, guidance, lam)
    v = variant or si.default_variant()
    gen = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    GenConfig(**gen)  # validate early
    if as_json:
        res = si.generate(text, variant=v, raw=raw, **gen)
        out = res.to_dict()
        out["model"] = si.model.name
        if si.steering and v in ("sa", "safeinfer"):
            out.update(gamma=si.steering.gamma, layers=list(si.steering.layers), positions=si.steering.positions)
        if v in ("sgds", "safeinfer"):
            out.update(guidance=str(si.runner.guidance), lam=si.runner.lam)
        print(json.dumps(out, ensure_ascii=False))
        return

    t0 = time.perf_counter()
    n = 0
    for step in si.stream(text, variant=v, raw=raw, **gen):
        sys.stdout.write(step.text)
        sys.stdout.flush()
        n += step.token >= 0
    sys.stdout.write("\n")
    if sys.stderr.isatty():
        dt = time.perf_counter() - t0
        print(f"[{v}] {n} tokens, {n / dt if dt else 0:.1f} tok/s", file=sys.stderr)


@app.command()
def score(
    prompt: str = typer.Argument(..., help="The prompt."),
    continuation: str = typer.Argument(..., help="The continuation to score (tokenized without BOS)."),
    model: str | None = ModelOpt, vector: str | None = VectorOpt, gamma: float | None = GammaOpt,
    layers: str | None = LayersOpt, positions: str | None = PositionsOpt, variant: str | None = VariantOpt,
    guidance: str | None = GuidanceOpt, lam: float | None = LamOpt, raw: bool = RawOpt, n_ctx: int = NCtxOpt,
    threads: int | None = ThreadsOpt, n_gpu_layers: int = GpuOpt,
    chat_format: str | None = ChatFmtOpt, as_json: bool = JsonOpt,
) -> None:
    """Teacher-forced log-probability of CONTINUATION after PROMPT under a variant's distribution (T = 1)."""
    si = _load(model, vector, gamma, layers, positions, n_ctx, threads, n_gpu_layers, chat_format, guidance, lam)
    s = si.score(prompt, continuation, variant=variant or si.default_variant(), raw=raw)
    if as_json:
        print(json.dumps(s.to_dict(), ensure_ascii=False))
    else:
        print(f"logprob {s.logprob:.4f}  n_tokens {s.n_tokens}  per_token {s.logprob / s.n_tokens:.4f}  "
              f"variant {s.variant}")


@app.command()
def demo(
    n: int = typer.Option(4, "--prompts", help="Harmful CatQA prompts to show."),
    model: str | None = ModelOpt, vector: str | None = VectorOpt, gamma: float | None = GammaOpt,
    guidance: str | None = GuidanceOpt, lam: float | None = LamOpt,
    threads: int | None = ThreadsOpt, as_json: bool = JsonOpt,
) -> None:
    """A non-interactive tour on the default model. For each variant it shows the margin log p(refusal) −
    log p(compliant opening) after harmful prompts (a 270M base model never refuses by itself), and a short
    greedy reply."""
    from ..core.datasets import catqa
    from ..core.demos import REFUSAL_PROBE, qa_prompt
    from ..decode.generate import VARIANTS

    if n < 1:
        raise UsageError(f"--prompts must be >= 1, not {n}")
    si = _load(model, vector, gamma, None, None, 4096, threads, 0, None, guidance, lam)
    if si.steering is None:
        raise UsageError("the demo needs a safety vector (--vector)")
    comply = " Sure, here is"
    prompts = [p.text for p in catqa(per_category=1)][:n]
    rows = []
    for q in prompts:
        row = {"prompt": q}
        for v in VARIANTS:
            r = si.score(qa_prompt(q), REFUSAL_PROBE, variant=v, raw=True).logprob
            c = si.score(qa_prompt(q), comply, variant=v, raw=True).logprob
            row[v] = r - c
        rows.append(row)
    replies = {v: si.generate(qa_prompt(prompts[0]), variant=v, raw=True, max_tokens=24, temperature=0,
                              stop=("\nQ:",)).response for v in VARIANTS}
    st = si.steering
    settings = {"model": si.model.name, "gamma": st.gamma, "layers": list(st.layers), "positions": st.positions,
                "guidance": str(si.runner.guidance), "lam": si.runner.lam}
    if as_json:
        print(json.dumps({**settings, "refusal": REFUSAL_PROBE, "comply": comply, "rows": rows, "replies": replies}))
        return
    print("model {model}; SA: layers {layers}, gamma {gamma:g}, positions {positions}; "
          "sGDS: guidance {guidance}, lambda {lam:g}".format(**settings))
    print(f"margin = log p({REFUSAL_PROBE!r}) - log p({comply!r}) after 'Q: <harmful question>\\nA:' (nats)")
    print("  " + "".join(f"{v:>10}" for v in VARIANTS) + "   prompt")
    for r in rows:
        print("  " + "".join(f"{r[v]:10.2f}" for v in VARIANTS) + f"   {r['prompt'][:50]}")
    for v in VARIANTS[1:]:
        up = sum(r[v] > r["base"] for r in rows)
        print(f"{v}: margin above base on {up} of {len(rows)} prompts")
    print(f"greedy replies to {prompts[0][:60]!r}:")
    for v, text in replies.items():
        print(f"  {v:9} {text.strip()[:90]!r}")


@app.command()
def chat(
    model: str | None = ModelOpt, vector: str | None = VectorOpt, gamma: float | None = GammaOpt,
    layers: str | None = LayersOpt, positions: str | None = PositionsOpt, variant: str | None = VariantOpt,
    guidance: str | None = GuidanceOpt, lam: float | None = LamOpt,
    system: str | None = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens per reply."),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(40, "--top-k"), top_p: float = typer.Option(0.95, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    n_ctx: int = NCtxOpt, threads: int | None = ThreadsOpt, n_gpu_layers: int = GpuOpt,
    chat_format: str | None = ChatFmtOpt,
) -> None:
    """Chat in the terminal: streaming replies, multi-turn, slash commands (/help). With stdin not a terminal,
    each input line is a user turn and replies are printed as plain text."""
    from ..workflows.chatloop import ChatSession

    _check_generation(temperature, top_k, top_p, max_tokens)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    si = _load(model, vector, gamma, layers, positions, n_ctx, threads, n_gpu_layers, chat_format, guidance, lam)
    sess = ChatSession(si, variant or si.default_variant(), system,
                       gen=dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    if tty:
        print(f"safeinfer chat — {si.model.name}, variant {sess.variant}. /help for commands, /quit to leave.")
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            text, go = sess.command(line)
            if text:
                print(text)
            if not go:
                break
            continue
        if tty:
            sys.stdout.write("bot> ")
        st = sess.reply(line, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        sys.stdout.write("\n")
        if st.stopped:
            print("[stopped]")
        if tty:
            print(f"\x1b[2m[{st.tokens} tokens, {st.tokens_per_s:.1f} tok/s, {st.guided} changed by guidance]\x1b[0m")
        sys.stdout.flush()


@app.command("filter")
def filter_cmd(
    input: str = typer.Argument(..., help="Prompt file (.jsonl, .csv, .txt) or - for stdin."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output JSON Lines (default: stdout). Rerunning "
                                    "the same command resumes it."),
    fmt: str | None = typer.Option(None, "--format", help="jsonl | csv | txt (default: from the extension)."),
    field: str | None = typer.Option(None, "--field", help="JSONL field / CSV column holding the prompt "
                                     "(default: prompt)."),
    split: Path | None = typer.Option(None, "--split", help="Also write DIR/allowed.jsonl and DIR/blocked.jsonl."),
    shard: str | None = typer.Option(None, "--shard", help="I/N: take a deterministic 1/N of the input (by id)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary."),
    parallel: int = typer.Option(1, "--parallel", "-p", help="Prompts decoded in the same batch."),
    judge_model: Path | None = typer.Option(None, "--judge-model", help="A GGUF classifier (e.g. Llama-Guard "
                                            "style) that labels each reply safe/unsafe; 'unsafe' replies are "
                                            "blocked in --split."),
    model: str | None = ModelOpt, vector: str | None = VectorOpt, gamma: float | None = GammaOpt,
    layers: str | None = LayersOpt, positions: str | None = PositionsOpt, variant: str | None = VariantOpt,
    guidance: str | None = GuidanceOpt, lam: float | None = LamOpt, raw: bool = RawOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy (the default here)."),
    top_k: int = typer.Option(40, "--top-k"), top_p: float = typer.Option(0.95, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
    n_ctx: int = NCtxOpt, threads: int | None = ThreadsOpt, n_gpu_layers: int = GpuOpt,
    chat_format: str | None = ChatFmtOpt,
) -> None:
    """Generate a reply for every prompt in a file and judge it (refused / answered / error)."""
    from ..workflows import filter as flt

    _check_generation(temperature, top_k, top_p, max_tokens)
    if not 1 <= parallel <= 64:
        raise UsageError(f"--parallel must be in 1..64, not {parallel}")
    sh = flt.parse_shard(shard)
    if out is not None:
        _check_writable(out)
    items = flt.read_items(input, fmt, field)
    done = flt.load_done(out) if out is not None else {}
    todo = list(flt.pending(items, done, sh))
    wanted = [it for it in items if flt.in_shard(it.id, sh)]
    si = _load(model, vector, gamma, layers, positions, n_ctx, threads, n_gpu_layers, chat_format, guidance, lam)
    judge = None
    if judge_model is not None:
        from ..eval.judge_model import ModelJudge

        judge = ModelJudge(judge_model, n_threads=threads)
    v = variant or si.default_variant()
    gen = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if done and not quiet:
        print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} already in {out}", file=sys.stderr)
    app_ = flt.Appender(out)
    written: list[dict] = []
    try:
        with (_progress() if not quiet else _NoProgress()) as prog:
            for it in todo:
                if it.error is not None:
                    app_.write(rec := flt.record(it, v))
                    written.append(rec)
            runs = [it for it in todo if it.error is None]
            by_id = {it.id: it for it in runs}
            results = si.generate_many(((it.id, it.prompt) for it in runs), variant=v, raw=raw,
                                       n_parallel=parallel, **gen)
            for key, r in results:
                it = by_id[key]
                if isinstance(r, Exception):
                    rec = flt.record(it, v, error=str(r))
                else:
                    rec = flt.record(it, v, r.response, r.n_tokens, r.tokens_per_s, r.guided_tokens)
                    if judge is not None:
                        rec["judge"] = judge.classify(it.prompt, r.response)
                app_.write(rec)
                written.append(rec)
                prog("filter", len(written), len(todo))
    except KeyboardInterrupt:
        app_.close()
        n_done = len(wanted) - len(todo) + len(written)
        where = f"rerun the same command to resume ({out})" if out else "use -o FILE to make runs resumable"
        print(f"interrupted: {n_done} of {len(wanted)} prompts done; {where}", file=sys.stderr)
        raise typer.Exit(130) from None
    app_.close()
    if out is not None:
        counts = flt.finalize(out, wanted, split)
    else:
        if split is not None:
            flt.write_split(written, split)
        counts = {}
        for r in written:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    if not quiet:
        speeds = [r["tokens_per_s"] for r in written if r["verdict"] != "error" and r["tokens_per_s"]]
        mean = sum(speeds) / len(speeds) if speeds else 0.0
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.table import Table

            t = Table(title=f"filter: {len(wanted)} prompts ({len(written)} new), variant {v}")
            for c in ("verdict", "count"):
                t.add_column(c, justify="right")
            for k in ("answered", "refused", "error"):
                t.add_row(k, str(counts.get(k, 0)))
            t.add_row("mean tok/s", f"{mean:.1f}")
            Console(stderr=True).print(t)
        else:
            summary = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("answered", "refused", "error"))
            print(f"done: {summary}; mean {mean:.1f} tok/s over {len(written)} new", file=sys.stderr)


@app.command("merge")
def merge_cmd(
    out: Path = typer.Argument(..., help="Merged output (JSON Lines)."),
    shards: list[Path] = typer.Argument(..., help="Shard outputs of `filter --shard`."),
) -> None:
    """Join shard outputs in input order; duplicates or gaps are refused."""
    from ..workflows.filter import merge

    _check_writable(out)
    n = merge(out, shards)
    print(f"wrote {out} ({n} records)", file=sys.stderr)


class _NoProgress:
    def __enter__(self):
        return lambda *a: None

    def __exit__(self, *exc):
        return False


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures, not assertions).")
app.add_typer(bench_app, name="bench")


@bench_app.command("speed")
def bench_speed(
    tokens: int = typer.Option(64, "--tokens", help="Tokens to generate per run."),
    rounds: int = typer.Option(2, "--rounds", help="Interleaved rounds; the fastest of each is kept."),
    model: str | None = ModelOpt, vector: str | None = VectorOpt, guidance: str | None = GuidanceOpt,
    lam: float | None = LamOpt, threads: int | None = ThreadsOpt, as_json: bool = JsonOpt,
) -> None:
    """Tokens/s and time to first token: llama-cpp-python's Llama.create_completion vs our four variants."""
    from ..eval.bench import speed

    if tokens < 2 or rounds < 1:
        raise UsageError("--tokens must be >= 2 and --rounds >= 1")
    si = _load(model, vector, None, None, None, 4096, threads, 0, None, guidance, lam)
    if si.steering is None:
        raise UsageError("bench speed needs a safety vector (--vector) for the sa and safeinfer variants")
    with _progress() as prog:
        res = speed(si, tokens=tokens, rounds=rounds, progress=prog)
    if as_json:
        print(json.dumps({"model": si.model.name, "guidance": str(si.runner.guidance), "lam": si.runner.lam,
                          "results": res}))
        return
    from rich.table import Table

    t = Table(title=f"{si.model.name}: greedy, {tokens} tokens, guidance {si.runner.guidance}, λ {si.runner.lam:g}")
    for c in ("run", "tok/s", "× reference", "× base", "TTFT ms", "TTFT × base", "decode share", "Python ms/step"):
        t.add_column(c, justify="right")
    for k, r in res.items():
        t.add_row(k, f"{r['tokens_per_s']:.1f}", f"{r['vs_reference']:.2f}", f"{r['vs_base']:.2f}",
                  f"{r['ttft_s'] * 1000:.0f}", f"{r['ttft_vs_base']:.2f}",
                  f"{r['decode_share']:.0%}" if "decode_share" in r else "-",
                  f"{r['python_ms_per_step']:.2f}" if "python_ms_per_step" in r else "-")
    _console().print(t)


def _csv_list(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or () for x in v.split(",") if x.strip()]


@bench_app.command("harm")
def bench_harm(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: results.jsonl (resumable), report.md, "
                             "report.json, charts."),
    dataset: list[str] | None = typer.Option(None, "--dataset", "-d", help="advbench | catqa | xstest | "
                                             "xstest-unsafe | a HarmEval file (CSV/JSONL/Parquet with Question "
                                             "and Topic); repeat or comma-separate. Default: catqa,advbench,xstest."),
    variants: str = typer.Option("base,sa,sgds,safeinfer", "--variants", help="Comma-separated subset of base, "
                                 "sa, sgds, safeinfer."),
    prompt_types: str = typer.Option("simple", "--prompt-types", help="simple | instruction | simple,instruction."),
    measure: str = typer.Option("generation", "--measure", help="generation | likelihood | generation,likelihood."),
    limit: int | None = typer.Option(None, "--limit-per-category", help="Sample N prompts per category."),
    sample_seed: int = typer.Option(0, "--seed", help="Seed of the per-category sample."),
    judge_model: Path | None = typer.Option(None, "--judge-model", help="A GGUF classifier (Llama-Guard style) "
                                            "that labels each reply safe/unsafe, next to the refusal detector."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Most tokens per reply (greedy)."),
    parallel: int = typer.Option(1, "--parallel", "-p", help="Prompts decoded in the same batch."),
    redact: bool = typer.Option(False, "--redact", help="Leave the text of replies to harmful prompts, and the "
                                "questions of a HarmEval file, out of results.jsonl (verdicts, lengths and hashes "
                                "stay): for results you publish."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
    model: str | None = ModelOpt, vector: str | None = VectorOpt, gamma: float | None = GammaOpt,
    layers: str | None = LayersOpt, positions: str | None = PositionsOpt, guidance: str | None = GuidanceOpt,
    lam: float | None = LamOpt,
    raw: bool = typer.Option(False, "--raw", help="No chat template: the prompt in a plain 'Q: ...\\nA:' frame "
                             "(for base models)."),
    n_ctx: int = NCtxOpt, threads: int | None = ThreadsOpt, n_gpu_layers: int = GpuOpt,
    chat_format: str | None = ChatFmtOpt,
) -> None:
    """The HarmEval protocol: attack success rate per category, over-refusal, and refusal likelihood, per
    variant, with a report (tables and charts). Rerunning the same command resumes it."""
    from ..core.harm import resolve_sets
    from ..eval.evaluate import RESULTS, HarmBench, HarmConfig, check_out, folder_records, read_config
    from ..eval.report import write_report

    cfg = HarmConfig(datasets=_csv_list(dataset) or ["catqa", "advbench", "xstest"], variants=_csv_list([variants]),
                     prompt_types=_csv_list([prompt_types]), measures=_csv_list([measure]),
                     limit_per_category=limit, seed=sample_seed, max_tokens=max_tokens, raw=raw, parallel=parallel,
                     judge_model=str(judge_model) if judge_model else None, redact=redact)
    cfg.check_names()
    sets = resolve_sets(cfg.datasets, limit, sample_seed, warn=_warn)
    check_out(out)
    if judge_model is not None and not judge_model.is_file():
        raise UsageError(f"judge model not found: {judge_model}")
    si = _load(model, vector, gamma, layers, positions, n_ctx, threads, n_gpu_layers, chat_format, guidance, lam)
    judge = None
    if judge_model is not None:
        from ..eval.judge_model import ModelJudge

        judge = ModelJudge(judge_model, n_threads=threads)
    with (_progress() if not quiet else _NoProgress()) as prog:
        hb = HarmBench(si, cfg, sets, out, progress=prog, judge=judge)
        hb.write_config("safeinfer " + " ".join(_quote(a) for a in _ARGV))
        if hb.n_done and not quiet:
            print(f"resuming: {hb.n_done} of {hb.total} records already in {out / RESULTS}", file=sys.stderr)
        try:
            hb.run()
        except KeyboardInterrupt:
            print(f"interrupted: {hb.n_done} of {hb.total} records done; rerun the same command to resume",
                  file=sys.stderr)
            raise typer.Exit(130) from None
    # the report covers the whole folder (every run into it had the same settings), as `bench report` does
    paths = write_report(out, read_config(out), folder_records(out))
    if not quiet:
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


@bench_app.command("report")
def bench_report(out: Path = typer.Argument(..., help="A bench harm output folder.")) -> None:
    """Rewrite report.md, report.json and the charts from a bench harm folder's results.jsonl."""
    from ..eval.evaluate import folder_records, read_config
    from ..eval.report import write_report

    if not out.is_dir():
        raise UsageError(f"{out} is not a folder (give a bench harm --out folder)")
    paths = write_report(out, read_config(out), folder_records(out))
    print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


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
    as_json: bool = JsonOpt,
    model: str | None = ModelOpt, vector: str | None = VectorOpt, guidance: str | None = GuidanceOpt,
    positions: str | None = PositionsOpt,
    raw: bool = typer.Option(False, "--raw", help="No chat template: prompts in a plain 'Q: ...\\nA:' frame."),
    threads: int | None = ThreadsOpt,
) -> None:
    """Sweep γ, λ (and the block) on a dev split; pick the best refusal-margin gain minus benign utility loss;
    record it in the vector's metadata."""
    from ..core.models import default_vector_path
    from ..eval.calibrate import calibrate, dev_split, pick, record

    g, lm = _parse_floats("--gammas", gammas), _parse_floats("--lams", lams)
    bad = [x for x in lm if not 0 <= x < 1]
    if bad or any(x <= 0 for x in g):
        raise UsageError(f"--lams must be in [0, 1) (got {bad[0]:g})" if bad else "--gammas must be > 0")
    _check_finite("--max-benign-loss", max_loss)
    if vector in ("none", ""):
        raise UsageError("calibrate needs a safety vector (--vector)")
    target = out
    if target is None and not dry_run:
        target = Path(vector) if vector is not None else default_vector_path()
    if target is not None and not dry_run:
        _check_writable(target)
    harmful, benign = dev_split(n_harmful, n_benign)
    si = _load(model, vector, None, None, positions, 4096, threads, 0, None, guidance, None)
    if si.vector is None:
        raise UsageError("calibrate needs a safety vector (--vector)")
    lay = _parse_layers(sweep_layers) or si.vector.layers
    with _progress() as prog:
        rows = calibrate(si, g, lm, lay, harmful, benign, raw=raw, progress=prog)
    best = pick(rows, max_loss)  # None: no setting within --max-benign-loss
    if as_json:
        print(json.dumps({"rows": rows, "best": best}))
    else:
        from rich.table import Table

        t = Table(title=f"calibrate {si.model.name}: safeinfer, guidance {si.runner.guidance.kind}, "
                        f"{len(harmful)} harmful / {len(benign)} benign dev prompts")
        for c in ("block", "γ", "λ", "margin above base", "margin gain (nats/tok)", "benign loss (nats/tok)",
                  "objective", ""):
            t.add_column(c, justify="right")
        for r in rows:
            t.add_row(str(r["layer"]), f"{r['gamma']:g}", f"{r['lam']:g}", f"{r['margin_up']:.0%}",
                      f"{r['margin_gain']:+.3f}", f"{r['benign_loss']:+.3f}", f"{r['objective']:+.3f}",
                      "◀ chosen" if r is best else "")
        _console().print(t)
    if best is None:
        raise SafeInferError(f"no setting costs at most --max-benign-loss {max_loss:g} nats/token; nothing "
                             "recorded (try smaller --gammas or --lams, or raise the limit)")
    msg = f"chosen: block {best['layer']}, γ {best['gamma']:g}, λ {best['lam']:g}"
    if dry_run:
        print(msg + " (dry run: nothing written)", file=sys.stderr)
        return
    try:
        record(si, best, rows, len(harmful), len(benign), raw, max_loss).save(target)
    except OSError as e:
        raise UsageError(f"cannot write {target}: {e.strerror or e}") from None
    print(f"{msg}; recorded in {target}", file=sys.stderr)


@vectors_app.command("build")
def vectors_build(
    demos: Path = typer.Option(..., "--demos", help="JSONL of {prompt, response} safe demonstrations."),
    out: Path = typer.Option(..., "--out", "-o", help="Output control-vector GGUF."),
    model: str | None = ModelOpt,
    method: str = typer.Option("mean-diff", "--method", help="fv (function vector) | mean-diff."),
    layer: str | None = typer.Option(None, "--layer", help="Block to write (default ≈ n_layer/3); mean-diff "
                                        "also takes a comma list or 'all'."),
    heads: int = typer.Option(10, "--heads", help="fv: top-K heads by average indirect effect."),
    prompts: int = typer.Option(100, "--prompts", help="In-context prompts averaged (the paper: 100)."),
    shots: int = typer.Option(10, "--shots", help="Demonstrations per prompt (the paper: 10)."),
    aie_prompts: int = typer.Option(16, "--aie-prompts", help="fv: corrupted prompts per head in the AIE ranking."),
    gamma: float = typer.Option(1.0, "--gamma", help="Recommended γ to record in the file."),
    positions: str = typer.Option("generation", "--positions", help="Recommended positions to record."),
    seed: int = typer.Option(0, "--seed"),
    threads: int | None = ThreadsOpt, n_gpu_layers: int = GpuOpt,
) -> None:
    """Build a safety vector from the model's activations on safe demonstrations."""
    from ..core.demos import load_demos
    from ..core.models import resolve_model
    from ..llama.engine import Model
    from ..workflows.build import build_vector, parse_layers

    _check_finite("--gamma", gamma)
    if prompts < 1 or shots < 1 or aie_prompts < 1:
        raise UsageError("--prompts, --shots and --aie-prompts must be >= 1")
    _check_writable(out)
    d = load_demos(demos)
    m = Model(resolve_model(model), n_gpu_layers=n_gpu_layers)
    lay = parse_layers(layer, m, method)
    with _progress() as prog:
        v = build_vector(m, d, method=method, layers=lay, heads=heads, n_prompts=prompts, n_shots=shots,
                         seed=seed, aie_prompts=aie_prompts, progress=prog, n_threads=threads)
    v.gamma, v.positions = gamma, positions
    v.meta["build_command"] = "safeinfer vectors build " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else [])
    v.__post_init__()
    v.save(out)
    print(f"wrote {out} ({method}, layers {list(v.layers)}, n_embd {v.n_embd})", file=sys.stderr)


@vectors_app.command("inspect")
def vectors_inspect(file: Path = typer.Argument(..., help="Vector file."), as_json: bool = JsonOpt) -> None:
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
) -> None:
    """Convert a vector to our GGUF (loads in llama.cpp as a control vector), optionally setting metadata."""
    from ..core.vectors import SafetyVector

    _check_finite("--gamma", gamma)
    _check_writable(out)
    v = SafetyVector.load(src)
    lay = _parse_layers(layers)
    if lay:
        v = v.select(lay)
    if model_hint is not None:
        v.model_hint = model_hint
    if gamma is not None:
        v.gamma = gamma
    if positions is not None:
        v.positions = positions
    if guidance is not None or lam is not None:
        from ..core.sampling import check_lambda
        from ..decode.guidance import GuidanceSpec

        rec = dict(v.meta.get("sgds") or {})
        if guidance is not None:
            rec["guidance"] = str(GuidanceSpec.parse(guidance))
        if lam is not None:
            try:
                rec["lam"] = check_lambda(lam)
            except ValueError as e:
                raise UsageError(f"--lam: {e}") from None
        v.meta["sgds"] = rec
    v.__post_init__()
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
    model: str | None = ModelOpt, threads: int | None = ThreadsOpt,
    out: Path | None = typer.Option(None, "--out", help="Also write the rows as JSON Lines."),
    as_json: bool = JsonOpt,
) -> None:
    """Sweep layer × γ × positions: how each raises the refusal continuation's log-probability over base on
    harmful dev prompts, and how much refusal pressure lands on benign ones."""
    from ..api import SafeInfer
    from ..eval.sweep import dev_prompts, pick_best, sweep_sa

    lay = _parse_layers(layers)
    gs = _parse_floats("--gammas", gammas)
    if out:
        _check_writable(out)
    si = SafeInfer(model=model, vector=vector, n_threads=threads, warn=_warn)
    harmful, benign = dev_prompts(n_harmful, n_benign)
    with _progress() as prog:
        rows = sweep_sa(si, lay, gs, tuple(positions.split(",")), harmful, benign, progress=prog)
    if out:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
    _console().print(t)
    print(f"best: layer {best['layer']}, gamma {best['gamma']:g}, positions {best['positions']}")


def _console():
    """stdout for tables: its own width on a terminal; wide enough for whole tables in a file or a pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {parent}: {e.strerror}") from None
    import os

    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}: permission denied")


class _progress:
    """A rich progress bar on stderr when it is a terminal; plain lines otherwise."""

    def __enter__(self):
        self.tty = sys.stderr.isatty()
        self.tasks: dict[str, int] = {}
        self.last: dict[str, int] = {}
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=False)
            self.t0 = time.perf_counter()
            self.p.__enter__()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.tty:
            if stage not in self.tasks:
                self.tasks[stage] = self.p.add_task(stage, total=total, rate="")
            per_min = done / max(1e-9, time.perf_counter() - self.t0) * 60
            self.p.update(self.tasks[stage], completed=done, total=total, rate=f"{per_min:.1f}/min")
        else:
            step = max(1, total // 10)
            if done == total or done - self.last.get(stage, 0) >= step:
                self.last[stage] = done
                print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.tty:
            self.p.__exit__(*exc)
        return False


_ARGV: list[str] = []
"""The arguments of this run (recorded in reports so that they say how to reproduce them)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns every expected failure into one line and an exit code."""
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    if threading.current_thread() is threading.main_thread():
        interrupts.install()
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="safeinfer")
        return rv if isinstance(rv, int) else 0
    except SafeInferError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except _ClickError as e:
        msg = e.format_message().strip()
        if msg:
            print(msg if "\n" in msg else f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
