"""The HTTP side: :func:`create_app`, a FastAPI app with OpenAI's routes (:mod:`.routes`) over one
:class:`~.scheduler.Scheduler`, its error mapping and body limit, and :func:`run`, which serves it with uvicorn
until Ctrl-C or SIGTERM, drains what is in flight and returns."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import SafeInfer
from ..core.settings import DEFAULT_MAX_TOKENS
from ..errors import UsageError
from . import protocol as p
from .routes import Served, public, v1
from .scheduler import Scheduler


def default_max_body(n_ctx: int) -> int:
    """The largest request body the server reads by default: 1 MiB plus 256 bytes per context token (a token is
    a few bytes of text, and JSON escaping or a moderation batch of several inputs multiplies that), so a body
    far beyond anything the context could hold is refused before it is parsed or tokenized."""
    return (1 << 20) + 256 * n_ctx


class _TooLarge(StarletteHTTPException):
    """Raised while a body is read (an HTTPException, so that FastAPI's body parsing passes it on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413)
        self.limit = limit


def _too_large(limit: int) -> JSONResponse:
    err = p.ApiError(413, f"the request body is larger than {limit} bytes, the most this server reads "
                     "(serve --max-body)", None, "request_too_large")
    return JSONResponse(err.body(), 413)


class BodyLimit:
    """A request body above ``limit`` bytes gets 413 with an OpenAI-style error, before it is parsed: at once when
    its Content-Length says so, else as soon as the bytes read pass the limit (a chunked body). Pure ASGI, like
    the API key check."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            return await _too_large(self.limit)(scope, receive, send)
        seen, started = 0, False

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge:
            if not started:
                await _too_large(self.limit)(scope, receive, send)


def _error_response(e: p.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


# -- errors: every one an OpenAI-style body ----------------------------------------------------------------
async def _api_error(request: Request, e: p.ApiError):
    return _error_response(e)


async def _invalid(request: Request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        why = first.get("ctx", {}).get("error", "")
        return _error_response(p.ApiError(400, f"the body is not valid JSON: {why}".rstrip(": "), None,
                                          "invalid_json"))
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return _error_response(p.ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid')}", param,
                                      "invalid_value"))


async def _body_too_large(request: Request, e: _TooLarge):
    return _too_large(e.limit)


async def _http(request: Request, e: StarletteHTTPException):
    return JSONResponse(p.error_body(str(e.detail), "invalid_request_error", None, None), e.status_code,
                        headers=getattr(e, "headers", None))


async def _internal(request: Request, e: Exception):
    return _error_response(p.ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error"))


HANDLERS = {p.ApiError: _api_error, RequestValidationError: _invalid, _TooLarge: _body_too_large,
            StarletteHTTPException: _http, Exception: _internal}
"""The exception handlers of the app, by what they answer."""


def create_app(si: SafeInfer, parallel: int = 4, queue: int = 16, api_key: str | None = None,
               model_name: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, warm: bool = True,
               max_body: int | None = None) -> FastAPI:
    """The server for ``si`` (its settings are the defaults of every request). The engine thread starts with the
    app's lifespan and stops after it. ``max_body``: the largest request body read (default:
    :func:`default_max_body` of the context size)."""
    sched = Scheduler(si, parallel, queue, warm=warm)
    model_id = model_name or si.model.path.stem
    p._check("--max-tokens", p.check_max_tokens, max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.get_running_loop().run_in_executor(None, sched.start)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, sched.close)

    app = FastAPI(title="safeinfer", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = Served(si, sched, model_id, max_tokens, api_key or None)
    app.add_middleware(BodyLimit, limit=default_max_body(si.n_ctx) if max_body is None else max_body)

    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.include_router(public)
    app.include_router(v1)
    return app


def _ignore(signum, frame) -> None:
    pass


def run(app: FastAPI, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM; then stop accepting, finish every request in flight (a second Ctrl-C
    cuts that short), stop the engine and return. uvicorn re-raises the signal that stopped it once it has shut
    down, so that a process left with default handlers dies of it; this server's exit after a drain is a normal
    one (0), so the handlers it restores are no-ops."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.signal(s, _ignore) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind or the app does not start; it has logged why
        raise UsageError(f"could not serve on {host}:{port} (see the lines above)") from None
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


class Background:
    """A server running in a thread of this process (:func:`start`): ``url`` is its ``/v1`` base URL."""

    def __init__(self, server, thread: threading.Thread, host: str) -> None:
        self.server, self.thread = server, thread
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}/v1"

    def stop(self, timeout: float = 60.0) -> None:
        """Drain and stop, as a signal would."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Background:
    """Serve ``app`` from a thread of this process (port 0: a free one), for notebooks, tests and benchmarks;
    returns once it accepts connections."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, name="safeinfer-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise UsageError(f"could not serve on {host}:{port} (see the lines above)")
        time.sleep(0.05)
    return Background(server, thread, host)
