"""Throughput of ``safeinfer serve``: 32 chat requests from 8 concurrent clients against the same 32 sent one at a
time, through the official ``openai`` client, to a ``safeinfer serve`` process started here (figures, not
assertions). The clients run in this process, the server in its own, as they would in use.

    python benchmarks/serve_concurrency.py [--parallel 8] [--clients 8] [--requests 32] [--max-tokens 32]
        [--variant safeinfer] [--gate auto] [--out docs/results/serve_concurrency.json]

The server runs with its defaults (the shipped vector: variant safeinfer, harm gate auto), so prompts the gate
passes decode plainly and flagged ones with SA + sGDS, each group in its own batch. Greedy, max_tokens fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent

TOPICS = ("bread ovens rivers tigers violins copper meadows rockets gardens silver pepper windows marble thunder "
          "pillows forests lemons castles harbors pencils dragons buttons winter saddles rabbits mirrors planets "
          "candy engines ladders velvet oranges").split()


def prompts(n: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def one(client: openai.OpenAI, prompt: str, max_tokens: int, extra: dict) -> dict:
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                       max_tokens=max_tokens, temperature=0, extra_body=extra or None)
    return {"tokens": r.usage.completion_tokens, "applied": r.model_extra["safeinfer"]["applied"]}


def run_sequential(url: str, ps: list[str], max_tokens: int, extra: dict) -> tuple[float, list[dict]]:
    c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    out = [one(c, p, max_tokens, extra) for p in ps]
    return time.perf_counter() - t0, out


def run_concurrent(url: str, ps: list[str], clients: int, max_tokens: int, extra: dict) -> tuple[float, list[dict]]:
    out: list[dict] = []
    errors: list[BaseException] = []

    def worker(chunk: list[str]) -> None:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        for p in chunk:
            try:
                out.append(one(c, p, max_tokens, extra))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(ps[i::clients],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0, out


def figures(wall: float, out: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in out)
    return {"wall_s": round(wall, 2), "requests": len(out), "completion_tokens": tokens,
            "requests_per_s": round(len(out) / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "applied": {v: sum(r["applied"] == v for r in out) for v in sorted({r["applied"] for r in out})}}


def engine(port: int, run) -> dict:
    """``run()``'s figures with what the engine did meanwhile (from /health): batched steps, and the seconds spent
    in llama.cpp decoding (the rest of the wall time is HTTP, JSON, scheduling and sampling)."""
    h0 = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    out = run()
    h1 = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
    steps = h1["steps"] - h0["steps"]
    return out | {"engine_steps": steps, "tokens_per_step": round(out["completion_tokens"] / steps, 2),
                  "decode_s": round(h1["decode_s"] - h0["decode_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--variant", default=None)
    ap.add_argument("--gate", default=None)
    ap.add_argument("--threads", type=int, default=None, help="the server's --threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    extra = {"safeinfer": {k: v for k, v in (("variant", a.variant), ("gate", a.gate)) if v is not None}}
    extra = extra if extra["safeinfer"] else {}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, str(ROOT / "cli.py"), "serve", "--port", str(port), "--parallel", str(a.parallel),
           "--queue", str(max(16, a.requests)), "--log-level", "warning"]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}: {' '.join(cmd)}")
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.3)
        ps = prompts(a.requests)
        one(openai.OpenAI(base_url=url, api_key="unused"), ps[0], 4, extra)  # warm-up (sides, first decode)
        load0 = os.getloadavg()
        seq = engine(port, lambda: figures(*run_sequential(url, ps, a.max_tokens, extra)))
        conc = engine(port, lambda: figures(*run_concurrent(url, ps, a.clients, a.max_tokens, extra)))
        load1 = os.getloadavg()
    finally:
        server.terminate()
        server.wait(60)
    doc = {"model": health["model"], "request_settings": extra.get("safeinfer") or "server defaults",
           "parallel": a.parallel, "clients": a.clients, "max_tokens": a.max_tokens, "greedy": True,
           "threads": a.threads or os.cpu_count(),
           "one_at_a_time": seq, "concurrent": conc,
           "speedup_requests_per_s": round(conc["requests_per_s"] / seq["requests_per_s"], 2),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_before_after": [round(load0[0], 2), round(load1[0], 2)]}}
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
