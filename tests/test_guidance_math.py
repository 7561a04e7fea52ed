import numpy as np
import pytest

from safeinfer_local.core.sampling import guided_logits, log_softmax


def test_hand_computed_union():
    # target p = [0.5, 0.25, 0.25], guidance p = [0.25, 0.5, 0.25], λ = 0.99 -> k = 99
    t = np.log(np.array([0.5, 0.25, 0.25]))
    u = np.log(np.array([0.25, 0.5, 0.25]))
    z = guided_logits(t, u, 0.99)
    np.testing.assert_allclose(z[0], np.log(0.5))  # guidance prefers it less: unchanged
    np.testing.assert_allclose(z[1], np.log(0.25) - 99 * np.log(2.0))  # ℓ_u - ℓ_t = log 2
    np.testing.assert_allclose(z[2], np.log(0.25))  # tie: no penalty


def test_lambda_zero_is_target_log_softmax_and_shift_invariance():
    rng = np.random.default_rng(0)
    t = rng.normal(size=50)
    u = rng.normal(size=50)
    np.testing.assert_allclose(guided_logits(t, u, 0.0), log_softmax(t))
    # logits are only defined up to a constant per row
    np.testing.assert_allclose(guided_logits(t + 7, u - 3, 0.9), guided_logits(t, u, 0.9), atol=1e-9)


def test_matches_naive_formula_float32_rows():
    rng = np.random.default_rng(1)
    t = (rng.normal(size=(3, 1000)) * 3).astype(np.float32)
    u = (rng.normal(size=(3, 1000)) * 3).astype(np.float32)
    lt = log_softmax(t.astype(np.float64))
    lu = log_softmax(u.astype(np.float64))
    naive = lt - 99 * np.maximum(0, lu - lt)
    z = guided_logits(t, u, 0.99)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z, naive, rtol=1e-4, atol=1e-3)


def test_infinities():
    t = np.array([0.0, -np.inf, 0.0])
    u = np.array([-np.inf, 0.0, 0.0])
    z = guided_logits(t, u, 0.5)
    assert z[1] == -np.inf  # impossible under the target stays impossible
    np.testing.assert_allclose(z[0], np.log(0.5))  # -inf guidance: no penalty
    assert np.isfinite(z[2])


@pytest.mark.parametrize("lam", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_lambda(lam):
    with pytest.raises(ValueError):
        guided_logits(np.zeros(3), np.zeros(3), lam)


def test_shape_mismatch():
    with pytest.raises(ValueError):
        guided_logits(np.zeros(3), np.zeros(4), 0.5)


def test_precomputed_guide_logprobs_give_the_same_result():
    rng = np.random.default_rng(2)
    t = (rng.normal(size=500) * 3).astype(np.float32)
    u = (rng.normal(size=500) * 3).astype(np.float32)
    np.testing.assert_allclose(guided_logits(t, log_softmax(u), 0.7, guide_is_logprobs=True),
                               guided_logits(t, u, 0.7), atol=1e-4)
