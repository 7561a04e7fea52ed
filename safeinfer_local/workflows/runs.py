"""One resumable run, the skeleton of ``filter``, ``screen`` (and, on Ray, ``filter --ray``): claim the output
(refusing a file that is not ours, or one written for another input or with other settings), work out what is
still pending, append each record as it finishes (flushed; a torn last line is cut off and redone on resume), turn
Ctrl-C into one line that says how far it got, and at the end rewrite the output in input order, write the
``--split`` files and count. ``bench harm`` (a folder, not a file) shares the appending part, :class:`Tally`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import files, jsonl
from ..core.gate import record_flagged
from ..errors import UsageError
from .inputs import Item, in_shard, pending


def _id(rec: dict) -> str:
    return str(rec["id"])


def load_done(out: Path) -> dict[str, dict]:
    """Records already in the output, by id. A torn last line (a kill mid-write) is cut off the file."""
    return jsonl.load(out, repair=True, key=_id).by_key(_id)


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


class Tally:
    """Appends the records of a resumable run and counts them: ``progress(stage, done, total)`` after each, and
    :meth:`interrupted` the line Ctrl-C prints (how many of how many are done, and how to resume)."""

    def __init__(self, app: jsonl.Appender, total: int, done_before: int, stage: str, noun: str, resume: str,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        self.app, self.total, self.done_before = app, total, done_before
        self.stage, self.noun, self.resume = stage, noun, resume
        self.progress = progress
        self.written: list[dict] = []

    @property
    def n_done(self) -> int:
        return self.done_before + len(self.written)

    def write(self, rec: dict) -> None:
        self.app.write(rec)
        self.written.append(rec)
        if self.progress:
            self.progress(self.stage, self.n_done, self.total)

    def interrupted(self) -> Interrupted:
        return Interrupted(f"interrupted: {self.n_done} of {self.total} {self.noun}; {self.resume}")


class Run:
    """A resumable run over the items of one shard, into ``out`` (or, without it, ``stream``/stdout in input
    order): ``with Run(...) as run:`` claims ``out`` (under its lock) and leaves :attr:`todo` (the items without
    a record yet); :meth:`write` appends a record; :meth:`finish` rewrites the output in input order, writes the
    split files and returns the :class:`Summary`. Ctrl-C inside the block becomes :class:`Interrupted`, every
    finished record kept."""

    def __init__(self, items: list[Item], out: Path | None, head: dict, kind: str, shard, force: bool,
                 on_resume: Callable[[int, int], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None, stream: TextIO | None = None,
                 noun: str = "prompts done") -> None:
        self.items, self.out, self.head, self.kind, self.shard = items, out, head, kind, shard
        self.force, self.on_resume, self.progress, self.stream, self.noun = force, on_resume, progress, stream, noun

    def __enter__(self) -> Run:
        self._lock = jsonl.locked(self.out, f"{self.kind} run")
        self._lock.__enter__()
        try:
            done: dict[str, dict] = {}
            if self.out is not None:
                done = jsonl.claim(self.out, self.head, what=f"{self.kind} output", force=self.force,
                                   key=_id, upgrade=upgrade_header).by_key(_id)
            self.todo = list(pending(self.items, done, self.shard))
            self.wanted = [it for it in self.items if in_shard(it.id, self.shard)]
            if done and self.on_resume:
                self.on_resume(len(self.wanted) - len(self.todo), len(self.wanted))
            app = jsonl.Appender(self.out, header=self.head if self.out is not None else None, stream=self.stream)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        where = f"rerun the same command to resume ({self.out})" if self.out else "use -o FILE to make runs resumable"
        self.tally = Tally(app, len(self.wanted), len(self.wanted) - len(self.todo), self.kind, self.noun, where,
                           self.progress)
        self._held: dict[int, dict] = {}  # stdout: records waiting for an earlier one, so it keeps input order
        self._order = [it.index for it in self.todo]
        self._next = 0
        return self

    @property
    def written(self) -> list[dict]:
        return self.tally.written

    def write(self, rec: dict) -> None:
        """Append ``rec`` to the output (flushed), or, to a stream, once every earlier record has gone."""
        if self.out is not None:
            self.tally.write(rec)
            return
        self._held[rec["index"]] = rec
        while self._next < len(self._order) and self._order[self._next] in self._held:
            self.tally.write(self._held.pop(self._order[self._next]))
            self._next += 1

    def finish(self, split: Path | None, blocked: Callable[[dict], bool | None],
               count: Callable[[list[dict]], dict[str, int]]) -> Summary:
        """The end of the run: the output rewritten in input order (:func:`finalize`; to stdout, this run's records
        in input order), the split files, the counts over the whole output."""
        self.tally.app.close()
        recs = (finalize(self.out, self.wanted) if self.out is not None
                else sorted(self.written, key=lambda r: r["index"]))
        if split is not None:
            write_split(recs, split, blocked)
        return Summary(len(self.wanted), self.tally.done_before, self.written, count(recs))

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self.tally.app.close()
        finally:
            self._lock.__exit__(kind, exc, tb)
        if kind is not None and issubclass(kind, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise self.tally.interrupted() from None


def finalize(out: Path, items: list[Item]) -> list[dict]:
    """Once every wanted item has a record: rewrite the output in input order, one record per id (the last one
    written wins; atomically). Returns the records."""
    loaded = jsonl.load(out, repair=True, key=_id)
    done = loaded.by_key(_id)
    order = {it.id: it.index for it in items}
    recs = sorted((upgrade(r) for r in done.values() if r["id"] in order), key=lambda r: order[r["id"]])
    jsonl.write_records(out, recs, header=upgrade_header(loaded.header) if loaded.header else None)
    return recs


RECORDS = "flagged"
"""The form of this version's filter and screen records, in their header's ``records``: ``flagged`` (true = the
gate judged the prompt harmful). A header without it was written before the rename, when records said ``gated``
(true = passed by the gate); such a file resumes, and its final rewrite is all in this form."""


def upgrade_header(header: dict) -> dict:
    """A filter or screen header as this version writes it (see :data:`RECORDS`)."""
    return header if "records" in header else header | {"records": RECORDS}


def upgrade(record: dict) -> dict:
    """A record as this version writes it: ``gated`` (earlier versions: true = passed by the gate, decoded plainly)
    becomes ``flagged`` (true = judged harmful; null without a gate), so that a file started by an older version
    and resumed by this one ends up all in one form."""
    if "gated" not in record or "flagged" in record:
        return record
    return {k: v for k, v in record.items() if k != "gated"} | {"flagged": record_flagged(record)}


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
