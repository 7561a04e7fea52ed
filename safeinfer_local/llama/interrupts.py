"""Ctrl-C that is never lost around llama.cpp (no llama_cpp import here: the CLI installs this at start-up).

llama.cpp calls back into Python through ctypes: llama-cpp-python's log callback (``llama_log_callback``) and the
engine's own ``cb_eval`` hook (:class:`~safeinfer_local.llama.engine.ActivationHook`). An exception raised inside
a ctypes callback is printed ("Exception ignored on calling ctypes callback ...") and dropped, and since Python
3.11 a pending signal is handled at a function's first instruction, before any ``try:`` in its body could catch
it. So a KeyboardInterrupt delivered while such a callback (or anything it calls) runs would vanish and the job
would carry on. The handler below defers it instead: it walks the interrupted frame's stack, and when a frame
belongs to a function registered with :func:`defer_in` (or is the log callback) it only records the interrupt.
The engine raises it right after the ``llama_decode`` that ran the callback (:func:`raise_deferred_interrupt`),
and a callback that runs for every graph node may cut that decode short once :func:`pending` is true.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import CodeType

_deferred = False
_codes: set[CodeType] = set()
_LOG_CALLBACK = "llama_log_callback"  # llama-cpp-python's (matched by name: this module imports no llama_cpp)


def defer_in(func: Callable) -> Callable:
    """Mark ``func`` (a function or method that llama.cpp calls through ctypes) as a place where Ctrl-C is
    deferred, and return it (usable as a decorator). Everything ``func`` calls is covered too."""
    code = getattr(getattr(func, "__func__", func), "__code__", None)
    if code is None:
        raise TypeError(f"defer_in needs a Python function, not {func!r}")
    _codes.add(code)
    return func


def _in_callback(frame) -> bool:
    f = frame
    while f is not None:
        code = f.f_code
        if code in _codes or code.co_name == _LOG_CALLBACK:
            return True
        f = f.f_back
    return False


def _on_sigint(signum, frame) -> None:
    global _deferred
    if _in_callback(frame):
        _deferred = True
        return
    raise KeyboardInterrupt


def install() -> None:
    """Use the deferring SIGINT handler (call from the main thread)."""
    signal.signal(signal.SIGINT, _on_sigint)


def pending() -> bool:
    """Whether a deferred Ctrl-C waits to be raised."""
    return _deferred


def raise_deferred_interrupt() -> None:
    """Raise the deferred Ctrl-C as a KeyboardInterrupt (once), if there is one."""
    global _deferred
    if _deferred:
        _deferred = False
        raise KeyboardInterrupt
