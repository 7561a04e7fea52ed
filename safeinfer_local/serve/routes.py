"""OpenAI's routes as module-level functions on two routers: :data:`public` (``/health``) and :data:`v1` (every
``/v1`` route, behind :func:`require_key`, the API key as a dependency). A route reaches the server it runs in
through :func:`served` (``request.app.state.served``, set by :func:`~.app.create_app`): to add an endpoint, write
its function here on ``v1`` with its request body in :mod:`.protocol`, and hand any work to the engine thread
through :func:`_submit_or_503`.

Handlers never call the model: they check the request, submit a job, and await its updates, which the engine
thread hands over with ``loop.call_soon_threadsafe``. A reply's status is chosen once its first token (or its
error) is known, so a prompt that cannot run is a 4xx even when streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..api import SafeInfer
from ..errors import ContextOverflowError, UsageError
from . import protocol as p
from .scheduler import Busy, Done, Failed, Job, Scheduler, Token, is_client_error

RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Served:
    """What the routes of one app share: the loaded settings (every request's defaults), the engine thread, the
    model name it answers to, the default ``max_tokens`` and the API key (None: no key needed)."""

    si: SafeInfer
    sched: Scheduler
    model_id: str
    max_tokens: int
    api_key: str | None = None


def served(request: Request) -> Served:
    return request.app.state.served


async def require_key(request: Request) -> None:
    """Every ``/v1`` route needs ``Authorization: Bearer KEY`` when the server has a key (401 otherwise)."""
    key = served(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return
    raise p.ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", None, "invalid_api_key",
                     headers={"WWW-Authenticate": "Bearer"})


public = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


def _submit_or_503(submit, *args) -> None:
    """Hand work to the engine thread; a full queue is 503 with Retry-After (the one place that says so)."""
    try:
        submit(*args)
    except Busy as e:
        raise p.ApiError(503, str(e), None, "server_busy", "server_error",
                         {"Retry-After": str(RETRY_AFTER_S)}) from None


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


@public.get("/health")
async def health(request: Request):
    s = served(request)
    return {"status": "ok", "model": s.model_id, "parallel": s.sched.parallel, **s.sched.stats,
            "decode_s": round(s.si.decode_seconds, 3)}


@v1.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [{"id": served(request).model_id, "object": "model", "created": 0,
                                        "owned_by": "safeinfer_local"}]}


async def generate(kind: str, req: p._Generation, prompt, frame: str, request: Request):
    """A chat or text completion: checked, submitted, answered whole or streamed."""
    s = served(request)
    cfg = p.gen_config(req, s.max_tokens)
    rsi, variant, fr = p.settings_for(s.si, req.safeinfer)
    if kind == "chat" and fr not in (None, "template"):
        raise p.ApiError(400, "chat messages go through the chat template (frame 'template')",
                         "safeinfer.frame", "invalid_value")
    loop = asyncio.get_running_loop()
    aq: asyncio.Queue = asyncio.Queue()

    def sink(update) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(aq.put_nowait, update)

    job = Job(rsi, variant, prompt, fr or frame, cfg, sink, stream=bool(req.stream))
    _submit_or_503(s.sched.submit, job)
    first = await _first(aq, request, s.sched, job.id)
    if first is None:
        return JSONResponse(p.error_body("client closed the request"), 499)
    if isinstance(first, Failed):
        raise _failed(first.error)
    rid = p.new_id("chatcmpl" if kind == "chat" else "cmpl")
    if not req.stream:
        return p.completion_body(kind, rid, s.model_id, rsi, first)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_stream(s, kind, rid, rsi, job, first, aq, include_usage),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _stream(s: Served, kind: str, rid: str, rsi: SafeInfer, job: Job, update, aq: asyncio.Queue,
                  include_usage: bool) -> AsyncIterator[str]:
    created, model_id = int(time.time()), s.model_id
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
            s.sched.cancel(job.id)


@v1.post("/chat/completions")
async def chat_completions(req: p.ChatRequest, request: Request):
    return await generate("chat", req, p.chat_messages(req), "template", request)


@v1.post("/completions")
async def completions(req: p.CompletionRequest, request: Request):
    return await generate("text", req, p.completion_prompt(req), "none", request)


@v1.post("/moderations")
async def moderations(req: p.ModerationRequest, request: Request):
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if not inputs or len(inputs) > p.MAX_MODERATION_INPUTS or not all(x.strip() for x in inputs):
        raise p.ApiError(400, f"input must be 1..{p.MAX_MODERATION_INPUTS} non-empty strings", "input",
                         "invalid_value")
    s = served(request)
    rsi, _, fr = p.settings_for(s.si, req.safeinfer)
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

    _submit_or_503(s.sched.call, verdicts, sink)
    value = await fut
    if isinstance(value, BaseException):
        raise _failed(value)
    return p.moderation_body(s.model_id, value, fg.threshold, frame, gate.block)
