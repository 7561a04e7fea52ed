import numpy as np
import pytest

from safeinfer_local.core.sampling import (
    StopMatcher,
    apply_top_k,
    apply_top_p,
    log_softmax,
    make_sampler,
    token_logprobs,
)
from safeinfer_local.core.settings import check_sampling


def test_log_softmax_hand_values():
    x = np.array([0.0, np.log(3.0)])
    np.testing.assert_allclose(np.exp(log_softmax(x)), [0.25, 0.75])
    # -inf entries stay -inf, the rest still normalise
    y = log_softmax(np.array([1.0, -np.inf, 1.0]))
    assert y[1] == -np.inf
    np.testing.assert_allclose(y[[0, 2]], np.log([0.5, 0.5]))


def test_log_softmax_all_inf_row_raises():
    with pytest.raises(ValueError):
        log_softmax(np.array([-np.inf, -np.inf]))


def test_token_logprobs_matches_full_log_softmax_float64():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(5, 1000)) * 4).astype(np.float32)
    toks = rng.integers(0, 1000, size=5)
    ref = log_softmax(x.astype(np.float64))[np.arange(5), toks]
    np.testing.assert_allclose(token_logprobs(x, toks), ref, atol=1e-5)
    with pytest.raises(ValueError):
        token_logprobs(x, toks[:3])


def test_top_k_and_top_p():
    x = np.array([3.0, 1.0, 2.0, 0.0])
    assert np.isfinite(apply_top_k(x, 2)).tolist() == [True, False, True, False]
    assert np.array_equal(apply_top_k(x, 0), x)
    p = np.exp(log_softmax(x))  # ~[0.64, 0.087, 0.24, 0.032]
    kept = np.isfinite(apply_top_p(x, 0.7))
    assert kept.tolist() == [True, False, True, False]
    assert np.isfinite(apply_top_p(x, float(p.max()) - 1e-6)).sum() == 1


def test_greedy_and_seeded_sampling():
    x = np.array([0.1, 5.0, 0.2])
    assert make_sampler(0.0)(x) == 1
    flat = np.zeros(50)
    a = [make_sampler(1.0, seed=7)(flat) for _ in range(1)]
    s1, s2 = make_sampler(1.0, seed=7), make_sampler(1.0, seed=7)
    seq1 = [s1(flat) for _ in range(20)]
    seq2 = [s2(flat) for _ in range(20)]
    assert seq1 == seq2 and len(set(seq1)) > 1 and a[0] == seq1[0]
    # top_k=1 is greedy whatever the temperature
    assert all(make_sampler(2.0, top_k=1, seed=s)(x) == 1 for s in range(10))


def test_sampling_frequencies_follow_softmax():
    x = np.log(np.array([0.2, 0.8]))
    s = make_sampler(1.0, seed=0)
    share = np.mean([s(x) for _ in range(4000)])
    assert 0.77 < share < 0.83


@pytest.mark.parametrize("t,k,p", [(-1, 0, 1.0), (float("nan"), 0, 1.0), (1.0, -1, 1.0), (1.0, 0, 0.0),
                                    (1.0, 0, 1.5)])
def test_check_sampling_rejects(t, k, p):
    with pytest.raises(ValueError):
        check_sampling(t, k, p)


def test_stop_matcher_holds_partial_and_cuts():
    m = StopMatcher(["<end>"])
    assert m.feed("hello <e") == ("hello ", False)
    assert m.feed("n") == ("", False)
    assert m.feed("d> more") == ("", True)
    m2 = StopMatcher(["<end>"])
    assert m2.feed("a <e") == ("a ", False)
    assert m2.feed("x") == ("<ex", False)
    assert m2.flush() == ""
    m3 = StopMatcher([])
    assert m3.feed("abc") == ("abc", False)


# --- the fast sampler against a verbatim copy of the full-vocabulary sampler it replaced ----------------------
# (safeinfer_local/core/sampling.py before "sampling at greedy speed": it argsorted the whole vocabulary)


def old_logsumexp(x: np.ndarray) -> np.ndarray:
    """Stable log(sum(exp(x))) over the last axis (keeps dims). float32 input stays float32 for speed (a 262k
    vocabulary row costs ~1 ms instead of ~4 ms in float64); the sum itself accumulates pairwise."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    if not np.all(np.isfinite(m)):
        raise ValueError("log_softmax: a row has no finite entry")
    return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def old_log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis."""
    x = np.asarray(logits)
    return x - old_logsumexp(x)


def old_apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries, set the rest to -inf (k <= 0 or k >= vocab: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def old_apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(old_log_softmax(logits[order]))
    cum = np.cumsum(probs)
    keep_n = int(np.searchsorted(cum, p, side="left")) + 1
    out = np.full_like(logits, -np.inf)
    kept = order[:keep_n]
    out[kept] = logits[kept]
    return out


class old_make_sampler:  # noqa: N801 - used like mlx-lm's make_sampler(...) factory
    """A sampler: ``sampler(row)`` returns a token id. ``temperature == 0`` is greedy (argmax); otherwise
    softmax(row / T) after top-k / top-p, by inverse CDF from one uniform draw per step (seeded runs repeat).

    ``sampler.draw()`` then ``sampler(row, u)`` uses a given draw, so two distributions can be sampled with the
    same randomness (how the guided loop tells whether guidance changed the token the target alone would pick).
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self._rng = np.random.default_rng(seed)

    def draw(self) -> float:
        return 0.0 if self.greedy else float(self._rng.random())

    def __call__(self, row: np.ndarray, u: float | None = None) -> int:
        if self.greedy:
            return int(np.argmax(row))
        x = np.asarray(row, dtype=np.float64) / self.temperature
        x = old_apply_top_k(x, self.top_k)
        x = old_apply_top_p(x, self.top_p)
        probs = np.exp(old_log_softmax(x))
        u = self.draw() if u is None else u
        idx = int(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"))
        return min(idx, len(probs) - 1)


def old_probs(row, t, k, p) -> np.ndarray:
    """old_make_sampler.__call__'s ``probs``, computed once for many draws."""
    x = np.asarray(row, dtype=np.float64) / t
    return np.exp(old_log_softmax(old_apply_top_p(old_apply_top_k(x, k), p)))


def old_tokens(probs: np.ndarray, us: np.ndarray) -> np.ndarray:
    """old_make_sampler.__call__'s last two lines for a vector of draws (elementwise the same float64 ops)."""
    idx = np.searchsorted(np.cumsum(probs), us * probs.sum(), side="right")
    return np.minimum(idx, len(probs) - 1)


def _rows(n: int, kinds: tuple[str, ...], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed + n)
    out = []
    for kind in kinds:
        r = (rng.normal(size=n) * 3).astype(np.float32)
        if kind == "peaked":
            r[rng.integers(n)] += 30
        elif kind == "flat":
            r *= np.float32(0.003)
        elif kind == "ties":
            r = np.round(r * 2) / np.float32(2)  # few distinct values: ties at the k-th value and in the nucleus
        elif kind == "neg_inf":
            r[rng.random(n) < 0.3] = -np.inf
        elif kind == "few_finite":
            r[:] = -np.inf
            r[rng.choice(n, size=min(n, 3), replace=False)] = rng.normal(size=min(n, 3))
        elif kind == "all_equal":
            r[:] = 1.5
        elif kind == "float64":
            r = rng.normal(size=n) * 4
        elif kind == "guided":  # the guided loop's scores: log-probs minus penalties, -inf where the target is
            from safeinfer_local.core.sampling import guided_logits

            t = (rng.normal(size=n) * 3).astype(np.float32)
            t[rng.random(n) < 0.05] = -np.inf
            r = guided_logits(t, log_softmax((rng.normal(size=n) * 3).astype(np.float32)), 0.9,
                              guide_is_logprobs=True)
        out.append((kind, r))
    return out


_SMALL_KINDS = ("normal", "peaked", "flat", "ties", "neg_inf", "few_finite", "all_equal", "float64", "guided")


def _draws(probs: np.ndarray, n: int, seed: int, n_steps: int = 8) -> np.ndarray:
    """Seeded uniform draws, the edges, and draws right at (and one ulp around) the old CDF's steps."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(probs) / probs.sum()
    steps = cdf[np.flatnonzero(probs)][:n_steps]
    edges = np.concatenate([steps, np.nextafter(steps, 0), np.nextafter(steps, 1)])
    us = np.concatenate([rng.random(n), [0.0, 1e-300, 0.5, 1 - 2.0**-53], edges])
    return us[(us >= 0) & (us < 1)]


def _check_same(row, t, k, p, us, kind: str = "") -> make_sampler:
    s = make_sampler(t, k, p)
    try:
        probs = old_probs(row, t, k, p)
    except ValueError:
        with pytest.raises(ValueError):
            s(row, 0.5)
        return s
    want = old_tokens(probs, us)
    got = np.array([s(row, float(u)) for u in us])
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (kind, t, k, p, us[bad[:5]], got[bad[:5]], want[bad[:5]])
    return s


@pytest.mark.parametrize("n", [2, 7, 50, 1000])
def test_fast_sampler_is_the_old_sampler_small_vocab(n):
    for kind, row in _rows(n, _SMALL_KINDS):
        for t in (0.3, 0.8, 1.7):
            for k in sorted({0, 1, 3, 40, n - 1, n, n + 3}):
                for p in (1.0, 0.95, 0.5, 0.05):
                    try:
                        us = _draws(old_probs(row, t, k, p), 60, n + k)
                    except ValueError:  # no finite entry: _check_same checks it still raises
                        us = np.array([0.5])
                    _check_same(row, t, k, p, us, kind)


def test_fast_sampler_is_the_old_sampler_gemma_vocab():
    """262144-wide float32 rows (Gemma 3's vocabulary), where the fast path matters; and it is the path taken."""
    n = 262144
    for kind, row in _rows(n, ("normal", "peaked", "flat", "ties", "neg_inf", "guided")):
        for t in (0.8, 1.7):
            for k, p in ((40, 0.95), (40, 1.0), (1, 1.0), (0, 0.95), (0, 0.5), (0, 1.0), (3, 0.05)):
                if k == 0 and p < 1 and (t > 1 or kind in ("flat", "normal")):
                    continue  # a nucleus of ~10^5 tokens: exact too, but as slow as the old full sort (~30 ms)
                probs = old_probs(row, t, k, p)
                us = _draws(probs, 40, k, n_steps=3)
                _check_same(row, t, k, p, us, kind)
                if kind not in ("flat", "ties"):  # (flat rows widen the window; ties can hit the k-th value)
                    s = make_sampler(t, k, p, seed=1)
                    for _ in range(20):  # ordinary draws (not the CDF-step ones above) never need the reference
                        s(row)
                    assert s.n_reference == 0, (kind, t, k, p, s.n_reference)


def test_fast_sampler_seeded_runs_equal_the_old_sampler():
    """The whole call (the draw included), step after step, on rows that change every step."""
    rows = [r for _, r in _rows(5000, ("normal", "peaked", "neg_inf", "guided", "ties"), seed=3)] * 8
    for t, k, p in ((0.8, 40, 0.95), (1.0, 0, 0.9), (0.7, 5, 1.0), (1.2, 0, 1.0)):
        new, old = make_sampler(t, k, p, seed=11), old_make_sampler(t, k, p, seed=11)
        assert [new(r) for r in rows] == [old(r) for r in rows]


def test_fast_sampler_frequencies():
    """Counting seeded draws: frequencies follow the old sampler's filtered softmax (within 4 sigma)."""
    row = np.array([2.0, 1.5, 1.4, 0.2, -1.0, 3.0, -np.inf, 1.5], dtype=np.float32)
    for t, k, p in ((0.7, 4, 0.9), (1.0, 0, 0.8), (1.5, 6, 1.0), (1.0, 0, 1.0)):
        probs = old_probs(row, t, k, p)
        probs = probs / probs.sum()
        s = make_sampler(t, k, p, seed=5)
        n = 20000
        counts = np.bincount([s(row) for _ in range(n)], minlength=len(row))
        sigma = np.sqrt(n * probs * (1 - probs))
        assert np.all(np.abs(counts - n * probs) <= 4 * sigma + 1e-9), (t, k, p, counts, n * probs)
        assert np.all(counts[probs == 0] == 0)


def test_fast_sampler_all_inf_row_raises_like_before():
    row = np.full(100, -np.inf, dtype=np.float32)
    for k, p in ((40, 0.95), (0, 0.9), (0, 1.0)):
        with pytest.raises(ValueError):
            old_make_sampler(0.8, k, p)(row, 0.5)
        with pytest.raises(ValueError):
            make_sampler(0.8, k, p)(row, 0.5)
