"""Function-vector math, pure numpy: which heads the AIE scan measures under a budget, the top heads among them, and
the projection of their mean outputs through W_O.

The AIE scan (``workflows/build.py``) patches one head at a time into each corrupted prompt, so a full scan costs
prompts × (heads + 1) forward passes: it grows with layers × heads (72 heads on Gemma 3 270M, 1,024 on
Llama-3.1-8B). Under ``--max-heads N`` the scan is sampled in two steps: every head is first *screened* on
:data:`SCREEN_PROMPTS` corrupted prompt(s), and only the N heads with the largest screened effect are patched into
the other prompts. The screen is the same measurement on fewer prompts, so a head's final AIE is exactly the
full scan's (the screened prompts are counted in its mean), and the cost per head drops from every prompt to one
for all but N heads.

Why a screen and not a cheaper proxy: on Gemma 3 270M the norm of what a head's patch writes into the residual
stream, and its projection on the in-context-minus-corrupted residual gap, ranked the full scan's top 10 heads
as low as 62nd-68th of 72; one screened prompt ranked them all within the top 18 (BUILD.md, "The fv head budget").
"""

from __future__ import annotations

import numpy as np

DEFAULT_MAX_HEADS = 64
"""Heads the AIE scan measures on every prompt (``--max-heads``). On Gemma 3 270M one screened prompt ranked the
full scan's top 10 heads within its top 18, so 64 leaves a 3.5-fold margin for bigger, noisier models, and
keeps the scan's second step at 64 × prompts passes whatever the model's depth and head count (an 8B Llama's full
scan is 16× the passes; the arithmetic is in BUILD.md, "Build cost")."""

SCREEN_PROMPTS = 1
"""Corrupted prompts every head is screened on before the budgeted scan (one: the cheapest screen that kept the
full scan's top 10 on Gemma 3 270M; two tightened their worst rank from 18 to 15 at twice the cost)."""


def heads_to_scan(screened: np.ndarray | None, n_layer: int, n_head: int, max_heads: int) -> list[tuple[int, int]]:
    """The (block, head) pairs measured on every prompt, in scan order (block, then head): every head when the
    budget covers them all (``screened`` is then not needed), else the ``max_heads`` with the largest screened AIE
    (``screened``: (n_layer, n_head)); ties go to the earlier head."""
    if max_heads < 1:
        raise ValueError(f"max_heads must be >= 1, not {max_heads}")
    if max_heads >= n_layer * n_head:
        return [(i, h) for i in range(n_layer) for h in range(n_head)]
    if screened is None or screened.shape != (n_layer, n_head):
        raise ValueError(f"a budget of {max_heads} heads needs screened effects of shape ({n_layer}, {n_head})")
    order = np.argsort(-screened, axis=None, kind="stable")[:max_heads]
    return sorted((int(k // n_head), int(k % n_head)) for k in order)


def screen_prompts(n_layer: int, n_head: int, max_heads: int, n_prompts: int, screen: int = SCREEN_PROMPTS) -> int:
    """How many of the ``n_prompts`` corrupted prompts every head is screened on: none when the budget covers every
    head (the full scan), else ``screen`` of them (at most all)."""
    return 0 if max_heads >= n_layer * n_head else min(screen, n_prompts)


def scan_passes(n_layer: int, n_head: int, max_heads: int, n_prompts: int, screen: int = SCREEN_PROMPTS
                ) -> tuple[int, int]:
    """Forward passes of the scan's two steps, (screen, heads), each counting one unpatched baseline per prompt:
    a full scan is (0, n_prompts × (heads + 1)); a budgeted one screens every head on ``screen`` prompts, then
    measures ``max_heads`` heads on the remaining prompts."""
    total = n_layer * n_head
    k = screen_prompts(n_layer, n_head, max_heads, n_prompts, screen)
    if not k:
        return 0, n_prompts * (total + 1)
    return k * (total + 1), (n_prompts - k) * (max_heads + 1)


def top_heads(aie: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest AIE among those measured on every prompt (the others are NaN), largest
    first."""
    flat = np.where(np.isnan(aie), -np.inf, aie).ravel()
    n_scanned = int(np.isfinite(flat).sum())
    if not 1 <= k <= n_scanned:
        raise ValueError(f"cannot take the top {k} of {n_scanned} scanned heads")
    order = np.argsort(-flat, kind="stable")[:k]
    return [(int(i // aie.shape[1]), int(i % aie.shape[1])) for i in order]


def project_heads(w_o: dict[int, np.ndarray], mean_kqv: np.ndarray, heads: list[tuple[int, int]],
                  head_dim: int) -> np.ndarray:
    """The function vector: Σ over ``heads`` of W_O[l][:, head slice] · mean_kqv[l, head slice], (n_embd,)."""
    sv = None
    for li, h in heads:
        sl = slice(h * head_dim, (h + 1) * head_dim)
        part = w_o[li][:, sl].astype(np.float64) @ mean_kqv[li, sl].astype(np.float64)
        sv = part if sv is None else sv + part
    if sv is None:
        raise ValueError("no heads to project")
    return sv
