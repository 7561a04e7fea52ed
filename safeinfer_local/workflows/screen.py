"""``safeinfer screen``: prompt screening with the harm gate and no generation. Many prompts share each
``llama_decode`` (one KV sequence each), only the gate's block is read, and nothing is sampled. One record per
prompt (``id``, ``index``, ``prompt``, ``gate_score``, ``flagged``, ``error``), appended as each chunk finishes;
the same inputs, resume, shards and split files as ``filter``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..core.frames import resolve_frame
from ..errors import UsageError
from .inputs import Item, items_hash
from .runs import RECORDS, Run, Summary

KIND = "safeinfer screen"
CHUNK = 64


def header(si, items: list[Item], shard, frame: str, threshold: float) -> dict:
    g = si.gate
    return {"kind": KIND, "records": RECORDS, "input_sha256": items_hash(items), "n_items": len(items),
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "settings": {"model": si.fingerprint()["model_sha256_head"], "gate": si.fingerprint()["gate"],
                         "block": g.block, "frame": frame, "threshold": threshold}}


def _gate(si):
    gate = si.active_gate("safeinfer")
    if gate is None:
        raise UsageError("screen needs a vector with a harm gate (build one with `safeinfer vectors gate`)")
    return gate


def score_records(si, items: list[Item], frame: str) -> dict[int, dict]:
    """The record of each item, by its index: the gate's verdicts from ``SafeInfer.route_many`` (many prompts per
    decode; a prompt the gate cannot read is an error of its own)."""
    _gate(si)
    recs: dict[int, dict] = {}
    ok = []
    for it in items:
        if it.error is not None:
            recs[it.index] = _record(it, None, None, it.error)
            continue
        try:
            ok.append((it, si.encode_prompt(it.prompt, frame=frame)[0]))
        except UsageError as e:
            recs[it.index] = _record(it, None, None, str(e))
    routes = si.route_many([t for _, t in ok], "safeinfer", frame) if ok else []
    for (it, _), r in zip(ok, routes, strict=True):
        recs[it.index] = (_record(it, None, None, str(r)) if isinstance(r, UsageError)
                          else _record(it, r.gate_score, r.flagged))
    return recs


def run(si, items: list[Item], out: Path | None = None, split: Path | None = None, shard=None,
        frame: str | None = None, progress: Callable[[str, int, int], None] | None = None,
        on_resume: Callable[[int, int], None] | None = None, force: bool = False) -> Summary:
    fr = resolve_frame(False, frame)
    fg = _gate(si).frame(fr)
    with Run(items, out, header(si, items, shard, fr, fg.threshold), "screen", shard, force, on_resume, progress,
             noun="prompts screened") as run:
        for at in range(0, len(run.todo), CHUNK):
            chunk = run.todo[at:at + CHUNK]
            recs = score_records(si, chunk, fr)
            for it in chunk:
                run.write(recs[it.index])
        return run.finish(split, screen_blocked, counts)


def counts(recs: list[dict]) -> dict[str, int]:
    return {"flagged": sum(1 for r in recs if r["flagged"]), "passed": sum(1 for r in recs if r["flagged"] is False),
            "error": sum(1 for r in recs if r["error"] is not None)}


def screen_blocked(r: dict) -> bool | None:
    """Where a screen record goes in --split: blocked when flagged; None (neither file) for an error."""
    return None if r["error"] is not None else r["flagged"]


def _record(it: Item, score: float | None, flagged: bool | None, error: str | None = None) -> dict:
    return {"id": it.id, "index": it.index, "prompt": it.prompt,
            "gate_score": None if score is None else round(score, 4), "flagged": flagged, "error": error}
