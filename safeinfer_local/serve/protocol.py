"""The OpenAI wire format, pure: request bodies (pydantic), the checks that turn them into a settings copy and a
:class:`GenConfig`, and the response, chunk and error bodies. Nothing here touches the model.

Safety per request rides in an extra body object, ``"safeinfer": {"variant", "gamma", "lam", "guidance", "gate",
"frame"}`` (the ``openai`` client sends it with ``extra_body``); every response says what was applied in a
``safeinfer`` field (in the last chunk when streaming).
"""

from __future__ import annotations

import json
import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, create_model

from .. import schema
from ..api import SafeInfer
from ..core.frames import check_frame
from ..core.settings import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    check_max_tokens,
    check_sampling,
    check_seed,
)
from ..decode.batch import GenConfig
from ..decode.guidance import SOURCES
from ..errors import SettingError, UsageError


def request_guidance() -> tuple[str, ...]:
    """Guidance a request may name (``GuidanceSource.per_request``); ``model:PATH`` and ``lora:PATH`` load files
    from the server's disk, so a request may only repeat the server's own."""
    return tuple(kind for kind, src in SOURCES.items() if src.per_request)

MAX_MODERATION_INPUTS = 64

FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length", "refused": "content_filter"}
"""Our finish reasons in OpenAI's words; a refusal by the gate (``--on-flag refuse``) is ``content_filter``."""


class ApiError(Exception):
    """An error answered with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# -- request bodies -----------------------------------------------------------------------------------------
SafetyOptions = create_model(
    "SafetyOptions", __config__=ConfigDict(extra="forbid"),
    __doc__="The ``safeinfer`` extra body object: the settings the schema lets a request set "
            "(``Setting.request``) and the frame; absent keys keep the server's settings.",
    **{s.name: (s.type | None, None) for s in schema.SETTINGS if s.request}, frame=(str | None, None))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Generation(BaseModel):
    """What chat and text completions share. Other OpenAI fields are accepted and ignored when they are at their
    defaults; those that would change the reply and are not implemented are refused (:func:`check_unsupported`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    """llama.cpp's extension (not OpenAI's); default 40, 0 disables."""
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    safeinfer: SafetyOptions | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | list[str]
    model: str | None = None
    safeinfer: SafetyOptions | None = None


# -- checks -------------------------------------------------------------------------------------------------
def _check(param: str, fn, *args):
    try:
        return fn(*args)
    except (SettingError, UsageError) as e:
        raise ApiError(400, str(e), param, "invalid_value") from None


_UNSUPPORTED = {  # field: the value that means "not asked for"
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}


def check_unsupported(req: BaseModel) -> None:
    extra = req.model_extra or {}
    for name, fine in _UNSUPPORTED.items():
        if name in extra and extra[name] not in fine:
            raise ApiError(400, f"{name} is not supported by this server", name, "unsupported_parameter")
    fmt = extra.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ApiError(400, "response_format is not supported by this server (plain text only)", "response_format",
                       "unsupported_parameter")


def gen_config(req: _Generation, default_max_tokens: int) -> GenConfig:
    """The request's sampling as a :class:`GenConfig` (the server's defaults where it gives none); each value
    checked by the settings' own check, named by its field."""
    check_unsupported(req)
    if req.n not in (None, 1):
        raise ApiError(400, "n must be 1 (one choice per request)", "n", "unsupported_parameter")
    n = getattr(req, "max_completion_tokens", None)
    n_param = "max_completion_tokens" if n is not None else "max_tokens"
    n = n if n is not None else req.max_tokens
    n = default_max_tokens if n is None else n
    _check(n_param, check_max_tokens, n)
    t = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    p = DEFAULT_TOP_P if req.top_p is None else req.top_p
    k = DEFAULT_TOP_K if req.top_k is None else req.top_k
    _check("temperature", check_sampling, t, DEFAULT_TOP_K, DEFAULT_TOP_P)
    _check("top_p", check_sampling, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, p)
    _check("top_k", check_sampling, DEFAULT_TEMPERATURE, k, DEFAULT_TOP_P)
    _check("seed", check_seed, req.seed)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if not all(stop):
        raise ApiError(400, "stop takes non-empty strings", "stop", "invalid_value")
    return GenConfig(max_tokens=n, temperature=t, top_k=k, top_p=p, seed=req.seed, stop=tuple(stop))


def settings_for(si: SafeInfer, opts: SafetyOptions | None) -> tuple[SafeInfer, str, str | None]:
    """The settings copy a request runs under (``si.with_(...)``: same model and decoder), its variant and its
    frame (``None``: the endpoint's default); each value checked by its setting's own check, named by its field."""
    if opts is None:
        return si, si.default_variant(), None
    given = {name: getattr(opts, name) for name in schema.REQUEST if getattr(opts, name) is not None}
    guidance = given.get("guidance")
    allowed = request_guidance()
    if guidance is not None and guidance not in allowed and guidance != str(si.guidance):
        raise ApiError(400, f"guidance {guidance!r} is not allowed per request (choose {', '.join(allowed)}, or the "
                       f"server's own, {si.guidance})", "safeinfer.guidance", "invalid_value")
    for name, value in given.items():
        _check(f"safeinfer.{name}", schema.BY_NAME[name].checked, value)
    if opts.frame is not None:
        _check("safeinfer.frame", check_frame, opts.frame)
    variant = given.get("variant") or si.default_variant()
    try:
        out = si.with_(**given)
        out.active_gate(variant)  # --gate on without a gate
    except (SettingError, UsageError) as e:
        raise ApiError(400, str(e), "safeinfer", "invalid_value") from None
    return out, variant, opts.frame


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages as the chat template takes them: text content only (parts of type ``text`` are joined)."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ApiError(400, "only text content is supported", f"messages[{i}].content", "unsupported_content")
            content = "".join(p.text or "" for p in content)
        out.append({"role": m.role, "content": content or ""})
    return out


def completion_prompt(req: CompletionRequest) -> str:
    p = req.prompt
    if isinstance(p, list):
        if len(p) != 1:
            raise ApiError(400, "prompt must be one string (one completion per request)", "prompt",
                           "unsupported_parameter")
        p = p[0]
    if not p.strip():
        raise ApiError(400, "empty prompt", "prompt", "invalid_value")
    return p


# -- responses ----------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def applied(si: SafeInfer, done) -> dict:
    """What a finished request was decoded with: the settings for its variant, the variant actually run, the
    gate's verdict and how many tokens guidance changed."""
    r = done.result
    return si.settings.describe(r.variant) | {
        "applied": done.applied, "gate_score": None if r.gate_score is None else round(r.gate_score, 4),
        "flagged": r.flagged, "refused": r.stop_reason == "refused", "guided_tokens": r.guided_tokens,
        "stop_reason": r.stop_reason}


def usage(done) -> dict:
    n = done.result.n_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": n, "total_tokens": done.prompt_tokens + n}


def completion_body(kind: str, rid: str, model: str, si: SafeInfer, done) -> dict:
    """The non-streaming response (``kind``: ``chat`` or ``text``)."""
    text, finish = done.result.response, FINISH.get(done.result.stop_reason, "stop")
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage(done),
            "safeinfer": applied(si, done)}


def chunk(kind: str, rid: str, model: str, created: int, text: str | None = None, finish: str | None = None,
          role: bool = False) -> dict:
    """One streaming chunk; ``role`` makes a chat stream's opening chunk."""
    if kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def sse(data: dict | str) -> str:
    """One server-sent event (``data: ...`` and a blank line), as OpenAI streams them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


DONE = sse("[DONE]")


def moderation_body(model: str, routes: list, threshold: float, frame: str, block: int) -> dict:
    """OpenAI's moderation shape with one category, ``harmful``: the harm gate's verdict on each input (its
    :class:`~safeinfer_local.api.Route`: score and ``flagged``)."""
    results = []
    for r in routes:
        s = round(float(r.gate_score), 4)
        results.append({"flagged": bool(r.flagged), "categories": {"harmful": bool(r.flagged)},
                        "category_scores": {"harmful": s},
                        "safeinfer": {"gate_score": s, "threshold": round(threshold, 4), "frame": frame,
                                      "block": block}})
    return {"id": new_id("modr"), "model": model, "results": results}
