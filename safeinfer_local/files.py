"""The one way the tool writes a whole file, and the one check of what it may overwrite. Pure I/O: no model.

- :func:`replace` writes a file atomically: into a temporary file in the target's folder, flushed and fsynced,
  renamed over the target, then the folder fsynced. A failure at any point (a full disk, a read-only or vanished
  folder, Ctrl-C) removes the temporary file and leaves the previous file exactly as it was; an ``OSError``
  becomes one :class:`~safeinfer_local.errors.OutputError` line that says so. A symbolic link is written through
  (its target is replaced; the link stays).
- :func:`check_target` runs before a command does any work: it refuses (one :class:`UsageError` line, exit 2) an
  output that is a folder, sits where no file can be made, is one of the command's inputs (the same file, through
  links too), or exists and is not a file of the kind the command writes (:class:`Kind`: a model GGUF where a
  vector goes, a vector without our provenance, a report or split file of the user's). ``force`` overwrites the
  last two. An empty file holds nothing to lose and is always ours.

The appending side (``filter -o``, ``screen -o``, ``bench harm``'s ``results.jsonl``) is :mod:`safeinfer_local.jsonl`,
whose whole-file rewrites come through :func:`replace` too.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError, UsageError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def reason(e: OSError) -> str:
    """An OSError's text without its errno number and file name (``No space left on device``)."""
    return e.strerror or str(e)


def hint(e: OSError) -> str:
    return "free space" if e.errno in _NO_SPACE else "fix that"


def read_text(path: str | Path, encoding: str = "utf-8", error: type[Exception] = UsageError) -> str:
    """A text file's contents; one ``error`` line naming the file when it is not UTF-8 or cannot be read."""
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {path}: {reason(e)}") from None


def real(path: str | Path) -> Path:
    """``path`` through any symbolic links: the file that is really written."""
    return Path(os.path.realpath(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_name(target: Path) -> Path:
    """A fresh temporary name next to ``target`` (hidden, never the target's own name)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")


def replace(path: str | Path, content: bytes | str | Callable[[Path], object],
            check: Callable[[Path], object] | None = None) -> Path:
    """Replace ``path`` with ``content`` atomically and durably; returns the path written (links resolved).

    ``content`` is the file's bytes, its text (UTF-8), or a function that writes the file at the path it is given
    (a GGUF writer, ``savefig``): it is given the temporary file's path (which ends in ``.tmp``, so pass a format
    explicitly where a library guesses it from the name). A new file gets the usual permissions (0666 less the
    umask); a replaced one keeps its mode.

    ``check(tmp)``, when given, reads the written file back before it replaces anything and raises if it is not
    what was meant: some writers lose a failed write silently (numpy's ``tofile``, behind the GGUF writer, drops
    the error of its last buffered write on a full disk)."""
    target = real(path)
    existed = target.exists()
    tmp = temp_name(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(tmp)
            fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            if check is not None:
                try:
                    check(tmp)
                except Exception as e:
                    os.close(fd)
                    if _full(target.parent):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
                    raise OSError(errno.EIO, f"what was written does not read back ({e})") from None
        else:
            data = content.encode("utf-8", "backslashreplace") if isinstance(content, str) else bytes(content)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except BaseException:
                os.close(fd)
                raise
        try:
            os.fchmod(fd, (target.stat().st_mode & 0o7777) if existed else (0o666 & ~_umask()))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as e:
        if e.errno is None and _full(target.parent):  # numpy's tofile (the GGUF writer) reports a short write
            e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _discard(tmp)
        kept = "the previous file is untouched" if existed else "nothing was written"
        raise OutputError(f"cannot write {target}: {reason(e)}; {kept}: {hint(e)} and rerun") from None
    except BaseException:  # Ctrl-C, or the writer's own error: no temporary file is left behind
        _discard(tmp)
        raise
    sync_folder(target.parent)
    return target


def _full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


def sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename in it is durable (best effort: some filesystems cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- ownership


@dataclass(frozen=True)
class Kind:
    """A kind of file a command writes: ``name`` for messages and ``foreign(path)``, which says why an existing,
    non-empty file at ``path`` is not one of ours, as a clause ("it is a model GGUF ..."; None when it is ours, so
    it may be overwritten)."""

    name: str
    foreign: Callable[[Path], str | None]


ANY = Kind("file", lambda path: None)
"""For outputs whose owner is checked later by what writes them (a JSON Lines header: ``jsonl.claim``)."""


def check_target(path: str | Path, kind: Kind, *, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 force: bool = False, flag: str = "--out") -> Path:
    """Check, before any work, that ``path`` may be written as a ``kind`` file; returns it. Creates its folder.

    ``inputs`` are the command's (what, path) inputs (what: "--demos file"): an output that is the same file as
    one of them (through links too) is refused, as is an existing file that ``kind`` does not recognise as ours;
    ``force`` allows both (the user asked for it). A folder, or a place no file can be made, is refused always."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a folder; give a file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create the output folder {parent}: {reason(e)}") from None
    if not parent.is_dir():
        raise UsageError(f"cannot write {p}: {parent} is not a folder")
    _probe(p, parent)
    if not (p.exists() or p.is_symlink()):
        return p
    if p.is_symlink() and not p.exists():
        return p  # a dangling link: writing creates its target
    if not p.is_file():
        raise UsageError(f"{flag} {p} is not a regular file; give a file")
    if not os.access(real(p), os.W_OK):
        raise UsageError(f"cannot write {p}: it is read-only or immutable")
    if not force:
        for opt, src in inputs:
            if src is not None and str(src) != "-" and Path(src).exists() and _same(p, Path(src)):
                raise UsageError(f"not overwriting {p}: it is the {opt}, an input of this command; use "
                                 f"another {flag}, or --force")
        if p.stat().st_size:
            why = kind.foreign(p)
            if why is not None:
                raise UsageError(f"not overwriting {p}: {why}, not a {kind.name} written by this tool; use another "
                                 f"{flag}, or --force")
    return p


def _probe(p: Path, parent: Path) -> None:
    """Can a file be made beside ``p`` (where :func:`replace` makes its temporary file)? One line if not: a
    read-only or special filesystem (``/proc``), no permission, an immutable folder."""
    tmp = temp_name(real(p) if p.exists() else real(parent) / p.name)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise UsageError(f"cannot write {p}: {reason(e)}") from None
    _discard(tmp)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def owned_by_lines(test: Callable[[dict], bool], what: str) -> Callable[[Path], str | None]:
    """A ``foreign`` check for a JSON Lines file: ours when every non-blank line is a JSON object that ``test``
    accepts (a first ``{"_header": ...}`` line too)."""
    import json

    def foreign(path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                for n, raw in enumerate(f):
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        return f"its line {n + 1} is not JSON"
                    if not isinstance(rec, dict) or not (test(rec) or (n == 0 and "_header" in rec)):
                        return f"its line {n + 1} is not {what}"
        except OSError as e:
            return f"it cannot be read ({reason(e)})"
        return None

    return foreign


def starts_with(prefix: bytes, what: str) -> Callable[[Path], str | None]:
    """A ``foreign`` check: ours when the file begins with ``prefix``."""

    def foreign(path: Path) -> str | None:
        try:
            with open(path, "rb") as f:
                head = f.read(len(prefix))
        except OSError as e:
            return f"it cannot be read ({reason(e)})"
        return None if head == prefix else f"it does not begin as {what} does"

    return foreign
