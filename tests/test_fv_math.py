"""The fv head budget's math (safeinfer_local.core.fv), without a model: which heads a budget measures, what the
scan costs, the top heads among those measured, and the projection through W_O."""

import numpy as np
import pytest

from safeinfer_local.core.fv import heads_to_scan, project_heads, scan_passes, top_heads


def test_scan_passes_count_baselines_and_shrink_with_the_budget():
    assert scan_passes(18, 4, 72, 16) == (0, 16 * 73)  # the budget covers every head: the full scan
    assert scan_passes(18, 4, 64, 16) == (73, 15 * 65)  # screen 72 heads on 1 prompt, 64 on the other 15
    assert scan_passes(32, 32, 64, 16) == (1025, 15 * 65)  # 8B: 2,000 passes instead of 16,400
    assert scan_passes(32, 32, 64, 16, screen=2) == (2 * 1025, 14 * 65)
    assert scan_passes(4, 4, 5, 1) == (17, 0)  # one prompt: the screen is the whole scan


def test_budget_scans_the_largest_effects_in_block_order():
    effect = np.array([[0.1, 5.0, 0.2], [3.0, 0.0, 4.0]])
    assert heads_to_scan(effect, 2, 3, 3) == [(0, 1), (1, 0), (1, 2)]
    assert heads_to_scan(None, 2, 3, 6) == [(i, h) for i in range(2) for h in range(3)]  # covers every head
    assert heads_to_scan(None, 2, 3, 100) == heads_to_scan(None, 2, 3, 6)
    assert len(heads_to_scan(np.ones((2, 3)), 2, 3, 4)) == 4  # ties still give exactly the budget
    with pytest.raises(ValueError):
        heads_to_scan(None, 2, 3, 2)  # a budget below all heads needs screened effects
    with pytest.raises(ValueError):
        heads_to_scan(effect, 2, 3, 0)


def test_top_heads_ignore_unscanned():
    aie = np.array([[np.nan, 0.5], [-1.0, np.nan]])
    assert top_heads(aie, 2) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="scanned"):
        top_heads(aie, 3)


def test_projection_sums_each_heads_slice_through_w_o():
    rng = np.random.default_rng(1)
    n_embd, H, hd = 6, 2, 3
    w_o = {0: rng.normal(size=(n_embd, H * hd)), 2: rng.normal(size=(n_embd, H * hd))}
    kqv = rng.normal(size=(3, H * hd))
    got = project_heads(w_o, kqv, [(0, 1), (2, 0)], hd)
    want = w_o[0][:, 3:6] @ kqv[0, 3:6] + w_o[2][:, 0:3] @ kqv[2, 0:3]
    np.testing.assert_allclose(got, want)
