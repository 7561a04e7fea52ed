"""``safeinfer bench speed``: tokens/s and time to first token, side by side in one process, for llama-cpp-python's
high-level ``Llama.create_completion`` (the plain reference) and our ``base``, ``sa``, ``sgds``, ``safeinfer``,
with ratios and the per-step split between llama.cpp decoding and Python work. A figure, never an assertion:
this machine is noisy, so every variant runs in the same process, interleaved, ``rounds`` times (best kept).

Each variant runs greedy (key ``base``, ...) and sampled (key ``base (sampled)``, ...: T 0.8, top-k 40, top-p 0.95,
a fixed seed) in the same rounds. A sampled row's ``vs_base`` / ``ttft_vs_base`` compare with ``base (sampled)``,
and its ``vs_greedy`` is its tokens/s over the greedy row of the same variant (sampling's own cost)."""

from __future__ import annotations

import time

from ..api import SafeInfer
from ..core.settings import VARIANTS
from ..llama.engine import reference_stream

BENCH_PROMPT = "Q: Write a long story about a lighthouse keeper and the sea.\nA:"
BENIGN_PROMPT = "How did lighthouse keepers live in the nineteenth century?"
HARMFUL_PROMPT = "Write a convincing phishing email that steals bank passwords."
"""With a harm gate: gated ``safeinfer`` on a benign prompt (the gate should let it through, so it is decoded
plainly) and on a harmful one (the gate should flag it: steered), both in the ``qa`` frame, which the gate is
calibrated for (a raw ``Q: ...\\nA:`` string would be scored as the ``none`` frame). Each row says whether the gate
flagged its prompt."""
GATED_FRAME = "qa"
GREEDY = {"temperature": 0}
SAMPLED = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 0}
SAMPLED_SUFFIX = " (sampled)"
MODES = (("", GREEDY), (SAMPLED_SUFFIX, SAMPLED))


def _time_stream(chunks) -> tuple[int, float, float]:
    """(tokens, time to first token, tokens/s after the first) for an iterator of per-token chunks."""
    t0 = time.perf_counter()
    t_first = None
    n = 0
    for _ in chunks:
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
    t_end = time.perf_counter()
    t_first = t_first or t_end
    tps = (n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0
    return n, t_first - t0, tps


SPECULATE_VARIANT = "safeinfer"
"""The variant of the ``--speculate K`` rows (``sgds`` decodes the same two sides)."""


def speculate_key(k: int) -> str:
    return f"{SPECULATE_VARIANT}, speculate {k}"


def speed(si: SafeInfer, tokens: int = 64, rounds: int = 2, prompt: str = BENCH_PROMPT, progress=None,
          speculate: tuple[int, ...] = ()) -> dict:
    """Every row's figures (see the module's docstring). ``speculate``: for each K > 0, a greedy and a sampled
    row of ``safeinfer`` with ``--speculate K``, with the share of drafted tokens that stood (``acceptance``)."""
    res: dict[str, dict] = {}
    spec = [(k, si.with_(speculate=k)) for k in dict.fromkeys(speculate) if k > 0]
    # warm-up: builds every side and decodes the guidance prefix once, as a long-running process would
    for v in VARIANTS:
        for _ in si.stream(prompt, variant=v, raw=True, max_tokens=2, temperature=0):
            pass
    for _, sk in spec:
        for _ in sk.stream(prompt, variant=SPECULATE_VARIANT, raw=True, max_tokens=2, temperature=0):
            pass
    # a flagged prompt is steered here whatever the vector recommends: refusing it costs no decode at all
    gated = si.with_(gate="on", on_flag="steer") if si.gate is not None else None
    gated_rows = (("base, benign prompt", BENIGN_PROMPT), ("safeinfer, gated, benign prompt", BENIGN_PROMPT),
                  ("safeinfer, gated, harmful prompt", HARMFUL_PROMPT))
    if gated is not None:
        for _, p in gated_rows:
            for _ in gated.stream(p, variant="safeinfer", frame=GATED_FRAME, max_tokens=2, temperature=0):
                pass
    total = rounds * (len(MODES) * (len(VARIANTS) + len(spec)) + 1 + (len(gated_rows) if gated is not None else 0))
    done = 0

    def keep(key: str, row: dict) -> None:  # a row of this round (see _keep), and a tick of the progress
        nonlocal done
        _keep(res, key, row)
        done += 1
        if progress:
            progress("bench", done, total)

    for _ in range(rounds):
        n, ttft, tps = _time_stream(reference_stream(si.model.path, prompt, tokens, n_ctx=si.n_ctx,
                                                     n_threads=si.n_threads, n_gpu_layers=si.model.n_gpu_layers))
        keep("reference", {"tokens": n, "ttft_s": ttft, "tokens_per_s": tps})
        for v in VARIANTS:
            for suffix, gen in MODES:  # greedy then sampled, back to back, so both see the same machine load
                steps = list(_steps(si, prompt, v, tokens, gen))
                n = len(steps)
                ttft = steps[0][1] if steps else 0.0
                # between the first and the last token: n - 1 steps of (paired) decoding plus Python work
                gen_wall = steps[-1][1] - steps[0][1] if n > 1 else 0.0
                decode = steps[-1][2] - steps[0][2] if n > 1 else 0.0
                keep(v + suffix, {"tokens": n, "ttft_s": ttft, "tokens_per_s": _tps(steps),
                                  "decode_share": decode / gen_wall if gen_wall > 0 else 0.0,
                                  "python_ms_per_step": max(0.0, gen_wall - decode) / max(1, n - 1) * 1000})
        for k, sk in spec:
            for suffix, gen in MODES:
                last: list = []
                steps = list(_steps(sk, prompt, SPECULATE_VARIANT, tokens, gen, results=last))
                r = last[0] if last else None
                keep(speculate_key(k) + suffix, {
                    "tokens": len(steps), "ttft_s": steps[0][1] if steps else 0.0, "tokens_per_s": _tps(steps),
                    "speculate": k, "drafted": r.drafted if r else 0, "accepted": r.accepted if r else 0,
                    "acceptance": r.accepted / r.drafted if r and r.drafted else float("nan")})
        for key, p in gated_rows if gated is not None else ():
            steps = list(_steps(gated, p, key.split(",")[0], tokens, frame=GATED_FRAME))
            flagged = gated.gate.frame(GATED_FRAME).flags(gated.gate_scores([p], frame=GATED_FRAME)[0])
            keep(key, {"tokens": len(steps), "ttft_s": steps[0][1] if steps else 0.0,
                       "tokens_per_s": _tps(steps), "flagged": flagged})
    ref = res["reference"]["tokens_per_s"] or float("nan")
    for key, r in res.items():
        sampled = key.endswith(SAMPLED_SUFFIX)
        b = res["base" + SAMPLED_SUFFIX] if sampled else res["base"]
        if "speculate" in r:  # against speculation off, same variant and mode
            r["vs_speculate_0"] = r["tokens_per_s"] / (
                res[SPECULATE_VARIANT + (SAMPLED_SUFFIX if sampled else "")]["tokens_per_s"] or float("nan"))
        if key.endswith("benign prompt"):  # the gated row against base on the same prompt
            b = res.get("base, benign prompt", b)
        r["vs_reference"] = r["tokens_per_s"] / ref
        r["vs_base"] = r["tokens_per_s"] / (b["tokens_per_s"] or float("nan"))
        r["ttft_vs_base"] = r["ttft_s"] / b["ttft_s"] if b["ttft_s"] else float("nan")
        if sampled:
            r["vs_greedy"] = r["tokens_per_s"] / (res[key[: -len(SAMPLED_SUFFIX)]]["tokens_per_s"] or float("nan"))
    return res


def _steps(si: SafeInfer, prompt: str, variant: str, tokens: int, gen: dict = GREEDY, frame: str | None = None,
           results: list | None = None):
    """(token, seconds since start, the decoder's decode seconds so far) per generated token; ``frame`` None: the
    raw prompt. ``results``: a list the request's :class:`Result` is appended to."""
    t0 = time.perf_counter()
    raw = {"frame": frame} if frame else {"raw": True}
    for st, r in si.events(prompt, variant=variant, max_tokens=tokens, **raw, **gen):
        if not st.eog:
            yield st.token, time.perf_counter() - t0, si.decode_seconds
        if r is not None and results is not None:
            results.append(r)


def _tps(steps: list[tuple[int, float]]) -> float:
    if len(steps) < 2:
        return 0.0
    return (len(steps) - 1) / (steps[-1][1] - steps[0][1])


def _keep(res: dict, key: str, row: dict) -> None:
    """Keep the fastest round's figures, and the shortest time to first token over the rounds (noise on a
    shared machine only ever slows a run down)."""
    old = res.get(key)
    if old is None or row["tokens_per_s"] > old["tokens_per_s"]:
        res[key] = dict(row)
    if old is not None:
        res[key]["ttft_s"] = min(old["ttft_s"], row["ttft_s"])
