"""The inputs of the batch commands (``filter``, ``screen``, ``--ray``): prompt files (JSON Lines, CSV, text, or
standard input, where JSON Lines is recognised when every non-empty line is a JSON object) read into
:class:`Item` s, shards by a hash of the id, and what identifies an input in an output's header."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import files, jsonl
from ..errors import UsageError

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
        if not Path(path).is_file():
            raise UsageError(f"input file not found: {path}")
        text = files.read_text(path)
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


def items_hash(items: list[Item]) -> str:
    """What identifies an input: its prompts with their ids and positions (not the file's name or bytes)."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.index, it.id, it.prompt, it.error], ensure_ascii=False).encode("utf-8", "replace"))
    return h.hexdigest()[:16]


def pending(items: list[Item], done: dict[str, dict], shard: tuple[int, int] | None) -> Iterator[Item]:
    for it in items:
        if in_shard(it.id, shard) and it.id not in done:
            yield it
