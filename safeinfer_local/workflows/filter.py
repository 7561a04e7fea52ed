"""Batch-filtering prompt files (``safeinfer filter``): read prompts, generate with a variant, judge each reply,
append one JSON record per prompt. Never loses or duplicates work: every record is appended and flushed when its
prompt finishes, a rerun skips ids already written (a torn last line is detected and redone), and the finished
file is rewritten in input order."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import files, jsonl
from ..core.gate import record_flagged
from ..core.judge import is_refusal
from ..errors import UsageError
from ..jsonl import claim

FORMATS = ("jsonl", "csv", "txt")


@dataclass
class Item:
    """One input prompt (or a line that could not be read: ``error`` set)."""

    index: int  # position in the input, 0-based
    id: str
    prompt: str | None
    error: str | None = None


def detect_format(path: str, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise UsageError(f"unknown --format {fmt!r} (choose {', '.join(FORMATS)})")
        return fmt
    if path == "-":
        return "txt"  # read_items looks closer: JSON Lines when every non-empty line is a JSON object
    ext = Path(path).suffix.lower().lstrip(".")
    if ext in ("jsonl", "ndjson"):
        return "jsonl"
    if ext in ("csv", "txt"):
        return ext
    raise UsageError(f"cannot tell the format of {path} from its extension: pass --format jsonl|csv|txt")


def _all_json_objects(text: str) -> bool:
    """Whether every non-empty line of ``text`` (and at least one) is a JSON object."""
    lines = [x for x in text.splitlines() if x.strip()]
    if not lines or not all(x.lstrip().startswith("{") for x in lines):
        return False
    try:
        return all(isinstance(json.loads(x), dict) for x in lines)
    except json.JSONDecodeError:
        return False


def read_items(path: str, fmt: str | None = None, field: str | None = None) -> list[Item]:
    """All input items, in order. Malformed lines become error items that name the line."""
    given, fmt = fmt, detect_format(path, fmt)
    if path == "-":
        text = read_stdin()
        if not given and _all_json_objects(text):
            fmt = "jsonl"
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"input file not found: {path}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if fmt == "txt":
        items = [Item(i, str(n), line) for i, (n, line) in
                 enumerate((n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip())]
    elif fmt == "jsonl":
        items = _read_jsonl(text, field or "prompt", path)
    else:
        items = _read_csv(text, field or "prompt", path)
    if not items:
        raise UsageError(f"{path}: no prompts (the input is empty)")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        raise UsageError(f"{path}: id {dup!r} appears more than once; ids must be unique to resume safely")
    return items


def _read_jsonl(text: str, field: str, path: str) -> list[Item]:
    items: list[Item] = []
    seen_field = False
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or (n == 1 and line.startswith('{"' + jsonl.HEADER + '"')):
            continue  # blank, or the header of a filter output used as input
        idx = len(items)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            items.append(Item(idx, str(n), None, f"line {n}: not valid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict):
            items.append(Item(idx, str(n), None, f"line {n}: not a JSON object"))
            continue
        rid = str(obj["id"]) if "id" in obj else str(n)
        val = obj.get(field)
        if val is None:
            items.append(Item(idx, rid, None, f"line {n}: no field {field!r}"))
            continue
        seen_field = True
        if not isinstance(val, str) or not val.strip():
            items.append(Item(idx, rid, None, f"line {n}: field {field!r} is not a non-empty string"))
            continue
        items.append(Item(idx, rid, val))
    if items and not seen_field:
        raise UsageError(f"{path}: no line has the field {field!r} (use --field)")
    return items


def read_stdin() -> str:
    """Standard input as UTF-8 text (one line and exit 2 when it is not)."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"standard input is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_csv(text: str, column: str, path: str) -> list[Item]:
    reader = csv.DictReader(io.StringIO(text), strict=True)
    try:
        names = reader.fieldnames
    except csv.Error as e:
        raise UsageError(f"{path}: not valid CSV in the header line ({e})") from None
    if names is None:
        return []
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise UsageError(f"{path}: the header names column {dup[0]!r} more than once")
    if column not in names:
        raise UsageError(f"{path}: no column {column!r} (columns: {', '.join(reader.fieldnames)}; use --field)")
    items = []
    rows = iter(reader)
    n = 1  # a record's id without an id column: its number + 1, its line in a file without multi-line fields
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. an unterminated quote, which would swallow the rest of the file
            raise UsageError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        n += 1
        idx = len(items)
        rid = row.get("id") or str(n)
        val = row.get(column)
        if val is None or not val.strip():
            items.append(Item(idx, rid, None, f"line {n}: empty {column!r}"))
        else:
            items.append(Item(idx, rid, val))
    return items


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 2/4), not {spec!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise UsageError(f"--shard {spec}: need 1 <= I <= N")
    return i, n


def in_shard(item_id: str, shard: tuple[int, int] | None) -> bool:
    """A deterministic 1/N of the input by a hash of the id (the same on every machine and run)."""
    if shard is None:
        return True
    i, n = shard
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big")
    return h % n == i - 1


def _id(rec: dict) -> str:
    return str(rec["id"])


def load_done(out: Path) -> dict[str, dict]:
    """Records already in the output, by id. A torn last line (a kill mid-write) is cut off the file."""
    return jsonl.load(out, repair=True, key=_id).by_key(_id)


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


def finalize(out: Path, items: list[Item], split_dir: Path | None, blocked: Callable[[dict], bool | None]
             ) -> list[dict]:
    """Once every wanted item has a record: rewrite the output in input order, one record per id (the last one
    written wins; atomically), and write the split files. Returns the records."""
    loaded = jsonl.load(out, repair=True, key=_id)
    done = loaded.by_key(_id)
    order = {it.id: it.index for it in items}
    recs = sorted((upgrade(r) for r in done.values() if r["id"] in order), key=lambda r: order[r["id"]])
    jsonl.write_records(out, recs, header=loaded.header)
    if split_dir is not None:
        write_split(recs, split_dir, blocked)
    return recs


def upgrade(record: dict) -> dict:
    """A record as this version writes it: ``gated`` (earlier versions: true = passed by the gate, decoded plainly)
    becomes ``flagged`` (true = judged harmful; null without a gate), so that a file started by an older version
    and resumed by this one ends up all in one form."""
    if "gated" not in record or "flagged" in record:
        return record
    return {k: v for k, v in record.items() if k != "gated"} | {"flagged": record_flagged(record)}


def finish(out: Path | None, wanted: list[Item], written: list[dict], split_dir: Path | None,
           blocked: Callable[[dict], bool | None]) -> list[dict]:
    """The end of a filter or screen run: :func:`finalize` the output (or, to stdout, take this run's records in
    input order) and write the split files; returns the records."""
    if out is not None:
        return finalize(out, wanted, split_dir, blocked)
    recs = sorted(written, key=lambda r: r["index"])
    if split_dir is not None:
        write_split(recs, split_dir, blocked)
    return recs


def filter_blocked(r: dict) -> bool | None:
    """Where a filter record goes in --split: blocked when the model refused or --judge-model judged the reply
    unsafe; None (neither file) for an error."""
    if r["verdict"] == "error":
        return None
    return r["verdict"] == "refused" or r.get("judge") == "unsafe"


SPLIT_FILES = {"allowed.jsonl": False, "blocked.jsonl": True}
"""The files of a --split folder and which records each holds (blocked or not)."""

SPLIT_FILE = files.Kind("split file", files.owned_by_lines(
    lambda r: {"id", "index", "prompt"} <= r.keys() and ("verdict" in r or "flagged" in r),
    "a filter or screen record"))


def check_split(split_dir: Path | None, force: bool = False, inputs=()) -> None:
    """Before a run: the --split folder is a folder (made if missing) and its allowed/blocked files, if there, are
    split files of ours (``force``: overwrite them anyway). One line and exit 2 otherwise."""
    if split_dir is None:
        return
    if split_dir.exists() and not split_dir.is_dir():
        raise UsageError(f"--split {split_dir} is a file; give a folder")
    for name in SPLIT_FILES:
        files.check_target(split_dir / name, SPLIT_FILE, inputs=inputs, force=force, flag="--split")


def write_split(recs: list[dict], split_dir: Path, blocked: Callable[[dict], bool | None]) -> None:
    try:
        split_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --split folder {split_dir}: {e.strerror}") from None
    for name, want in SPLIT_FILES.items():
        jsonl.write_records(split_dir / name, (r for r in recs if blocked(r) is want))


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
        h = loaded.header | {"shard": None}
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
    claim(out, head, what="filter output", force=force)
    jsonl.write_records(out, ordered, header=head)
    return len(ordered)


def pending(items: list[Item], done: dict[str, dict], shard: tuple[int, int] | None) -> Iterator[Item]:
    for it in items:
        if in_shard(it.id, shard) and it.id not in done:
            yield it


@dataclass
class Summary:
    """What a filter run did: the wanted items (this shard), how many were already done, the records written
    now, and the counts per verdict over the whole output."""

    wanted: int
    done_before: int
    written: list[dict]
    counts: dict[str, int]

    @property
    def mean_tokens_per_s(self) -> float:
        speeds = [r["tokens_per_s"] for r in self.written if r["verdict"] != "error" and r["tokens_per_s"]]
        return sum(speeds) / len(speeds) if speeds else 0.0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: every finished record is kept; ``message`` says how far it got and how to resume."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


KIND = "safeinfer filter"


def start(items: list[Item], out: Path | None, head: dict, what: str, shard, force: bool,
          on_resume: Callable[[int, int], None] | None, stream: TextIO | None = None
          ) -> tuple[list[Item], list[Item], jsonl.Appender]:
    """Claim ``out`` for a run (refusing a foreign or mismatched file), and say what is left: (the items of this
    shard, those without a record yet, the appender for the records: ``out``, else ``stream`` or stdout)."""
    done: dict[str, dict] = {}
    if out is not None:
        done = claim(out, head, what=what, force=force, key=_id).by_key(_id)
    todo = list(pending(items, done, shard))
    wanted = [it for it in items if in_shard(it.id, shard)]
    if done and on_resume:
        on_resume(len(wanted) - len(todo), len(wanted))
    return wanted, todo, jsonl.Appender(out, header=head if out is not None else None, stream=stream)


def items_hash(items: list[Item]) -> str:
    """What identifies an input: its prompts with their ids and positions (not the file's name or bytes)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.index, it.id, it.prompt, it.error], ensure_ascii=False).encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def header(si, items: list[Item], shard: tuple[int, int] | None, frame: str | None, judge, gen: dict) -> dict:
    """The first line of a filter output: the input and every setting that shapes a record. A rerun must match
    it to resume; merge checks that its shards agree on everything but the shard."""
    return {"kind": KIND, "input_sha256": items_hash(items), "n_items": len(items),
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
    with jsonl.locked(out, "filter run"):
        head = header(si, items, shard, frame, judge, gen)
        wanted, todo, app = start(items, out, head, "filter output", shard, force, on_resume, stream)
        written: list[dict] = []
        held: dict[int, dict] = {}  # stdout: records waiting for an earlier one, so the output keeps input order
        order = [it.index for it in todo]
        nxt = 0

        def emit(rec: dict) -> None:
            nonlocal nxt
            written.append(rec)
            if out is not None:
                app.write(rec)
            else:
                held[rec["index"]] = rec
                while nxt < len(order) and order[nxt] in held:
                    app.write(held.pop(order[nxt]))
                    nxt += 1
            if progress:
                progress("filter", len(written), len(todo))

        try:
            source = (records(todo) if records is not None
                      else generate_records(si, todo, frame=frame, parallel=parallel, judge=judge, **gen))
            for rec in source:
                emit(rec)
        except KeyboardInterrupt:
            app.close()
            n_done = len(wanted) - len(todo) + (len(written) if out is not None else nxt)
            where = f"rerun the same command to resume ({out})" if out else "use -o FILE to make runs resumable"
            raise Interrupted(f"interrupted: {n_done} of {len(wanted)} prompts done; {where}") from None
        app.close()
        counts = dict(Counter(r["verdict"] for r in finish(out, wanted, written, split, filter_blocked)))
        return Summary(len(wanted), len(wanted) - len(todo), written, counts)
