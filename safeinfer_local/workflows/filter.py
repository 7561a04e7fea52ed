"""Batch-filtering prompt files (``safeinfer filter``): read prompts, generate with a variant, judge each reply,
append one JSON record per prompt. Never loses or duplicates work: every record is appended and flushed when its
prompt finishes, a rerun skips ids already written (a torn last line is detected and redone), and the finished
file is rewritten in input order."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TextIO

from .. import jsonl
from ..core.judge import is_refusal
from ..errors import UsageError
from ..jsonl import claim
from .inputs import Item, items_hash
from .runs import RECORDS, Run, Summary, upgrade_header


def record(item: Item, variant: str, response: str | None = None, n_tokens: int = 0, tokens_per_s: float = 0.0,
           guided_tokens: int = 0, error: str | None = None) -> dict:
    if error is None and item.error is None:
        verdict = "refused" if is_refusal(response or "") else "answered"
    else:
        verdict = "error"
    return {"id": item.id, "index": item.index, "prompt": item.prompt, "response": response, "variant": variant,
            "verdict": verdict, "error": error or item.error, "n_tokens": n_tokens,
            "tokens_per_s": round(tokens_per_s, 2), "guided_tokens": guided_tokens}


def result_record(item: Item, variant: str, r, judge=None) -> dict:
    """The record of an item from its generation ``r`` (a :class:`~safeinfer_local.decode.batch.Result`, or the
    error that stopped it) and the optional ``--judge-model`` classifier."""
    if isinstance(r, Exception):
        return record(item, variant, error=str(r))
    rec = record(item, variant, r.response, r.n_tokens, r.tokens_per_s, r.guided_tokens)
    rec["gate_score"] = None if r.gate_score is None else round(r.gate_score, 4)
    rec["flagged"] = r.flagged
    if r.stop_reason == "refused":
        rec["verdict"] = "refused"
    if judge is not None:
        rec["judge"] = judge.classify(item.prompt, r.response)
    return rec


def generate_records(si, items: list[Item], frame: str | None = None, parallel: int = 1, judge=None,
                     **gen) -> Iterator[dict]:
    """The record of every item: unreadable ones first, then the others as their generations finish (up to
    ``parallel`` in the same batches)."""
    variant = si.default_variant()
    for it in items:
        if it.error is not None:
            yield record(it, variant)
    runs = {it.id: it for it in items if it.error is None}
    for key, r in si.generate_many(((it.id, it.prompt) for it in runs.values()), frame=frame, n_parallel=parallel,
                                   **gen):
        yield result_record(runs[key], variant, r, judge)


def filter_blocked(r: dict) -> bool | None:
    """Where a filter record goes in --split: blocked when the model refused or --judge-model judged the reply
    unsafe; None (neither file) for an error."""
    if r["verdict"] == "error":
        return None
    return r["verdict"] == "refused" or r.get("judge") == "unsafe"


def merge(out: Path, shards: list[Path], force: bool = False) -> int:
    """Join shard outputs in input order. The shards must be filter outputs of one input with the same settings
    (their headers differ by the shard only); duplicate ids or gaps in the input positions are refused. ``out``
    gets the shared header; an existing ``out`` that is not a filter output of that input and those settings is
    refused untouched (``force`` overwrites it)."""
    recs: dict[str, dict] = {}
    head: dict | None = None
    for p in shards:
        if not p.is_file():
            raise UsageError(f"shard output not found: {p}")
        loaded = jsonl.load(p, key=lambda r: (str(r["id"]), int(r["index"])))
        if loaded.header is None or loaded.header.get("kind") != KIND:
            raise UsageError(f"{p} is not a filter output (it has no filter header)")
        h = upgrade_header(loaded.header) | {"shard": None}
        if head is None:
            head = h
        elif (diff := jsonl.header_mismatch(head, h)) is not None:
            raise UsageError(f"{p} was written for another input or with other settings than {shards[0]} ({diff}); "
                             "merge only the shards of one filter run")
        if loaded.torn:
            raise UsageError(f"{p}: the last line is torn (the shard is unfinished: rerun its filter command)")
        for r in loaded.records:
            rid = str(r["id"])
            if rid in recs:
                raise UsageError(f"id {rid!r} appears in more than one shard output (or twice in {p})")
            recs[rid] = r | {"index": int(r["index"])}
    if not recs or head is None:
        raise UsageError("no records in the shard outputs")
    ordered = sorted(recs.values(), key=lambda r: r["index"])
    have = {r["index"] for r in ordered}
    missing = [i for i in range(ordered[-1]["index"] + 1) if i not in have]
    if missing:
        raise UsageError(f"the shards leave a gap: input positions {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         "have no record (a shard is missing or unfinished)")
    if any(out.resolve() == p.resolve() for p in shards):
        raise UsageError(f"{out} is one of the shards; merge into another file")
    claim(out, head, what="filter output", force=force, upgrade=upgrade_header)
    jsonl.write_records(out, ordered, header=head)
    return len(ordered)


KIND = "safeinfer filter"


def header(si, items: list[Item], shard: tuple[int, int] | None, frame: str | None, judge, gen: dict) -> dict:
    """The first line of a filter output: the input and every setting that shapes a record. A rerun must match
    it to resume; merge checks that its shards agree on everything but the shard."""
    return {"kind": KIND, "records": RECORDS, "input_sha256": items_hash(items), "n_items": len(items),
            "shard": f"{shard[0]}/{shard[1]}" if shard else None,
            "settings": si.fingerprint() | {"variant": si.default_variant(), "frame": frame or "template",
                                            "judge_model": judge.model.path.name if judge is not None else None}
                        | {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(gen.items())}}


def run(si, items: list[Item], out: Path | None = None, split: Path | None = None,
        shard: tuple[int, int] | None = None, parallel: int = 1, frame: str | None = None, judge=None,
        progress: Callable[[str, int, int], None] | None = None,
        on_resume: Callable[[int, int], None] | None = None, force: bool = False,
        records: Callable[[list[Item]], Iterable[dict]] | None = None, stream: TextIO | None = None,
        **gen) -> Summary:
    """``safeinfer filter``: generate a reply for every wanted item with ``si``'s settings and judge it, one
    record per item appended to ``out`` (flushed as each finishes; a rerun resumes) or written to stdout in input
    order. ``gen``: the fields of a generation (max_tokens, temperature, ..., stop). ``records``: what makes the
    records of the items still to do, in any order (default: :func:`generate_records` here, in this process;
    ``safeinfer_local.ray`` passes Ray Data actors that run it); ``stream``: where records go without ``out``
    (default: stdout).

    ``out`` starts with a header naming the input and the settings: a rerun into it resumes only with the same
    ones, and a file that is not a filter output is never written; ``force`` starts either over."""
    head = header(si, items, shard, frame, judge, gen)
    with Run(items, out, head, "filter", shard, force, on_resume, progress, stream) as run:
        source = (records(run.todo) if records is not None
                  else generate_records(si, run.todo, frame=frame, parallel=parallel, judge=judge, **gen))
        for rec in source:
            run.write(rec)
        return run.finish(split, filter_blocked, lambda recs: dict(Counter(r["verdict"] for r in recs)))
