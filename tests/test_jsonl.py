"""The append-only JSON Lines store (safeinfer_local.jsonl): appending, torn-tail repair, the read-only load, and
write failures (simulated, and a real full disk on a tiny tmpfs). ``tiny_disk``/``grow`` are used by the full-disk
tests of filter and bench harm too."""

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from safeinfer_local import files, jsonl
from safeinfer_local.errors import OutputError, UsageError


@contextlib.contextmanager
def tiny_disk(path: Path, size: str):
    """A real filesystem of ``size`` (a tmpfs, e.g. "4k") mounted at ``path`` for the block. Needs root (CI runs as
    root); a root that cannot mount fails the test rather than skipping it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)]).returncode:
            subprocess.run(["umount", "-l", str(path)])


def grow(path: Path, size: str) -> None:
    """Give a ``tiny_disk`` more room (its files stay)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _id(r):
    return r["id"]


def test_append_and_load_round_trip_unicode(tmp_path):
    p = tmp_path / "sub" / "o.jsonl"
    recs = [{"id": "a", "text": "héllo ✓ 日本語 🙂"}, {"id": "b", "text": "line\nbreak \"quoted\""},
            {"id": "c", "text": "lone \udcff surrogate"}]
    with jsonl.Appender(p) as app:
        for r in recs:
            app.write(r)
        assert app.kept == 3
    assert p.read_text(encoding="utf-8").count("\n") == 3 and "日本語 🙂" in p.read_text(encoding="utf-8")
    got = jsonl.load(p)
    assert got.records == recs and got.torn == 0 and got.header is None
    assert jsonl.load(tmp_path / "missing.jsonl").records == []
    # reopening appends after what is there and counts it
    with jsonl.Appender(p) as app:
        assert app.kept == 3
        app.write({"id": "a", "text": "again"})
    assert jsonl.load(p, key=_id).by_key(_id)["a"]["text"] == "again"  # the last record per key wins


def test_torn_tail_is_cut_when_repairing_and_skipped_read_only(tmp_path):
    p = tmp_path / "o.jsonl"
    whole = '{"id": "1"}\n{"id": "2"}\n'
    for torn in ('{"id": "3", "te', '{"id": "3"}', '{"id": "3", "te\n', '{"id": "\xff"}\n'):
        p.write_bytes(whole.encode() + torn.encode("latin-1"))
        ro = jsonl.load(p)
        assert [r["id"] for r in ro.records] == ["1", "2"] and ro.torn == len(torn.encode("latin-1"))
        assert p.read_bytes() == whole.encode() + torn.encode("latin-1")  # read-only: untouched
        rw = jsonl.load(p, repair=True, key=_id)
        assert list(rw.by_key(_id)) == ["1", "2"] and rw.end == len(whole)
        assert p.read_text() == whole
    # the appender never glues a record onto a torn tail either
    p.write_text(whole + '{"id": "3", "te')
    with jsonl.Appender(p) as app:
        assert app.kept == 2
        app.write({"id": "3"})
    assert [r["id"] for r in jsonl.load(p).records] == ["1", "2", "3"]


def test_bad_lines_before_the_end_are_errors_and_nothing_is_cut(tmp_path):
    p = tmp_path / "o.jsonl"
    for text, msg in (('{"id": "1"}\n{oops\n{"id": "2"}\n', r"o.jsonl:2: not valid JSON"),
                      ('{"id": "1"}\n\xff\n{"id": "2"}\n', r"o.jsonl:2: not UTF-8"),
                      ('{"id": "1"}\n[1, 2]\n', "o.jsonl:2: not a JSON object"),
                      ('{"id": "1"}\n{"other": 1}\n{"id": "2"}\n', "o.jsonl:2: not a record of this file")):
        p.write_bytes(text.encode("latin-1"))
        for repair in (False, True):
            with pytest.raises(UsageError, match=msg):
                jsonl.load(p, repair=repair, key=_id)
            assert p.read_bytes() == text.encode("latin-1")
    p.write_text('{"id": "1"}\n\n  \n{"id": "2"}\n')  # blank lines are skipped
    assert len(jsonl.load(p, repair=True, key=_id).records) == 2


def test_header_record_is_kept_apart(tmp_path):
    p = tmp_path / "o.jsonl"
    head = {"input_sha256": "ab12", "settings": {"variant": "base"}}
    with jsonl.Appender(p, header=head) as app:
        app.write({"id": "1"})
    with jsonl.Appender(p, header=head) as app:  # not written twice
        assert app.kept == 1
        app.write({"id": "2"})
    got = jsonl.load(p, key=_id)
    assert got.header == head and [r["id"] for r in got.records] == ["1", "2"]
    jsonl.write_records(p, got.records[::-1], header=got.header)
    assert jsonl.load(p).header == head and [r["id"] for r in jsonl.load(p).records] == ["2", "1"]


def test_a_failed_write_is_one_typed_error_and_leaves_only_whole_records(tmp_path, monkeypatch):
    p = tmp_path / "o.jsonl"
    app = jsonl.Appender(p)
    app.write({"id": "1"})
    app.write({"id": "2"})
    real_write = os.write

    def half_then_enospc(fd, data):  # the disk fills in the middle of the line
        if len(data) > 4:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(jsonl.os, "write", half_then_enospc)
    with pytest.raises(OutputError) as ei:
        app.write({"id": "3", "text": "a long enough line"})
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and "No space left on device" in msg
    assert "keeps 2 whole records" in msg and "free space and rerun the same command to resume" in msg
    assert OutputError.exit_code == 2 and not isinstance(ei.value, UsageError)
    assert p.read_text() == '{"id": "1"}\n{"id": "2"}\n'  # the half line was cut off
    with pytest.raises(OutputError):  # closed after the error
        app.write({"id": "4"})
    monkeypatch.setattr(jsonl.os, "write", real_write)

    def eio(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(jsonl.os, "fsync", eio)  # a whole line that cannot be made durable is not kept either
    app = jsonl.Appender(p)
    with pytest.raises(OutputError, match=r"Input/output error; it keeps 2 whole records: fix that and rerun"):
        app.write({"id": "3"})
    assert p.read_text() == '{"id": "1"}\n{"id": "2"}\n'


def test_ctrl_c_cuts_a_half_written_line_and_keeps_a_whole_one(tmp_path, monkeypatch):
    """Ctrl-C between two partial writes leaves no torn line; Ctrl-C while a whole line is being fsynced keeps it
    (a finished record: the bench harm Ctrl-C test once saw it in the file, then lost it)."""
    p = tmp_path / "o.jsonl"
    app = jsonl.Appender(p)
    app.write({"id": "1"})
    real_write, real_fsync = os.write, os.fsync

    def half_then_ctrl_c(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise KeyboardInterrupt

    monkeypatch.setattr(jsonl.os, "write", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        app.write({"id": "2", "text": "a long enough line"})
    assert p.read_text() == '{"id": "1"}\n'
    monkeypatch.setattr(jsonl.os, "write", real_write)

    def ctrl_c(fd):
        real_fsync(fd)
        raise KeyboardInterrupt

    app = jsonl.Appender(p)
    monkeypatch.setattr(jsonl.os, "fsync", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        app.write({"id": "2"})
    assert p.read_text() == '{"id": "1"}\n{"id": "2"}\n' and app.kept == 2


def test_atomic_rewrite_failure_leaves_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "o.jsonl"
    p.write_text('{"id": "1"}\n')

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "write", enospc)
    with pytest.raises(OutputError, match="No space left on device; the previous file is untouched"):
        jsonl.write_records(p, [{"id": "2"}])
    assert p.read_text() == '{"id": "1"}\n' and sorted(x.name for x in tmp_path.iterdir()) == ["o.jsonl"]


def test_a_real_full_disk(tmp_path):
    with tiny_disk(tmp_path / "disk", "4k") as disk:
        p = disk / "o.jsonl"
        app = jsonl.Appender(p)
        n = 0
        with pytest.raises(OutputError, match="No space left on device") as ei:
            for n in range(1000):
                app.write({"id": str(n), "text": "x" * 100})
        assert f"keeps {n} whole records" in str(ei.value)
        data = p.read_bytes()
        assert data.endswith(b"\n") and [json.loads(x)["id"] for x in data.splitlines()] == [str(i) for i in range(n)]
        grow(disk, "64k")
        with jsonl.Appender(p) as app:
            assert app.kept == n
            app.write({"id": str(n), "text": "x" * 100})
        assert len(jsonl.load(p, repair=True, key=_id).records) == n + 1
