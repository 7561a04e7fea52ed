"""The append-only JSON Lines store behind ``filter -o`` and ``bench harm``'s ``results.jsonl`` (and what reads them
back: ``bench report``, ``merge``). Pure I/O: no model.

- :class:`Appender` writes one record per line; each line is written whole, then fsynced, before ``write`` returns.
  A write that fails (disk full, quota, I/O error, read-only, permission) is undone (the file is cut back to its
  last whole record) and raised as one :class:`~safeinfer_local.errors.OutputError` that names the file, the OS
  reason, how many whole records the file keeps, and how to resume.
- :func:`load` reads such a file back. Only a torn last line can come from a kill or a full disk mid-write (no
  trailing newline, or not valid JSON / UTF-8); ``repair=True`` (resuming, to append again) cuts it off the file,
  ``repair=False`` (a read-only reader such as a report) skips it and leaves the file as it is. Any other bad line
  is an error naming it, in both modes: whole records after it are never thrown away.
- :func:`write_records` replaces a whole file atomically (:func:`safeinfer_local.files.replace`: a temporary file,
  fsync, rename, fsync of the folder).

Header: a first line ``{"_header": {...}}`` (what wrote the file: input hash, settings) is kept apart from the
records by :func:`load` (``Loaded.header``) and written first into a new file by ``Appender(..., header=...)``.
:func:`claim` compares it before a run appends: a file of another input or other settings, or one that is not
ours at all, is refused untouched (``force`` starts it over).

Files are written through symbolic links (to their target), never replacing the link.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import files
from .errors import OutputError, UsageError

HEADER = "_header"
"""The key of a header record (the first line of a file, never a record)."""


def dumps(rec: dict) -> str:
    """One record as one line of JSON, with its newline (UTF-8 text kept as is)."""
    return json.dumps(rec, ensure_ascii=False) + "\n"


def _encode(text: str) -> bytes:
    # a lone surrogate (bad bytes from a tokenizer) becomes a JSON \\udxxx escape, which reads back as the same str
    return text.encode("utf-8", "backslashreplace")


_reason, _hint = files.reason, files.hint


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class Loaded:
    """What :func:`load` found: the records in file order, the header record if the file has one, the size in
    bytes of the whole lines kept, and the size of the torn tail (skipped, or cut off when repairing)."""

    records: list[dict] = field(default_factory=list)
    header: dict | None = None
    end: int = 0
    torn: int = 0

    def by_key(self, key: Callable[[dict], Hashable]) -> dict:
        """The records by ``key(record)``; the last one per key wins (a retried error replaces the first try)."""
        return {key(r): r for r in self.records}


def load(path: Path | str, *, repair: bool = False, key: Callable[[dict], Hashable] | None = None) -> Loaded:
    """The records of an append-only JSON Lines file (none when it does not exist). Blank lines are skipped.

    A torn last line (no trailing newline, or not valid JSON / UTF-8) is skipped; with ``repair`` it is also cut
    off the file, so that appending can continue after the last whole record. ``key`` (when given) must work on
    every record: a line it fails on is not a record of this file. A bad line anywhere else raises
    :class:`UsageError` naming it (the file is left as it is)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return Loaded()
    except OSError as e:
        raise UsageError(f"cannot read {p}: {_reason(e)}") from None
    lines = data.split(b"\n")  # the last item is b"" when the file ends with a newline, else the torn tail
    last = max((i for i, raw in enumerate(lines[:-1]) if raw.strip()), default=-1)
    out = Loaded(end=len(data))
    pos = 0
    for i, raw in enumerate(lines[:-1]):
        start, pos = pos, pos + len(raw) + 1
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError as e:  # bad JSON, or bytes that are not UTF-8
            if i == last and not lines[-1].strip():
                out.end = start  # the torn last line
                break
            why = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise UsageError(f"{p}:{i + 1}: {why}; only a torn last line can be skipped: fix or remove "
                             "this line") from None
        if not isinstance(rec, dict):
            raise UsageError(f"{p}:{i + 1}: not a JSON object")
        if HEADER in rec and out.header is None and not out.records:
            out.header = rec[HEADER] if isinstance(rec[HEADER], dict) else {}
            continue
        if key is not None:
            try:
                key(rec)
            except (KeyError, TypeError, ValueError) as e:
                raise UsageError(f"{p}:{i + 1}: not a record of this file ({type(e).__name__}: {e}); use another "
                                 "output or remove it") from None
        out.records.append(rec)
    else:
        out.end = pos  # whole lines; anything after the last newline is a torn tail
    out.torn = len(data) - out.end
    if repair and out.torn:
        try:
            with open(p, "r+b") as f:
                f.truncate(out.end)
                os.fsync(f.fileno())
        except OSError as e:
            raise OutputError(f"cannot cut the torn last line off {p}: {_reason(e)}; {_hint(e)} and rerun the "
                              "same command to resume") from None
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def header_mismatch(old: dict, new: dict) -> str | None:
    """The first setting where two headers differ, as ``key: old, now new``; None when they agree."""
    a, b = _flat(old), _flat(new)
    for k in list(b) + [k for k in a if k not in b]:
        if a.get(k) != b.get(k):
            return f"{k}: {a.get(k)!r}, now {b.get(k)!r}"
    return None


def first_header(path: Path) -> tuple[bool, dict | None]:
    """(whether ``path`` has any content, its header record or None) from the first line alone."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except FileNotFoundError:
        return False, None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {_reason(e)}") from None
    if not line.strip():
        return bool(line) and Path(path).stat().st_size > len(line), None
    try:
        rec = json.loads(line)
    except ValueError:
        return True, None
    return True, rec[HEADER] if isinstance(rec, dict) and isinstance(rec.get(HEADER), dict) else None


def claim(path: Path, header: dict, *, what: str, force: bool = False,
          key: Callable[[dict], Hashable] | None = None, upgrade: Callable[[dict], dict] | None = None) -> Loaded:
    """Make ``path`` this run's output before anything is written to it. A missing or empty file is new; a file
    whose header equals ``header`` is resumed (its records returned, a torn tail cut); any other file (another
    input, other settings, or not ``what`` at all) is refused with one line and left untouched, unless ``force``,
    which empties it. The header is written by the :class:`Appender` that follows. ``upgrade``: the header an
    older version wrote, in this version's form (compared after that)."""
    path = Path(os.path.realpath(path))
    has, old = first_header(path)
    if old is not None and upgrade is not None:
        old = upgrade(old)
    if not has:
        if path.exists() and path.stat().st_size:
            files.replace(path, "")  # blank lines only
        return Loaded()
    if old is None or old.get("kind") != header.get("kind"):
        if not force:
            raise UsageError(f"{path} exists and is not a {what}; use another output, or --force to overwrite it")
    elif (diff := header_mismatch(old, header)) is not None:
        if not force:
            raise UsageError(f"{path} holds a {what} of another input or other settings ({diff}); use another "
                             "output, or --force to start over")
    else:
        return load(path, repair=True, key=key)
    files.replace(path, "")
    return Loaded()


@contextmanager
def locked(path: Path | None, what: str) -> Iterator[None]:
    """Hold ``path``'s writer lock for the block (nothing when ``path`` is None): a second run writing the same
    file meanwhile, in this process or another, is refused with one line instead of appending the same records
    again. The lock is an advisory ``flock`` on the file itself (made empty if missing), released when the block
    ends or the process dies; a file replaced meanwhile (a finished run's final rewrite) is locked anew."""
    if path is None:
        yield
        return
    import fcntl

    p = files.real(path)
    while True:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(p, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except PermissionError:
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise OutputError(f"cannot write {path}: {_reason(e)}; {_hint(e)} and rerun the same command") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"{path} is being written by another run (a {what} in progress); wait for it to end, "
                             "or use another output") from None
        try:
            same = os.stat(p).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)  # replaced between open and lock: lock the file that is there now
    try:
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- appending


class Appender:
    """Appends one JSON line per record to ``path`` (or, with ``path`` None, to ``stream``, by default stdout: no
    resume there). Each line is written whole and fsynced before :meth:`write` returns; a failed write is cut back
    to the last whole record and raised as :class:`OutputError`. Opening cuts a torn tail (bytes after the last
    newline) so that a record is never glued onto it (load the file with ``repair=True`` first to cut a whole bad
    last line too). ``header`` is written first into an empty file."""

    def __init__(self, path: Path | None, *, header: dict | None = None, stream: TextIO | None = None) -> None:
        self.path = path
        self.stream = stream if stream is not None or path is not None else sys.stdout
        self.fd: int | None = None
        self.kept = 0  # whole records in the file
        self.end = 0  # its size in bytes
        if path is None:
            if header is not None:
                self._append(dumps({HEADER: header}), record=False)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o666)
            self.end, self.kept = _scan(path)
            if self.end < os.fstat(self.fd).st_size:
                os.ftruncate(self.fd, self.end)
        except OSError as e:
            self.close()
            raise OutputError(f"cannot write {path}: {_reason(e)}; {_hint(e)} and rerun the same command") from None
        if header is not None and not self.end:
            self._append(dumps({HEADER: header}), record=False)

    def write(self, rec: dict) -> None:
        """Append ``rec`` as one line and make it durable (flushed, fsynced) before returning."""
        self._append(dumps(rec))

    def _append(self, line: str, record: bool = True) -> None:
        if self.path is None:
            try:
                self.stream.write(line)
                self.stream.flush()
            except BrokenPipeError:
                raise
            except OSError as e:
                raise OutputError(f"cannot write to the standard output: {_reason(e)} (use -o FILE to make runs "
                                  "resumable)") from None
            return
        if self.fd is None:
            raise OutputError(f"cannot write {self.path}: the appender is closed (after an error or close())")
        raw = _encode(line)
        data = memoryview(raw)
        try:
            while data:
                data = data[os.write(self.fd, data):]
            os.fsync(self.fd)
        except OSError as e:
            cut = self._undo()
            torn = "" if cut else " (a torn last line is cut when you rerun)"
            n = f"{self.kept} whole record{'s' if self.kept != 1 else ''}"
            raise OutputError(f"cannot write {self.path}: {_reason(e)}; it keeps {n}{torn}: {_hint(e)} and rerun "
                              "the same command to resume") from None
        except BaseException:  # e.g. Ctrl-C between two partial writes: leave no torn line either
            if data:
                self._undo()
            else:  # the whole line is in the file (Ctrl-C came during its fsync): a finished record, kept
                self._count(raw, record)
            raise
        self._count(raw, record)

    def _count(self, raw: bytes, record: bool) -> None:
        self.end += len(raw)
        if record:
            self.kept += 1

    def _undo(self) -> bool:
        """Cut the file back to its last whole record and close it; False when the cut failed."""
        ok = True
        try:
            os.ftruncate(self.fd, self.end)
        except OSError:
            ok = False
        self.close()
        return ok

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scan(path: Path) -> tuple[int, int]:
    """(bytes up to and with the last newline, how many of those lines are records: not blank, not a header)."""
    end = n = 0
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if not line.endswith(b"\n"):
                break
            end += len(line)
            n += bool(line.strip()) and not (i == 0 and line.startswith(b'{"' + HEADER.encode() + b'"'))
    return end, n


# ---------------------------------------------------------------------------------------------------- rewriting


def write_records(path: Path, records: Iterable[dict], header: dict | None = None) -> None:
    """Replace ``path`` with these records (and the header first, when given), atomically."""
    head = dumps({HEADER: header}) if header is not None else ""
    files.replace(path, head + "".join(dumps(r) for r in records))
