"""Typed errors. The CLI maps every :class:`UsageError` to one line on stderr and exit code 2."""

from __future__ import annotations


class SafeInferError(Exception):
    """Base class for every error the library raises on purpose."""

    exit_code = 1


class UsageError(SafeInferError):
    """Unusable arguments or input files (CLI exit code 2)."""

    exit_code = 2


class SettingError(UsageError, ValueError):
    """A setting (variant, γ, λ, positions, a sampling value) is out of its range."""


class ModelError(UsageError):
    """A model file is missing, is not a GGUF, or llama.cpp refused to load it."""


class VectorError(UsageError):
    """A safety-vector file is unreadable, malformed, or does not fit the model."""


class DemosError(UsageError):
    """A demonstrations file is empty or malformed."""


class ContextOverflowError(UsageError):
    """The prompt (plus what must be generated after it) does not fit the context."""


class OutputError(SafeInferError):
    """An output file could not be written (disk full, quota, I/O error, read-only, permission); the message says
    what was kept and how to resume. Exit code 2, an unusable output file, like every other bad file; not a
    UsageError, so that code catching those (one bad prompt among many) never swallows it."""

    exit_code = 2


class EngineError(SafeInferError):
    """llama.cpp returned an error during decoding."""
