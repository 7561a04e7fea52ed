"""``safeinfer demo``: a non-interactive tour, callable from Python: what the shipped settings do to harmful and
benign prompts side by side, then the four variants' refusal margins on the harmful ones."""

from __future__ import annotations

from ..api import SafeInfer
from ..core.datasets import catqa, xstest
from ..core.demos import REFUSAL_PROBE
from ..core.settings import VARIANTS
from ..errors import UsageError

COMPLY = "Sure, here is"


def run(si: SafeInfer, n_prompts: int = 4, reply_tokens: int = 24) -> dict:
    """Two parts.

    ``side_by_side``: ``n_prompts`` harmful CatQA evaluation questions (one per category) and ``n_prompts`` benign
    XSTest questions (its evaluation half: harm-adjacent words, benign intent), each run as ``generate`` runs it
    with the loaded settings (chat template, the harm gate, the vector's recommended ``--on-flag``): the gate's
    score and verdict, what was done (refused, steered, decoded plainly) and the greedy reply.

    ``rows``: for the harmful ones, the margin log p(refusal) − log p(compliant opening) per variant in the ``qa``
    frame, every variant ungated (the method itself; a 270M base model never refuses by itself)."""
    if n_prompts < 1:
        raise UsageError(f"--prompts must be >= 1, not {n_prompts}")
    if si.steering is None:
        raise UsageError("the demo needs a safety vector (--vector)")
    harmful = [p.text for p in catqa(per_category=1)][:n_prompts]
    benign = [p.text for p in xstest("safe")[0::2]][:n_prompts]
    side = []
    for q, is_harmful in [(q, True) for q in harmful] + [(q, False) for q in benign]:
        r = si.generate(q, max_tokens=reply_tokens, temperature=0)
        done = ("refused" if r.stop_reason == "refused" else "decoded plainly" if r.flagged is False or
                r.variant == "base" else f"steered ({r.variant})")
        side.append({"prompt": q, "harmful": is_harmful, "gate_score": r.gate_score, "gate_flagged": r.flagged,
                     "done": done, "reply": r.response})
    gate = si.gate
    flagged = ([gate.frame("qa").flags(x) for x in si.gate_scores(harmful, frame="qa")]
               if gate is not None else [None] * len(harmful))
    ungated = si.with_(gate="off")  # the margins show the method itself on every prompt; the verdict is a column
    rows = []
    for q, f in zip(harmful, flagged, strict=True):
        row: dict = {"prompt": q, "gate_flagged": f}
        for v in VARIANTS:
            r = ungated.score(q, REFUSAL_PROBE, variant=v, frame="qa").logprob
            c = ungated.score(q, COMPLY, variant=v, frame="qa").logprob
            row[v] = r - c
        rows.append(row)
    st = si.steering
    return {"model": si.model.name, "gamma": st.gamma, "layers": list(st.layers), "positions": st.positions,
            "guidance": str(si.guidance), "lam": si.lam, "variant": si.default_variant(),
            "gate": gate is not None and si.settings.gate != "off", "on_flag": si.settings.on_flag,
            "refusal": REFUSAL_PROBE, "comply": " " + COMPLY, "side_by_side": side, "rows": rows}
