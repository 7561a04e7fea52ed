"""``serve``: the OpenAI-compatible server (the work is in :mod:`safeinfer_local.serve`)."""

from __future__ import annotations

import sys

import typer

from ..core.settings import DEFAULT_MAX_TOKENS
from ..errors import UsageError
from . import options as o
from .app import app

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    model: str | None = o.ModelOpt, vector: str | None = o.VectorOpt, gamma: float | None = o.GammaOpt,
    layers: str | None = o.LayersOpt, positions: str | None = o.PositionsOpt, variant: str | None = o.VariantOpt,
    guidance: str | None = o.GuidanceOpt, lam: float | None = o.LamOpt, speculate: int = o.SpeculateOpt,
    gate: str = o.GateOpt, gate_threshold: float | None = o.GateThresholdOpt, on_flag: str | None = o.OnFlagOpt,
    refusal: str = o.RefusalOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (another than loopback exposes "
                             "the model to the network: use --api-key)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    parallel: int = typer.Option(4, "--parallel", "-p", help="Requests decoded in the same batch (per settings "
                                 "group; see the README's Server section)."),
    queue: int = typer.Option(16, "--queue", help="Requests that may wait for a slot; one more gets HTTP 503 "
                              "with Retry-After."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="SAFEINFER_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on every route but /health."),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n",
                                   help="Most tokens per reply when a request does not say."),
    name: str | None = typer.Option(None, "--name", help="Model id in /v1/models and responses (default: the GGUF "
                                    "file's name)."),
    max_body: int | None = typer.Option(None, "--max-body", help="Largest request body in bytes; a larger one gets "
                                        "413 before it is parsed (default: 1 MiB + 256 bytes per context token)."),
    log_level: str = typer.Option("info", "--log-level", help="critical | error | warning | info | debug."),
    n_ctx: int = o.NCtxOpt, threads: int | None = o.ThreadsOpt, n_gpu_layers: int = o.GpuOpt,
    chat_format: str | None = o.ChatFmtOpt,
) -> None:
    """Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models,
    /v1/moderations, /health), safety settings per request in a "safeinfer" body object."""
    o.check_parallel(parallel)
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be in 0..65535, not {port}")
    if queue < 0:
        raise UsageError(f"--queue must be >= 0, not {queue}")
    o.check_max_tokens(max_tokens)
    if max_body is not None and max_body < 1024:
        raise UsageError(f"--max-body must be at least 1024 bytes, not {max_body}")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise UsageError(f"unknown --log-level {log_level!r}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key must not be empty")
    if host not in LOOPBACK and not api_key:
        o.warn(f"listening on {host} without --api-key: anyone who can reach it can use the model")
    si = o.load_from(locals())
    from ..serve import create_app, run

    application = create_app(si, parallel, queue, api_key, name, max_tokens, max_body=max_body)
    print(f"safeinfer serve: {si.model.name}, variant {si.default_variant()}, {parallel} slots, "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    run(application, host, port, log_level)
