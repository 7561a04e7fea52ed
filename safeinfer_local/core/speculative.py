"""Speculative verification for guided decoding (pure math; issue 13's first part, not yet wired into the loop).

The target side drafts K tokens alone; the guidance side then scores the same K positions in one batch, and the
guided distribution decides which drafted tokens stand. Both functions take the rows the two sides produced at
the drafted positions: row i is the distribution *for* draft token i (after the prompt and draft[:i]). A row past
the last draft token (K + 1 rows) lets a fully accepted draft add one more token for free.

- Greedy (:func:`verify_greedy`): a drafted token stands while it is still the argmax of the guided scores
  z = ℓ_t − (λ/(1−λ))·max(0, ℓ_u − ℓ_t); at the first one that is not, the guided argmax is taken there. The
  tokens returned are exactly what one-token-at-a-time guided greedy decoding gives on the same rows.
- Sampling (:func:`verify_sampled`): speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Draft token a
  drawn from the target's distribution p stands with probability min(1, q(a)/p(a)), q the guided distribution;
  on rejection the token is drawn from norm(max(0, q − p)). The emitted tokens are distributed exactly as
  sampling from q one token at a time (a counting test checks it).
"""

from __future__ import annotations

import numpy as np

from .sampling import guided_logits


def _rows(a, name: str) -> np.ndarray:
    x = np.asarray(a, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (rows, vocab), got shape {x.shape}")
    return x


def _check(n_rows: int, draft) -> list[int]:
    d = [int(t) for t in draft]
    if not d:
        raise ValueError("the draft is empty")
    if n_rows not in (len(d), len(d) + 1):
        raise ValueError(f"{len(d)} draft tokens need {len(d)} or {len(d) + 1} rows, got {n_rows}")
    return d


def verify_greedy(target_logits, guide_logits, draft, lam: float) -> tuple[int, int | None]:
    """(n accepted, the next token): the first ``n`` draft tokens stand, then ``next`` (the guided argmax at the
    first rejected position, or at row K when every token stood and K + 1 rows were given; else None)."""
    t, u = _rows(target_logits, "target_logits"), _rows(guide_logits, "guide_logits")
    if t.shape != u.shape:
        raise ValueError(f"target and guidance rows differ in shape: {t.shape} vs {u.shape}")
    d = _check(len(t), draft)
    z = guided_logits(t, u, lam)
    best = np.argmax(z, axis=-1)
    for i, a in enumerate(d):
        if best[i] != a:
            return i, int(best[i])
    return len(d), (int(best[len(d)]) if len(t) > len(d) else None)


def _normalise(p: np.ndarray, name: str) -> np.ndarray:
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must hold finite, non-negative probabilities")
    s = p.sum(axis=-1, keepdims=True)
    if np.any(s <= 0):
        raise ValueError(f"{name} has a row with no mass")
    return p / s


def verify_sampled(draft_probs, guided_probs, draft, rng: np.random.Generator) -> tuple[int, int | None]:
    """(n accepted, the next token) by speculative sampling. ``draft_probs``: the distribution each draft token
    was drawn from (the target's, after its own temperature / top-k / top-p), ``guided_probs``: the distribution
    to sample from (softmax of the guided scores at the same settings), both (rows, vocab). ``next`` is drawn from
    the residual norm(max(0, q − p)) at the first rejection, or from q at row K when every token stood and K + 1
    rows were given (else None)."""
    p = _normalise(_rows(draft_probs, "draft_probs"), "draft_probs")
    q = _normalise(_rows(guided_probs, "guided_probs"), "guided_probs")
    if p.shape != q.shape:
        raise ValueError(f"draft and guided rows differ in shape: {p.shape} vs {q.shape}")
    d = _check(len(p), draft)
    for i, a in enumerate(d):
        if p[i, a] <= 0:
            raise ValueError(f"draft token {a} at position {i} has probability 0 under draft_probs")
        if rng.random() * p[i, a] < q[i, a]:  # accept with min(1, q/p)
            continue
        resid = np.maximum(q[i] - p[i], 0.0)
        m = resid.sum()
        # a rejection needs q(a) < p(a), so q > p somewhere and m > 0; only rounding can leave m at 0 (then q ≈ p)
        return i, int(rng.choice(len(resid), p=resid / m if m > 0 else q[i]))
    if len(p) > len(d):
        return len(d), int(rng.choice(q.shape[1], p=q[len(d)]))
    return len(d), None
