"""Ctrl-C that is never lost around llama.cpp (no llama_cpp import here: the CLI installs this at start-up).

llama-cpp-python routes llama.cpp's log messages through a Python ctypes callback, ``llama_log_callback``. An
exception raised inside a ctypes callback is printed ("Exception ignored ...") and dropped, so a KeyboardInterrupt
that Python delivers while that callback runs would vanish and the job would carry on. The handler below defers
such an interrupt instead, and the engine raises it right after its next ``llama_decode``.
"""

from __future__ import annotations

import signal

_deferred = False


def _on_sigint(signum, frame) -> None:
    global _deferred
    f = frame
    while f is not None:
        if f.f_code.co_name == "llama_log_callback":
            _deferred = True
            return
        f = f.f_back
    raise KeyboardInterrupt


def install() -> None:
    """Use the deferring SIGINT handler (call from the main thread)."""
    signal.signal(signal.SIGINT, _on_sigint)


def raise_deferred_interrupt() -> None:
    global _deferred
    if _deferred:
        _deferred = False
        raise KeyboardInterrupt
