"""``safeinfer demo``: a non-interactive tour of the four variants on harmful prompts, callable from Python."""

from __future__ import annotations

from ..api import SafeInfer
from ..core.datasets import catqa
from ..core.demos import REFUSAL_PROBE
from ..core.settings import VARIANTS
from ..errors import UsageError

COMPLY = "Sure, here is"


def run(si: SafeInfer, n_prompts: int = 4, reply_tokens: int = 24) -> dict:
    """For ``n_prompts`` harmful CatQA prompts (one per category), the margin log p(refusal) − log p(compliant
    opening) per variant in the ``qa`` frame (a 270M base model never refuses by itself), each variant's greedy
    reply to the first prompt (all ungated), and whether the vector's harm gate flags each prompt."""
    if n_prompts < 1:
        raise UsageError(f"--prompts must be >= 1, not {n_prompts}")
    if si.steering is None:
        raise UsageError("the demo needs a safety vector (--vector)")
    prompts = [p.text for p in catqa(per_category=1)][:n_prompts]
    gate = si.gate
    flagged = ([bool(x >= gate.frame("qa").threshold) for x in si.gate_scores(prompts, frame="qa")]
               if gate is not None else [None] * len(prompts))
    si = si.with_(gate="off")  # the tour shows the method itself on every prompt; the gate's verdict is a column
    rows = []
    for q, f in zip(prompts, flagged, strict=True):
        row: dict = {"prompt": q, "gate_flagged": f}
        for v in VARIANTS:
            r = si.score(q, REFUSAL_PROBE, variant=v, frame="qa").logprob
            c = si.score(q, COMPLY, variant=v, frame="qa").logprob
            row[v] = r - c
        rows.append(row)
    replies = {v: si.generate(prompts[0], variant=v, frame="qa", max_tokens=reply_tokens, temperature=0).response
               for v in VARIANTS}
    st = si.steering
    return {"model": si.model.name, "gamma": st.gamma, "layers": list(st.layers), "positions": st.positions,
            "guidance": str(si.guidance), "lam": si.lam, "refusal": REFUSAL_PROBE, "comply": " " + COMPLY,
            "rows": rows, "replies": replies}
