"""The typer apps the command modules register on."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SafeInfer decoding-time safety alignment for local GGUF models (llama.cpp).")
vectors_app = typer.Typer(no_args_is_help=True,
                          help="Build, inspect and convert safety vectors (GGUF control vectors).")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures, not assertions).")
app.add_typer(vectors_app, name="vectors")
app.add_typer(bench_app, name="bench")
