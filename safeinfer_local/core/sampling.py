"""Pure numpy sampling math: log-softmax, temperature / top-k / top-p sampling.

Nothing here touches a model, so every function is unit-tested on small arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Sampler = Callable[[np.ndarray], int]
"""Takes one row of logits (or log-probabilities) and returns a token id."""


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Stable log(sum(exp(x))) over the last axis (keeps dims). float32 input stays float32 for speed (a 262k
    vocabulary row costs ~1 ms instead of ~4 ms in float64); the sum itself accumulates pairwise."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    if not np.all(np.isfinite(m)):
        raise ValueError("log_softmax: a row has no finite entry")
    return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    x = np.asarray(logits)
    return x - logsumexp(x)


def token_logprobs(logits: np.ndarray, tokens: np.ndarray | list[int]) -> np.ndarray:
    """log-softmax(logits[i])[tokens[i]] for each row i, without materialising the full log-softmax."""
    x = np.asarray(logits)
    idx = np.asarray(tokens, dtype=np.int64)
    if x.ndim != 2 or idx.shape != (x.shape[0],):
        raise ValueError(f"token_logprobs: need (n, vocab) logits and n tokens, got {x.shape} and {idx.shape}")
    return (x[np.arange(len(idx)), idx] - logsumexp(x)[:, 0]).astype(np.float64)


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Check sampling options at the edge, with a precise message."""
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"`temperature` must be a finite number >= 0, but is {temperature}")
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 disables it), but is {top_k}")
    if not (0.0 < top_p <= 1.0) or not math.isfinite(top_p):
        raise ValueError(f"`top_p` must be in (0, 1], but is {top_p}")


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries, set the rest to -inf (k <= 0 or k >= vocab: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(log_softmax(logits[order]))
    cum = np.cumsum(probs)
    keep_n = int(np.searchsorted(cum, p, side="left")) + 1
    out = np.full_like(logits, -np.inf)
    kept = order[:keep_n]
    out[kept] = logits[kept]
    return out


class make_sampler:  # noqa: N801 - used like mlx-lm's make_sampler(...) factory
    """A sampler: ``sampler(row)`` returns a token id. ``temperature == 0`` is greedy (argmax); otherwise
    softmax(row / T) after top-k / top-p, by inverse CDF from one uniform draw per step (seeded runs repeat).

    ``sampler.draw()`` then ``sampler(row, u)`` uses a given draw, so two distributions can be sampled with the
    same randomness (how the guided loop tells whether guidance changed the token the target alone would pick).
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        validate_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self._rng = np.random.default_rng(seed)

    def draw(self) -> float:
        return 0.0 if self.greedy else float(self._rng.random())

    def __call__(self, row: np.ndarray, u: float | None = None) -> int:
        if self.greedy:
            return int(np.argmax(row))
        x = np.asarray(row, dtype=np.float64) / self.temperature
        x = apply_top_k(x, self.top_k)
        x = apply_top_p(x, self.top_p)
        probs = np.exp(log_softmax(x))
        u = self.draw() if u is None else u
        idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
        return min(idx, len(probs) - 1)


class StopMatcher:
    """Streams text through, holding back only what could still become a stop string.

    ``feed(text)`` returns ``(text_safe_to_emit, stopped)``; once stopped, the stop string and anything after it
    are dropped. ``flush()`` returns what was held back at the end.
    """

    def __init__(self, stops: tuple[str, ...] | list[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self._pending + text
        if not self.stops:
            self._pending = ""
            return buf, False
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


DEFAULT_LAMBDA = 0.99
"""The paper's λ ("Union" from language-model arithmetic), chosen for 7B chat models; calibrate per model."""


def check_lambda(lam: float) -> float:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and 0.0 <= lam < 1.0):
        raise ValueError(f"`lambda` must be in [0, 1), but is {lam}")
    return float(lam)


def guided_logits(target_logits: np.ndarray, guide_logits: np.ndarray, lam: float = DEFAULT_LAMBDA,
                  guide_is_logprobs: bool = False) -> np.ndarray:
    """Safety-guided scores z = ℓ_t − (λ / (1 − λ)) · max(0, ℓ_u − ℓ_t), with ℓ = log-softmax (DESIGN §1.2).

    ``target_logits`` and ``guide_logits`` are raw logits over the same vocabulary (1-D or 2-D rows). The result
    is unnormalised: softmax(z / T) is the guided distribution. Tokens the guidance prefers more than the target
    are penalised; every other token keeps the target's log-probability. λ = 0 returns ℓ_t exactly. −inf in the
    target stays −inf; −inf in the guidance adds no penalty.

    Cost: two log-sum-exp passes and a few in-place element-wise passes, in float32 for float32 input.
    ``guide_is_logprobs`` says ``guide_logits`` is already a log-softmax (computed elsewhere, e.g. on the
    guidance side's thread while the target still decodes) and skips its pass.
    """
    lam = check_lambda(lam)
    t = np.asarray(target_logits)
    u = np.asarray(guide_logits)
    if t.shape != u.shape:
        raise ValueError(f"target and guidance logits differ in shape: {t.shape} vs {u.shape}")
    if t.dtype != u.dtype:
        u = u.astype(t.dtype)
    lt = t - logsumexp(t)
    if lam == 0.0:
        return lt
    k = lam / (1.0 - lam)
    pen = u.copy() if guide_is_logprobs else u - logsumexp(u)  # ℓ_u
    with np.errstate(invalid="ignore"):  # (-inf) - (-inf) where both are -inf: NaN, which fmax turns into 0
        np.subtract(pen, lt, out=pen)
    np.fmax(pen, 0.0, out=pen)  # max(0, ℓ_u − ℓ_t) in one pass; fmax ignores NaN
    pen *= pen.dtype.type(k)
    np.subtract(lt, pen, out=pen)
    return pen
