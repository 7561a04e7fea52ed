"""``generate``, ``score``, ``chat`` and ``demo``."""

from __future__ import annotations

import json
import sys
import time

import typer

from ..core.frames import resolve_frame
from ..errors import UsageError
from . import options as o
from .app import app


@app.command()
def generate(
    prompt: str | None = typer.Argument(None, help="The prompt (default: read stdin)."),
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    layers: str | None = o.LayersOpt, positions: str | None = o.PositionsOpt, variant: str | None = o.VariantOpt,
    guidance: str | None = o.GuidanceOpt, lam: float | None = o.LamOpt, raw: bool = o.RawOpt,
    speculate: int = o.SpeculateOpt,
    frame: str | None = o.FrameOpt, stop: list[str] | None = o.StopOpt,
    max_tokens: int = o.MaxTokensOpt, temperature: float = o.TemperatureOpt, top_k: int = o.TopKOpt,
    top_p: float = o.TopPOpt, seed: int | None = o.SeedOpt,
    n_ctx: int = o.NCtxOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    gate: str = o.GateOpt, gate_threshold: float | None = o.GateThresholdOpt, on_flag: str | None = o.OnFlagOpt,
    refusal: str = o.RefusalOpt,
    chat_format: str | None = o.ChatFmtOpt, as_json: bool = o.JsonOpt,
) -> None:
    """Generate a reply to PROMPT with a variant (base: plain; sa: safety amplification; sgds: safety-guided
    decoding; safeinfer: both)."""
    text = o.read_prompt(prompt)
    gen = o.gen_options(max_tokens, temperature, top_k, top_p, seed, stop)
    fr = resolve_frame(raw, frame)
    si = o.load_from(locals())
    if as_json:
        res = si.generate(text, frame=fr, **gen)
        out = res.to_dict() | {"model": si.model.name} | si.settings.describe()
        print(json.dumps(out, ensure_ascii=False))
        return
    t0 = time.perf_counter()
    n = 0
    for step in si.stream(text, frame=fr, **gen):
        sys.stdout.write(step.text)
        sys.stdout.flush()
        n += not step.eog
    sys.stdout.write("\n")
    if sys.stderr.isatty():
        dt = time.perf_counter() - t0
        print(f"[{si.default_variant()}] {n} tokens, {n / dt if dt else 0:.1f} tok/s", file=sys.stderr)


@app.command()
def score(
    prompt: str = typer.Argument(..., help="The prompt."),
    continuation: str = typer.Argument(..., help="The continuation to score (tokenized without BOS)."),
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    layers: str | None = o.LayersOpt, positions: str | None = o.PositionsOpt, variant: str | None = o.VariantOpt,
    guidance: str | None = o.GuidanceOpt, lam: float | None = o.LamOpt, raw: bool = o.RawOpt,
    frame: str | None = o.FrameOpt, n_ctx: int = o.NCtxOpt,
    threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    gate: str = o.GateOpt, gate_threshold: float | None = o.GateThresholdOpt, on_flag: str | None = o.OnFlagOpt,
    refusal: str = o.RefusalOpt,
    chat_format: str | None = o.ChatFmtOpt, as_json: bool = o.JsonOpt,
) -> None:
    """Teacher-forced log-probability of CONTINUATION after PROMPT under a variant's distribution (T = 1)."""
    fr = resolve_frame(raw, frame)
    si = o.load_from(locals())
    s = si.score(prompt, continuation, frame=fr)
    if as_json:
        print(json.dumps(s.to_dict(), ensure_ascii=False))
    else:
        print(f"logprob {s.logprob:.4f}  n_tokens {s.n_tokens}  per_token {s.logprob / s.n_tokens:.4f}  "
              f"variant {s.variant}")


@app.command()
def demo(
    n: int = typer.Option(4, "--prompts", help="Harmful (CatQA) and benign (XSTest) prompts to show, each."),
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    guidance: str | None = o.GuidanceOpt, lam: float | None = o.LamOpt,
    threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt, as_json: bool = o.JsonOpt,
) -> None:
    """A non-interactive tour on the default model: harmful and benign prompts side by side, with what the
    shipped settings (harm gate, recommended --on-flag) do to each; then each variant's margin log p(refusal) −
    log p(compliant opening) after the harmful ones (a 270M base model never refuses by itself)."""
    from ..core.settings import VARIANTS
    from ..workflows import demo as tour

    if n < 1:
        raise UsageError(f"--prompts must be >= 1, not {n}")
    doc = tour.run(o.load(model=model, vector=vector, gamma=gamma, threads=threads, n_gpu_layers=n_gpu_layers,
                          guidance=guidance, lam=lam), n)
    if as_json:
        print(json.dumps(doc))
        return
    print("model {model}; variant {variant}; SA: layers {layers}, gamma {gamma:g}, positions {positions}; "
          "sGDS: guidance {guidance}, lambda {lam:g}".format(**doc))
    how = (f"harm gate on, a flagged prompt is {'refused' if doc['on_flag'] == 'refuse' else 'steered'} "
           f"(--on-flag {doc['on_flag']}), a passed one decoded plainly" if doc["gate"] else "no harm gate: every "
           "prompt is steered")
    print(f"\n1. What these settings do (`safeinfer generate PROMPT`: chat template, greedy; {how}):")
    for r in doc["side_by_side"]:
        score = "" if r["gate_score"] is None else f" score {r['gate_score']:+.3f}"
        print(f"  [{'harmful' if r['harmful'] else 'benign '}] {r['prompt'][:70]!r}")
        print(f"      {r['done']}{score}: {' '.join(r['reply'].split())[:90]!r}")
    print(f"\n2. Margin = log p({doc['refusal']!r}) - log p({doc['comply']!r}) after 'Q: <harmful question>\\nA:' "
          "(nats), every variant ungated:")
    rows = doc["rows"]
    print("  " + "".join(f"{v:>10}" for v in VARIANTS) + "  gate     prompt")
    for r in rows:
        gate = {True: "flagged", False: "passed", None: "-"}[r["gate_flagged"]]
        print("  " + "".join(f"{r[v]:10.2f}" for v in VARIANTS) + f"  {gate:8} {r['prompt'][:50]}")
    for v in VARIANTS[1:]:
        up = sum(r[v] > r["base"] for r in rows)
        print(f"{v}: margin above base on {up} of {len(rows)} prompts")


@app.command()
def chat(
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    layers: str | None = o.LayersOpt, positions: str | None = o.PositionsOpt, variant: str | None = o.VariantOpt,
    guidance: str | None = o.GuidanceOpt, lam: float | None = o.LamOpt, speculate: int = o.SpeculateOpt,
    system: str | None = typer.Option(None, "--system", help="System message."),
    stop: list[str] | None = o.StopOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Most tokens per reply."),
    temperature: float = o.TemperatureOpt, top_k: int = o.TopKOpt, top_p: float = o.TopPOpt,
    seed: int | None = o.SeedOpt,
    n_ctx: int = o.NCtxOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    gate: str = o.GateOpt, gate_threshold: float | None = o.GateThresholdOpt, on_flag: str | None = o.OnFlagOpt,
    refusal: str = o.RefusalOpt,
    chat_format: str | None = o.ChatFmtOpt,
) -> None:
    """Chat in the terminal: streaming replies, multi-turn, slash commands (/help). With stdin not a terminal,
    each input line is a user turn and replies are printed as plain text."""
    from ..workflows.chatloop import ChatSession

    gen = o.gen_options(max_tokens, temperature, top_k, top_p, seed, stop)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    si = o.load_from(locals())
    sess = ChatSession(si, si.default_variant(), system, gen=gen)
    if tty:
        print(f"safeinfer chat — {si.model.name}, variant {sess.variant}. /help for commands, /quit to leave.")
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        except UnicodeDecodeError as e:
            raise UsageError(f"standard input is not UTF-8 text ({e.reason} at byte {e.start})") from None
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
