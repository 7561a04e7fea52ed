"""The method's settings, declared once: names, defaults, and the one check for each value.

Every check raises :class:`~safeinfer_local.errors.SettingError` (a ``UsageError``, so the CLI prints one line
and exits 2, and a ``ValueError`` for Python callers) and returns the value, normalised.
"""

from __future__ import annotations

import math

from ..errors import SettingError

VARIANTS = ("base", "sa", "sgds", "safeinfer")
"""``base`` plain decoding; ``sa`` safety amplification; ``sgds`` safety-guided decoding; ``safeinfer`` both."""
SA_VARIANTS = ("sa", "safeinfer")
GUIDED_VARIANTS = ("sgds", "safeinfer")

POSITIONS = ("generation", "last", "all")
"""Where safety amplification applies (see the decode layout in docs/ARCHITECTURE.md)."""

DEFAULT_N_CTX = 4096
DEFAULT_MAX_TOKENS = 128
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
"""Sampling defaults follow llama.cpp's own (``llama-cli``: temp 0.8, top-k 40, top-p 0.95)."""

DEFAULT_LAMBDA = 0.99
"""The paper's λ ("Union" from language-model arithmetic), chosen for 7B chat models; calibrate per model."""

DEFAULT_SPECULATE = 0
"""Tokens the target drafts ahead of the guidance side in guided decoding (``--speculate``; 0 = both sides step
one token at a time together)."""
MAX_SPECULATE = 32

MAX_ABS_GAMMA = 1e4
"""|γ| beyond this overflows float32 activations on any model; it is refused rather than run."""


def _number(name: str, x) -> float:
    if isinstance(x, bool):
        raise SettingError(f"{name} must be a number, not {x!r}")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a number, not {x!r}") from None
    if not math.isfinite(v):
        raise SettingError(f"{name} must be finite, not {x}")
    return v


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingError(f"unknown {name} {value!r} (choose from {', '.join(choices)})")
    return value


def check_variant(variant: str) -> str:
    return check_choice("variant", variant, VARIANTS)


def check_gamma(gamma) -> float:
    """γ must be a finite number with |γ| <= 1e4 (negative γ is allowed: it is the negative-vector guidance)."""
    g = _number("gamma", gamma)
    if abs(g) > MAX_ABS_GAMMA:
        raise SettingError(f"gamma must be within ±{MAX_ABS_GAMMA:g}, not {gamma}")
    return g


def check_lambda(lam) -> float:
    """λ in [0, 1): 0 is the target alone; the penalty weight λ/(1−λ) grows without bound towards 1."""
    v = _number("lambda", lam)
    if not 0.0 <= v < 1.0:
        raise SettingError(f"lambda must be in [0, 1), but is {lam}")
    return v


def check_positions(positions: str) -> str:
    return check_choice("positions", positions, POSITIONS)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Temperature >= 0 (0 = greedy), top-k >= 0 (0 disables), top-p in (0, 1] (1 disables)."""
    t = _number("temperature", temperature)
    if t < 0:
        raise SettingError(f"temperature must be >= 0, but is {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SettingError(f"top-k must be an integer >= 0 (0 disables it), but is {top_k}")
    p = _number("top-p", top_p)
    if not 0.0 < p <= 1.0:
        raise SettingError(f"top-p must be in (0, 1], but is {top_p}")


def check_max_tokens(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SettingError(f"max tokens must be >= 1, not {n}")
    return n


def check_seed(seed: int | None) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise SettingError(f"seed must be an integer in [0, 2^63), not {seed}")
    return seed


MAX_PARALLEL = 64


def check_speculate(k: int) -> int:
    """``--speculate K``: 0 (off) or the number of tokens the target drafts per round."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_SPECULATE:
        raise SettingError(f"--speculate must be in 0..{MAX_SPECULATE}, not {k}")
    return k


def check_parallel(n: int) -> int:
    """Requests decoded in the same batch (``--parallel``)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PARALLEL:
        raise SettingError(f"--parallel must be in 1..{MAX_PARALLEL}, not {n}")
    return n
