"""The ``safeinfer`` command line: a thin layer over the library, one module per command group
(``generate``: generate, score, chat, demo; ``batch``: filter, merge; ``bench``: bench speed/harm/report,
calibrate; ``vectors``: vectors build/inspect/convert/sweep; ``serve``: the HTTP server), with the shared options
in ``options``. Errors become one line on stderr and an exit code (2 for unusable arguments or files), never a
traceback."""

from __future__ import annotations

import importlib
import sys
import threading

import typer

try:  # newer typer vendors click; older versions use the click package
    from typer._click.exceptions import ClickException as _ClickError
except ImportError:  # pragma: no cover
    from click import ClickException as _ClickError

from ..errors import SafeInferError
from ..llama import interrupts  # the SIGINT handler only: imports no llama_cpp
from .app import app
from .options import _ARGV

# registers the commands, in the order --help lists them
for _group in ("generate", "batch", "bench", "vectors", "serve"):
    importlib.import_module(f"{__name__}.{_group}")


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

