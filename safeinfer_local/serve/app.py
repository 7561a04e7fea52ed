"""The HTTP side: a FastAPI app with OpenAI's routes over one :class:`~.scheduler.Scheduler`, and :func:`run`, which
serves it with uvicorn until Ctrl-C or SIGTERM, drains what is in flight and returns.

Handlers never call the model: they check the request, submit a job, and await its updates, which the engine
thread hands over with ``loop.call_soon_threadsafe``. A reply's status is chosen once its first token (or its
error) is known, so a prompt that cannot run is a 4xx even when streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import SafeInfer
from ..core.settings import DEFAULT_MAX_TOKENS
from ..errors import ContextOverflowError, UsageError
from . import protocol as p
from .scheduler import Busy, Done, Failed, Job, Scheduler, Token, is_client_error

RETRY_AFTER_S = 1
OPEN_PATHS = ("/health",)


class BearerAuth:
    """Every route but ``/health`` needs ``Authorization: Bearer KEY`` (a pure ASGI middleware, so that streaming
    and disconnects pass through untouched)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        err = p.ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key")
        await JSONResponse(err.body(), 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


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
    :class:`BearerAuth`."""

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


def _submit_or_503(submit, *args) -> None:
    """Hand work to the engine thread; a full queue is 503 with Retry-After (the one place that says so)."""
    try:
        submit(*args)
    except Busy as e:
        raise p.ApiError(503, str(e), None, "server_busy", "server_error",
                         {"Retry-After": str(RETRY_AFTER_S)}) from None


def _error_response(e: p.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def _failed(e: BaseException) -> p.ApiError:
    if isinstance(e, ContextOverflowError):
        return p.ApiError(400, str(e), "messages", "context_length_exceeded")
    if is_client_error(e):
        return p.ApiError(400, str(e), None, "invalid_value")
    return p.ApiError(500, f"the engine failed: {e}", None, "engine_error")


async def _first(aq: asyncio.Queue, request: Request, sched: Scheduler, job_id: int):
    """The job's first update, or ``None`` when the client went away first (the job is cancelled)."""
    get = asyncio.ensure_future(aq.get())

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if get in done:
        return get.result()
    get.cancel()
    sched.cancel(job_id)
    return None


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
    app.state.scheduler = sched
    app.add_middleware(BodyLimit, limit=default_max_body(si.n_ctx) if max_body is None else max_body)
    if api_key:  # added last, so it runs first: a client without the key learns nothing about the limit
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.exception_handler(p.ApiError)
    async def _api_error(request: Request, e: p.ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(_TooLarge)
    async def _body_too_large(request: Request, e: _TooLarge):
        return _too_large(e.limit)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(p.error_body(str(e.detail), "invalid_request_error", None, None), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return _error_response(p.ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "parallel": sched.parallel, **sched.stats,
                "decode_s": round(si.decode_seconds, 3)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "safeinfer_local"}]}

    async def generate(kind: str, req: p._Generation, prompt, frame: str, request: Request):
        cfg = p.gen_config(req, max_tokens)
        rsi, variant, fr = p.settings_for(si, req.safeinfer)
        if kind == "chat" and fr not in (None, "template"):
            raise p.ApiError(400, "chat messages go through the chat template (frame 'template')",
                             "safeinfer.frame", "invalid_value")
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue = asyncio.Queue()

        def sink(update) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(aq.put_nowait, update)

        job = Job(rsi, variant, prompt, fr or frame, cfg, sink, stream=bool(req.stream))
        _submit_or_503(sched.submit, job)
        first = await _first(aq, request, sched, job.id)
        if first is None:
            return JSONResponse(p.error_body("client closed the request"), 499)
        if isinstance(first, Failed):
            raise _failed(first.error)
        rid = p.new_id("chatcmpl" if kind == "chat" else "cmpl")
        if not req.stream:
            return p.completion_body(kind, rid, model_id, rsi, first)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(kind, rid, rsi, job, first, aq, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _stream(kind: str, rid: str, rsi: SafeInfer, job: Job, update, aq: asyncio.Queue,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        finished = False
        try:
            if kind == "chat":
                yield p.sse(p.chunk(kind, rid, model_id, created, role=True))
            while True:
                if isinstance(update, Token):
                    if update.step.text:
                        yield p.sse(p.chunk(kind, rid, model_id, created, update.step.text))
                elif isinstance(update, Done):
                    finished = True
                    if update.step.text:
                        yield p.sse(p.chunk(kind, rid, model_id, created, update.step.text))
                    last = p.chunk(kind, rid, model_id, created, finish=p.FINISH.get(update.result.stop_reason, "stop"))
                    last["safeinfer"] = p.applied(rsi, update)
                    yield p.sse(last)
                    if include_usage:
                        yield p.sse({"id": rid, "object": last["object"], "created": created, "model": model_id,
                                     "choices": [], "usage": p.usage(update)})
                    yield p.DONE
                    return
                else:  # Failed mid-stream (the engine broke): say so in-band, then end the stream
                    finished = True
                    yield p.sse(_failed(update.error).body())
                    yield p.DONE
                    return
                update = await aq.get()
        finally:
            if not finished:  # the client went away (or the server forced its exit): free the slot
                sched.cancel(job.id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: p.ChatRequest, request: Request):
        return await generate("chat", req, p.chat_messages(req), "template", request)

    @app.post("/v1/completions")
    async def completions(req: p.CompletionRequest, request: Request):
        return await generate("text", req, p.completion_prompt(req), "none", request)

    @app.post("/v1/moderations")
    async def moderations(req: p.ModerationRequest, request: Request):
        inputs = [req.input] if isinstance(req.input, str) else list(req.input)
        if not inputs or len(inputs) > p.MAX_MODERATION_INPUTS or not all(x.strip() for x in inputs):
            raise p.ApiError(400, f"input must be 1..{p.MAX_MODERATION_INPUTS} non-empty strings", "input",
                             "invalid_value")
        rsi, _, fr = p.settings_for(si, req.safeinfer)
        frame = fr or "template"
        gate = rsi.active_gate("safeinfer")  # the gate a steered call would go through (None when off or absent)
        if gate is None:
            raise p.ApiError(400, "moderation needs a vector with a harm gate (build one with `safeinfer vectors "
                             "gate`), and a gate that is not off", None, "moderation_unavailable")
        fg = gate.frame(frame)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def sink(value) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

        def verdicts(_):  # on the engine thread: the gate's Route for every input, many per decode
            routes = rsi.route_many([rsi.encode_prompt(x, frame=frame)[0] for x in inputs], "safeinfer", frame)
            bad = next((r for r in routes if isinstance(r, UsageError)), None)
            if bad is not None:
                raise bad
            return routes

        _submit_or_503(sched.call, verdicts, sink)
        value = await fut
        if isinstance(value, BaseException):
            raise _failed(value)
        return p.moderation_body(model_id, value, fg.threshold, frame, gate.block)

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
