"""Chat formatting: the GGUF's own template (sandboxed Jinja, as llama-cpp-python renders it), or a named
fallback format for models that ship none (the embedded Gemma 3 270M is a base model without a template)."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from llama_cpp import llama_chat_format as _fmt

from ..errors import UsageError
from .engine import Model

Message = dict[str, str]


@dataclass(frozen=True)
class Rendered:
    text: str
    add_bos: bool  # False when the template already wrote BOS itself
    stop: tuple[str, ...]
    source: str  # "gguf" or the fallback format's name


def fallback_format(model: Model) -> str:
    """Gemma-family models get ``gemma``; anything else ``chatml``."""
    return "gemma" if model.arch.startswith("gemma") else "chatml"


def _merge_system(messages: list[Message]) -> list[Message]:
    """Gemma has no system role (``format_gemma`` drops it): prepend it to the first user turn, as Gemma's own
    template does."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    elif system:
        rest.insert(0, {"role": "user", "content": system})
    return rest


def _template_problem(model: Model, error: Exception | None) -> str:
    """One line naming the GGUF, what is wrong with its chat template, and the way around it."""
    msg = " ".join(str(error).split()) if error is not None else ""
    if error is None:
        what = "renders nothing for a user message"
    elif isinstance(error, jinja2.exceptions.SecurityError):
        what = f"was stopped by the Jinja sandbox (it reaches for something unsafe: {msg})"
    elif isinstance(error, jinja2.exceptions.TemplateSyntaxError):
        what = f"has a syntax error at line {error.lineno}: {msg}"
    elif isinstance(error, jinja2.exceptions.UndefinedError):
        what = f"uses an undefined name ({msg})"
    elif isinstance(error, ValueError):  # the template's own raise_exception(...), as Mistral-style ones do
        what = f"raised an error: {msg}"
    else:
        what = f"failed to render ({type(error).__name__}: {msg})"
    return (f"the chat template in {model.path.name} {what}; pass --chat-format NAME (chatml, llama-2, gemma, "
            "mistral-instruct, ...) to use a built-in format instead")


def render(model: Model, messages: list[Message], chat_format: str | None = None) -> Rendered:
    """Turn messages into prompt text ending with the assistant's generation prompt."""
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise UsageError(f"bad chat message {m!r}: needs role system|user|assistant and string content")
    template = model.chat_template() if chat_format in (None, "auto") else None
    if template:
        eos = model.piece(model.eos, special=True).decode("utf-8", "replace")
        bos = model.piece(model.bos, special=True).decode("utf-8", "replace")
        try:
            formatter = _fmt.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                                 add_generation_prompt=True)
            r = formatter(messages=messages)
        except Exception as e:  # the template is code from the GGUF: whatever it raises is its own problem
            raise UsageError(_template_problem(model, e)) from None
        if not r.prompt.replace(bos, "").replace(eos, "").strip():
            raise UsageError(_template_problem(model, None))
        stop = r.stop if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
        return Rendered(r.prompt, add_bos=not r.added_special, stop=tuple(stop), source="gguf")
    name = fallback_format(model) if chat_format in (None, "auto") else chat_format
    fn = getattr(_fmt, "format_" + name.replace("-", "_").replace(".", "_"), None)
    if fn is None:
        raise UsageError(f"unknown chat format {name!r} (try gemma, chatml, llama-2, mistral-instruct, ...)")
    msgs = _merge_system(messages) if name == "gemma" else messages
    r = fn(messages=msgs)
    stop = r.stop if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
    return Rendered(r.prompt, add_bos=True, stop=tuple(stop), source=name)


def render_stops(model: Model, chat_format: str | None = None) -> tuple[str, ...]:
    """The stop strings of the chat format in use (they do not depend on the messages)."""
    return render(model, [{"role": "user", "content": "x"}], chat_format).stop
