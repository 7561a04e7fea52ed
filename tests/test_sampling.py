import numpy as np
import pytest

from safeinfer_local.core.sampling import (
    StopMatcher,
    apply_top_k,
    apply_top_p,
    log_softmax,
    make_sampler,
    token_logprobs,
    validate_sampling,
)


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
def test_validate_sampling_rejects(t, k, p):
    with pytest.raises(ValueError):
        validate_sampling(t, k, p)


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
