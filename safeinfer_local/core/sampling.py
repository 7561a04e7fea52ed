"""Pure numpy sampling math: log-softmax, temperature / top-k / top-p sampling.

Nothing here touches a model, so every function is unit-tested on small arrays.
"""

from __future__ import annotations

import numpy as np

from .settings import DEFAULT_LAMBDA, check_lambda, check_sampling


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


_EPS = float(np.finfo(np.float64).eps)


def _rounding_band(x: np.ndarray, n: int) -> float:
    """Relative width of the band around each decision point (a cumulative mass against ``p`` or ``u * mass``)
    inside which the fast path's float64 figures might round differently from the reference's. Those differ only
    in the order the normaliser is summed in: at most a few ulps of ``log Z`` and of each ``x - lse`` (so
    ``~eps * |x|``), and ``~n * eps`` for a cumulative sum of ``n`` terms; the band is over 100 times that."""
    scale = float(np.max(np.abs(x))) if x.size else 0.0
    return 1e-9 + 64 * _EPS * (scale + n + 64)


def _lse(x: np.ndarray, m: float) -> float:
    return m + float(np.log(np.sum(np.exp(x - m))))


class make_sampler:  # noqa: N801 - used like mlx-lm's make_sampler(...) factory
    """A sampler: ``sampler(row)`` returns a token id. ``temperature == 0`` is greedy (argmax); otherwise
    softmax(row / T) after top-k / top-p, by inverse CDF from one uniform draw per step (seeded runs repeat).

    ``sampler.draw()`` then ``sampler(row, u)`` uses a given draw, so two distributions can be sampled with the
    same randomness (how the guided loop tells whether guidance changed the token the target alone would pick).

    Speed: with top-k and/or top-p on, a call never sorts the vocabulary. One pass finds the row's max, a second
    the tokens within ``delta`` of it (a window learnt from the previous rows); everything else (k-th value,
    nucleus, softmax, inverse CDF) runs in float64 on that small candidate set. The result is the token the
    full-vocabulary reference (:meth:`reference`: float64 softmax over the whole row, top-k by ``>= k-th``, the
    nucleus by a stable sort, inverse CDF over the kept tokens in token-id order) returns for the same draw:

    * the candidates are ``{row >= c}``: an upper set of the row, closed under ties, and ``x = float64(row) / T``
      is monotone, so the top-k / the nucleus prefix are the same tokens, in the same order, as the reference's
      whenever the candidates provably contain them (some candidate strictly below the k-th value; candidate mass
      reaching ``p``). The k-th value and the kept set come from the very same float64 values, so that is exact.
    * the normalisers are summed over fewer (zero-free) terms, in another order: a few ulps apart. Every
      comparison that picks the token (the nucleus cut against ``p``, the inverse-CDF cut against ``u * mass``) is
      therefore checked to lie outside a band 100+ times wider than that difference (:func:`_rounding_band`);
      inside it (odds ~1e-9 per call), and for any row the window cannot settle (too many ties, fewer than k
      finite entries, non-finite values), the call runs :meth:`reference` itself.

    With both filters off every token is in play: the call does the reference's own operations on the same
    float64 arrays (one full softmax pass, no sort), in reused buffers.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self._rng = np.random.default_rng(seed)
        self._delta_k = 8.0  # raw-score width of the top-k candidate window below the max (learnt; speed only)
        self._delta_p = 8.0  # the same for the nucleus alone (top_k off)
        self._buf: np.ndarray | None = None
        self.n_reference = 0  # calls that ran the full-vocabulary reference (a figure for tests and benches)

    @property
    def rng(self) -> np.random.Generator:
        """The seeded generator behind every draw (speculative verification draws from it too)."""
        return self._rng

    def draw(self) -> float:
        return 0.0 if self.greedy else float(self._rng.random())

    def __call__(self, row: np.ndarray, u: float | None = None) -> int:
        if self.greedy:
            return int(np.argmax(row))
        r = np.asarray(row)
        n = r.shape[-1] if r.ndim else 0
        k = self.top_k if 0 < self.top_k < n else 0
        if r.ndim != 1 or n == 0:
            return self.reference(row, u)
        mx = r.max()
        with np.errstate(over="ignore"):
            top = np.float64(mx) / self.temperature  # the max of float64(row) / T (division by T is monotone)
        if not np.isfinite(top):  # NaN, +inf, all -inf or overflow: whatever the reference does (it raises)
            return self.reference(row, u)
        u = self.draw() if u is None else u
        if k == 0 and self.top_p >= 1.0:
            return self._full(r, top, u)
        tok = self._fast(r, mx, float(top), k, u)
        return self.reference(row, u) if tok is None else tok

    def reference(self, row: np.ndarray, u: float | None = None) -> int:
        """The full-vocabulary sampler (float64 softmax of the whole row, a full sort for top-p): the definition
        the fast path reproduces token for token, and what it falls back to."""
        self.n_reference += 1
        x = np.asarray(row, dtype=np.float64) / self.temperature
        x = apply_top_k(x, self.top_k)
        x = apply_top_p(x, self.top_p)
        probs = np.exp(log_softmax(x))
        u = self.draw() if u is None else u
        idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
        return min(idx, len(probs) - 1)

    def _buffers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self._buf is None or self._buf.shape[1] != n:
            self._buf = np.empty((2, n), dtype=np.float64)
        return self._buf[0], self._buf[1]

    def _full(self, r: np.ndarray, top: np.float64, u: float) -> int:
        """Both filters off: the reference's very operations on the very same float64 arrays (so the very same
        sums), in two reused buffers instead of six fresh full-vocabulary arrays."""
        x, tmp = self._buffers(r.shape[0])
        np.divide(r, self.temperature, out=x, dtype=np.float64)
        np.subtract(x, top, out=tmp)
        np.exp(tmp, out=tmp)
        lse = top + np.log(tmp.sum())
        x -= lse
        probs = np.exp(x, out=x)
        np.cumsum(probs, out=tmp)
        idx = int(np.searchsorted(tmp, u * probs.sum(), side="right"))
        return min(idx, len(probs) - 1)

    # -- fast path: everything on a candidate set; None means "ask the reference" ----------------------------
    def kept(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution ``self(row)`` samples from, on its support: (token ids in id order, probabilities
        summing to 1). The same kept set as :meth:`reference` (top-k by ``>= k-th``, the nucleus by a stable sort),
        from the fast path's candidate window when it settles, else from the full row. Greedy has none."""
        if self.greedy:
            raise ValueError("a greedy sampler has no distribution (temperature 0)")
        r = np.asarray(row)
        n = r.shape[-1] if r.ndim else 0
        k = self.top_k if 0 < self.top_k < n else 0
        got = None
        if r.ndim == 1 and n and (k or self.top_p < 1.0):  # a filter on: the candidate window
            mx = r.max()
            with np.errstate(over="ignore"):
                top = np.float64(mx) / self.temperature
            if np.isfinite(top):
                got = self._kept_fast(r, mx, float(top), k)
        if got is None:
            x = np.asarray(row, dtype=np.float64) / self.temperature
            x = apply_top_p(apply_top_k(x, self.top_k), self.top_p)
            ids = np.flatnonzero(np.isfinite(x))
            if not len(ids):
                raise ValueError("no token has a finite score")
            got = ids, x[ids]
        ids, x = got
        probs = np.exp(x - _lse(x, float(x.max())))
        return ids, probs / probs.sum()

    def _kept_fast(self, r: np.ndarray, mx, top: float, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The kept tokens and their x = score / T (token-id order), or None for "ask the reference"."""
        if k:
            got = self._top_k(r, mx, k)
            if got is None:
                return None
            ids, x = got
            if self.top_p < 1.0:
                # the reference's nucleus normaliser: the kept top-k (every other token is -inf after top-k)
                got = self._nucleus(ids, x, _lse(x, top), len(ids))
                if got is None:
                    return None
                if got is not False:  # False: the mass never reaches p, and the reference then keeps all of them
                    ids, x = got
        else:
            ids_x = self._nucleus_only(r, mx, top)
            if ids_x is None:
                return None
            ids, x = ids_x
        return ids, x

    def _fast(self, r: np.ndarray, mx, top: float, k: int, u: float) -> int | None:
        got = self._kept_fast(r, mx, top, k)
        return None if got is None else self._inverse_cdf(got[0], got[1], u, r.shape[0])

    def _window(self, r: np.ndarray, c) -> tuple[np.ndarray, np.ndarray]:
        ids = np.flatnonzero(r >= c)
        return ids, r[ids].astype(np.float64) / self.temperature

    def _top_k(self, r: np.ndarray, mx, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The reference's top-k set {x >= k-th largest x} (token-id order) and its x, or None."""
        n = r.shape[0]
        delta = self._delta_k
        for attempt in range(4):
            if attempt < 3:  # a window just wider than the last row's top-k (widened 1.5x when too narrow)
                ids, x = self._window(r, mx - delta)
            else:  # the window never settled: the (k+1)-th largest raw score, by a full partition (~0.2 ms)
                c = np.partition(r, n - k - 1)[n - k - 1]
                if not np.isfinite(c):  # fewer than k + 1 finite scores
                    return None
                ids, x = self._window(r, c)
            if len(ids) > k:
                kth = np.partition(x, len(x) - k)[len(x) - k]
                # a candidate strictly below the k-th value: every token outside the window is at most that
                # candidate's x (monotone), so below the k-th, so not kept by the reference either
                if np.all(np.isfinite(x)) and x.min() < kth:
                    keep = x >= kth
                    ids, x = ids[keep], x[keep]
                    # next row's window: this row's top-k span plus a margin (Gemma 3's rows: 6 median, 13 p90;
                    # the candidate count grows ~10x per 4 units of width, so a tight window pays)
                    self._delta_k = float(mx - r[ids].min()) + 0.5
                    return ids, x
            delta *= 1.5
        return None

    def _nucleus(self, ids: np.ndarray, x: np.ndarray, lse: float, n_terms: int):
        """The reference's nucleus among candidates ``ids`` (an upper set of the row, token-id order) given the
        full normaliser ``lse``: (kept ids, their x) in token-id order; False when the candidates' mass does not
        reach ``p``; None when the cut lies in the rounding band."""
        p = self.top_p
        order = np.argsort(-x, kind="stable")  # the reference's order: by x descending, ties by token id
        cum = np.cumsum(np.exp(x[order] - lse))
        j = int(np.searchsorted(cum, p, side="left"))
        tol = _rounding_band(x, n_terms)
        if j >= len(cum):
            return False if cum[-1] < p * (1 - tol) else None
        if not cum[j] >= p * (1 + tol) or (j > 0 and not cum[j - 1] < p * (1 - tol)):
            return None
        sel = np.sort(order[: j + 1])
        return ids[sel], x[sel]

    def _nucleus_only(self, r: np.ndarray, mx, top: float):
        """top_k off, top_p < 1: the normaliser needs one float64 pass over the whole row (no sort), the nucleus
        only a window of candidates whose mass provably reaches p."""
        n = r.shape[0]
        buf = self._buffers(n)[0]
        np.divide(r, self.temperature, out=buf, dtype=np.float64)
        buf -= top
        np.exp(buf, out=buf)
        lse = top + float(np.log(buf.sum()))
        delta = self._delta_p
        for _ in range(6):
            ids, x = self._window(r, mx - delta)
            if not np.all(np.isfinite(x)):
                return None
            got = self._nucleus(ids, x, lse, n)
            if got is None:
                return None
            if got is not False:
                ids, x = got
                self._delta_p = max(1.5 * float(mx - r[ids].min()) + 1.0, 1.0)
                return ids, x
            if len(ids) == n:
                return None
            delta *= 2.0
        return None

    def _inverse_cdf(self, ids: np.ndarray, x: np.ndarray, u: float, n: int) -> int | None:
        """The reference's last step, on the kept tokens only (in token-id order; the others have probability 0
        and add exact zeros to the reference's cumulative sum)."""
        probs = np.exp(x - _lse(x, float(x.max())))
        cum = np.cumsum(probs)
        t = u * probs.sum()
        i = int(np.searchsorted(cum, t, side="right"))
        tol = _rounding_band(x, len(x))
        if i >= len(cum) or not cum[i] > t * (1 + tol) or (i > 0 and not cum[i - 1] < t * (1 - tol)):
            return None  # past the end (the reference then returns the last token id) or in the rounding band
        return int(ids[i])


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


def guided_logits(target_logits: np.ndarray, guide_logits: np.ndarray, lam: float = DEFAULT_LAMBDA,
                  guide_is_logprobs: bool = False) -> np.ndarray:
    """Safety-guided scores z = ℓ_t − (λ / (1 − λ)) · max(0, ℓ_u − ℓ_t), with ℓ = log-softmax (the paper's sGDS).

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
