"""Speculative verification of guided decoding: the pure math, without a model."""

import numpy as np
import pytest

from safeinfer_local.core.sampling import guided_logits
from safeinfer_local.core.speculative import verify_greedy, verify_sampled


def _sequential_greedy(t, u, lam):
    return [int(np.argmax(guided_logits(t[i], u[i], lam))) for i in range(len(t))]


@pytest.mark.parametrize("seed", range(20))
def test_greedy_verification_equals_one_token_at_a_time(seed):
    rng = np.random.default_rng(seed)
    k, v = 6, 12
    t = rng.normal(size=(k + 1, v)) * 2
    u = t + rng.normal(size=(k + 1, v)) * 1.5  # a guidance that sometimes prefers the target's argmax
    draft = list(np.argmax(t[:k], axis=-1))  # the target's own greedy draft
    want = _sequential_greedy(t, u, 0.5)
    n, nxt = verify_greedy(t, u, draft, 0.5)
    assert draft[:n] == want[:n]
    assert nxt == want[n]  # the first rejected position, or the bonus row when all stood
    assert n == k or draft[n] != want[n]
    # without the bonus row a fully accepted draft adds nothing
    n2, nxt2 = verify_greedy(t[:k], u[:k], draft, 0.5)
    assert n2 == n and (nxt2 == nxt if n < k else nxt2 is None)


def test_greedy_verification_keeps_and_rejects_as_the_formula_says():
    t = np.log(np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]))
    same = verify_greedy(t, t, [0, 0], 0.9)
    assert same == (2, None)  # guidance equal to the target: no penalty, every draft token stands
    # guidance far keener on token 0 at position 1: z(0) drops below z(1) there
    u = np.log(np.array([[0.7, 0.2, 0.1], [0.999, 0.0005, 0.0005]]))
    assert verify_greedy(t, u, [0, 0], 0.8) == (1, 1)  # z(0) = ln .6 - 4 ln(.999/.6) < z(1) = ln .3
    assert verify_greedy(t, u, [0, 0], 0.5) == (2, None)  # at lambda 0.5 the penalty is too small to flip it
    assert verify_greedy(t, u, [0, 0], 0.0) == (2, None)  # lambda 0: the target alone


def test_sampled_verification_emits_the_guided_distribution():
    # position-independent rows: every emitted token at position j must be distributed as q[j], whatever p is
    rng = np.random.default_rng(0)
    p = np.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    q = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    n_trials, k = 40000, 2
    counts = np.zeros((k + 1, 4))
    seen = np.zeros(k + 1)
    accepted = 0
    for _ in range(n_trials):
        draft = [int(rng.choice(4, p=p[i])) for i in range(k)]
        n, nxt = verify_sampled(p, q, draft, rng)
        out = draft[:n] + [nxt]
        accepted += n
        for j, tok in enumerate(out):
            counts[j, tok] += 1
            seen[j] += 1
    for j in range(k + 1):
        freq = counts[j] / seen[j]
        se = np.sqrt(q[j] * (1 - q[j]) / seen[j])
        assert np.all(np.abs(freq - q[j]) < 5 * se + 1e-3), (j, freq, q[j])
    # the acceptance rate at position 0 is sum(min(p, q)) = 0.1 + 0.2 + 0.15 + 0.05 = 0.5
    assert 0.3 < accepted / n_trials < 1.0


def test_sampled_verification_accepts_everything_when_q_equals_p_and_checks_input():
    rng = np.random.default_rng(1)
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    for _ in range(200):
        assert verify_sampled(p, p, [1, 0], rng) == (2, None)
    with pytest.raises(ValueError, match="rows"):
        verify_sampled(p, p, [1, 0, 1], rng)
    with pytest.raises(ValueError, match="probability 0"):
        verify_sampled(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]), [1], rng)
    with pytest.raises(ValueError, match="empty"):
        verify_greedy(p, p, [], 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        verify_sampled(np.array([[np.nan, 1.0]]), p[:1], [1], rng)
