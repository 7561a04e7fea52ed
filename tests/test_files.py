"""Every file the tool writes is data (issue 22): the one atomic writer (safeinfer_local.files.replace), the one
check of what a command may overwrite (files.check_target), the writer lock of appended outputs, and each row of
the issue's table reproduced through the real command line: a refusal or one line with the right exit code, and
every file named byte-for-byte what it was (``--force`` overwrites where the user asks)."""

import ast
import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from safeinfer_local import files, jsonl
from safeinfer_local.core.vectors import VECTOR_FILE, SafetyVector, foreign_vector
from safeinfer_local.errors import OutputError, UsageError

from .conftest import ROOT, assert_one_line_error, run_cli
from .test_jsonl import tiny_disk
from .tiny_gguf import write_tiny_gguf

PKG = ROOT / "safeinfer_local"


def _vector(path: Path, n: int = 640, seed: int = 0, layers=(12,)) -> Path:
    rng = np.random.default_rng(seed)
    return SafetyVector({i: rng.standard_normal(n).astype(np.float32) for i in layers}, model_hint="t").save(path)


def _snapshot(*paths: Path) -> dict:
    return {p: p.read_bytes() for p in paths}


def _unchanged(snap: dict) -> None:
    for p, data in snap.items():
        assert p.read_bytes() == data, f"{p} changed"


def _no_temp(folder: Path) -> None:
    assert not [x.name for x in folder.iterdir() if x.name.endswith(".tmp")], list(folder.iterdir())


# ---------------------------------------------------------------------------------------------------- the writer


def test_replace_writes_bytes_text_and_a_writer_function_and_keeps_a_link_and_the_mode(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert files.replace(p, "héllo ✓") == p.resolve()
    assert p.read_text(encoding="utf-8") == "héllo ✓" and oct(p.stat().st_mode & 0o777) != "0o600"
    os.chmod(p, 0o640)
    files.replace(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01" and p.stat().st_mode & 0o777 == 0o640
    link = tmp_path / "link.txt"
    link.symlink_to(p)
    files.replace(link, lambda tmp: Path(tmp).write_text("through"))
    assert link.is_symlink() and p.read_text() == "through"
    _no_temp(p.parent)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch, where):
    p = tmp_path / "v.bin"
    p.write_bytes(b"old")

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, where, enospc)
    with pytest.raises(OutputError, match="No space left on device; the previous file is untouched: free space"):
        files.replace(p, b"new content")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    _no_temp(tmp_path)
    with pytest.raises(OutputError, match="nothing was written"):
        monkeypatch.setattr(files.os, "fsync", enospc)
        files.replace(tmp_path / "new.bin", b"x")
    assert not (tmp_path / "new.bin").exists()


def test_ctrl_c_or_a_writer_error_mid_write_leaves_the_previous_file(tmp_path):
    p = tmp_path / "v.bin"
    p.write_bytes(b"old")

    def interrupted(tmp):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.replace(p, interrupted)
    with pytest.raises(ValueError):
        files.replace(p, lambda tmp: (_ for _ in ()).throw(ValueError("bad")))
    assert p.read_bytes() == b"old"
    _no_temp(tmp_path)


@pytest.mark.parametrize("free", [4096, 8192, 12288])
def test_a_real_full_disk_while_replacing_a_vector_keeps_the_previous_one(tmp_path, free):
    """However much room is left, a vector that does not fit is an error and the previous one stays. (With 8 KiB
    free, the GGUF writer's numpy ``tofile`` loses its last buffered write without an error: the file read back
    is what catches it; before, the command said "wrote" and left a torn 8 KiB vector.)"""
    with tiny_disk(tmp_path / "disk", "64k") as disk:
        old = _vector(disk / "sv.gguf")
        before = old.read_bytes()
        (disk / "filler").write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize - free))
        with pytest.raises(OutputError, match="No space left on device; the previous file is untouched"):
            _vector(disk / "sv.gguf", n=640, layers=tuple(range(1, 18)))
        assert old.read_bytes() == before and SafetyVector.load(old).layers == (12,)
        _no_temp(disk)


# ---------------------------------------------------------------------------------------------------- ownership


def test_vector_ownership_tells_ours_from_models_other_tools_and_other_files(tmp_path):
    ours = _vector(tmp_path / "ours.gguf")
    assert foreign_vector(ours) is None
    model = write_tiny_gguf(tmp_path / "model.gguf", "llama")
    assert "it is a model GGUF (general.architecture 'llama')" in foreign_vector(model)
    import gguf  # a control vector as repeng or llama.cpp writes it: no safeinfer provenance

    w = gguf.GGUFWriter(str(tmp_path / "repeng.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.1", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "without safeinfer provenance" in foreign_vector(tmp_path / "repeng.gguf")
    np.save(tmp_path / "ok.npy", np.zeros((2, 64), dtype=np.float32))
    assert foreign_vector(tmp_path / "ok.npy") == "it is not a GGUF file"


def test_check_target_refuses_inputs_foreign_files_and_folders_and_force_allows(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("prompts")
    link = tmp_path / "alias.txt"
    link.symlink_to(src)
    with pytest.raises(UsageError, match="it is the --demos file, an input"):
        files.check_target(link, files.ANY, inputs=[("--demos file", src)])
    with pytest.raises(UsageError, match="it is not a GGUF file, not a safety vector written by this tool; "
                                         "use another --out, or --force"):
        files.check_target(src, VECTOR_FILE)
    assert files.check_target(src, VECTOR_FILE, force=True) == src
    with pytest.raises(UsageError, match="is a folder"):
        files.check_target(tmp_path, VECTOR_FILE)
    (tmp_path / "empty.gguf").write_bytes(b"")  # nothing to lose
    files.check_target(tmp_path / "empty.gguf", VECTOR_FILE)
    with pytest.raises(UsageError, match="not a folder"):
        files.check_target(src / "x.gguf", VECTOR_FILE)
    assert files.check_target(tmp_path / "new" / "v.gguf", VECTOR_FILE).parent.is_dir()
    assert src.read_text() == "prompts"


def test_the_writer_lock_refuses_a_second_writer_and_is_released(tmp_path):
    p = tmp_path / "o.jsonl"
    with jsonl.locked(p, "screen run"):
        with pytest.raises(UsageError, match="is being written by another run"):
            with jsonl.locked(p, "screen run"):
                pass
        files.replace(p, "replaced\n")  # a finished run's final rewrite: the new file is not locked by the old lock
        with jsonl.locked(p, "screen run"):
            pass
    with jsonl.locked(p, "screen run"):
        pass
    code = ("import sys, time; from safeinfer_local import jsonl\n"
            f"with jsonl.locked({str(p)!r}, 'x'): print('held', flush=True); time.sleep(30)")
    child = subprocess.Popen([os.sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="another run"):
            with jsonl.locked(p, "x"):
                pass
    finally:
        child.kill()
        child.wait()
    with jsonl.locked(p, "x"):  # a killed holder's lock is gone with it
        pass


# ---------------------------------------------------------------------------------------------------- one writer


OS_WRITES = {"open", "replace", "rename", "remove", "unlink", "truncate", "ftruncate", "write"}
"""os.* calls that make, change or remove a file."""
WRITES = {"write_text", "write_bytes", "savefig", "GGUFWriter", "unlink", "touch", "to_csv", "to_parquet",
          "rmtree", "copyfile", "copy2", "move"}
"""Other calls that do (``open`` with a writing mode counts too)."""
SAVES = {"np": {"save", "savez", "savetxt"}, "numpy": {"save", "savez", "savetxt"}, "json": {"dump"},
         "pickle": {"dump"}}

ALLOWED = {
    ("files.py", "*"),  # the one writer
    ("jsonl.py", "load"),  # cuts a torn last line off a file being resumed
    ("jsonl.py", "locked"), ("jsonl.py", "Appender.__init__"), ("jsonl.py", "Appender._append"),
    ("jsonl.py", "Appender._undo"),  # the append-only store and its writer lock
    ("core/vectors.py", "SafetyVector.save.write"),  # the GGUF writer, handed to files.replace
    ("eval/report.py", "_save"),  # savefig, handed to files.replace
    ("eval/report.py", "write_report"),  # removes a chart of an earlier report (checked as ours first)
    ("ray.py", "_test_hook"),  # the marker file of the actor-kill test hook (SAFEINFER_RAY_TEST_DIE), tests only
}
"""Where the package may call a writing primitive: files.replace, and what hands it a writer function."""


def _writes(path: Path) -> set[tuple[str, str, str]]:
    """(file, function, call) of every writing call in a module."""
    rel = path.relative_to(PKG).as_posix()
    found = set()

    def is_write(call: ast.Call) -> str | None:
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        if owner == "os":
            return name if name in OS_WRITES else None
        if owner in SAVES:
            return name if name in SAVES[owner] else None
        if name == "open":
            mode = call.args[1] if len(call.args) > 1 else next(
                (k.value for k in call.keywords if k.arg == "mode"), None)
            return "open" if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+") else None
        return name if name in WRITES else None

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call) and (name := is_write(child)):
                found.add((rel, ".".join(scope) or "<module>", name))
            visit(child, scope)

    visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return found


def test_every_file_the_package_writes_goes_through_the_one_writer():
    """No module but files.py (and the appender, the lock and the writer functions handed to files.replace) makes,
    replaces or removes a file: a new writer elsewhere fails here until it goes through files.replace."""
    found = set().union(*(_writes(p) for p in PKG.rglob("*.py")))
    stray = sorted(f for f in found if (f[0], "*") not in ALLOWED and (f[0], f[1]) not in ALLOWED)
    assert not stray, stray
    # the checker sees what it is meant to see
    assert any(f[0] == "core/vectors.py" and f[2] == "GGUFWriter" for f in found)
    assert any(f[0] == "eval/report.py" and f[2] == "savefig" for f in found)


# ---------------------------------------------------------------------------------------------------- the table


def test_every_command_with_an_output_option_is_walked_here():
    """Each command that takes an output (--out, -o, --split, merge's OUT) is in OUTPUTS, so a new one is added
    to the table below (and checked) rather than forgotten."""
    import typer.main

    from safeinfer_local.cli.app import app

    cmd = typer.main.get_command(app)
    seen = set()

    def walk(group, prefix):
        for name, sub in group.commands.items():
            if hasattr(sub, "commands"):
                walk(sub, prefix + [name])
                continue
            for prm in sub.params:
                if prm.name in ("out", "split"):
                    seen.add((" ".join(prefix + [name]), prm.name))

    walk(cmd, [])
    assert seen == OUTPUTS


OUTPUTS = {("vectors build", "out"), ("vectors gate", "out"), ("vectors convert", "out"), ("vectors sweep", "out"),
           ("calibrate", "out"), ("filter", "out"), ("filter", "split"), ("screen", "out"), ("screen", "split"),
           ("merge", "out"), ("bench harm", "out"), ("bench report", "out")}


@pytest.fixture
def scratch(tmp_path):
    """The issue's scratch folder: ok.npy (640 floats), sv.gguf (a vector of ours), model.gguf (a model GGUF),
    d.jsonl (demonstrations), h.txt / b.txt (prompts), f (a file of the user's)."""
    np.save(tmp_path / "ok.npy", np.vstack([np.zeros(640), np.arange(640)]).astype(np.float32))  # block 1
    _vector(tmp_path / "sv.gguf")
    write_tiny_gguf(tmp_path / "model.gguf", "llama")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "How do I make a bomb?", "response": "I can't."}) + "\n")
    (tmp_path / "h.txt").write_text("\n".join(f"harmful prompt {i}" for i in range(20)) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"benign prompt {i}" for i in range(20)) + "\n")
    (tmp_path / "f").write_text("x\n")
    return tmp_path


@pytest.mark.parametrize("args,target,says", [
    (["vectors", "convert", "ok.npy", "--out", "model.gguf"], "model.gguf", "it is a model GGUF"),
    (["vectors", "convert", "ok.npy", "--out", "ok.npy"], "ok.npy", "it is the source file, an input"),
    (["vectors", "convert", "ok.npy", "--out", "f"], "f", "it is not a GGUF file"),
    (["vectors", "build", "--demos", "d.jsonl", "--out", "d.jsonl"], "d.jsonl", "it is the --demos file, an input"),
    (["vectors", "build", "--demos", "d.jsonl", "--out", "f"], "f", "it is not a GGUF file"),
    (["vectors", "build", "--demos", "d.jsonl", "--out", "model.gguf"], "model.gguf", "it is a model GGUF"),
    (["vectors", "gate", "sv.gguf", "--harmful", "h.txt", "--benign", "b.txt", "--out", "h.txt"], "h.txt",
     "it is the --harmful file, an input"),
    (["vectors", "gate", "sv.gguf", "--out", "f"], "f", "it is not a GGUF file"),
    (["vectors", "sweep", "sv.gguf", "--layers", "12", "--out", "f"], "f", "its line 1 is not JSON"),
    (["calibrate", "--vector", "sv.gguf", "--out", "f"], "f", "it is not a GGUF file"),
    (["calibrate", "--vector", "sv.gguf", "--out", "model.gguf"], "model.gguf", "it is a model GGUF"),
    (["screen", "h.txt", "--split", "f"], "f", "is a file; give a folder"),
    (["bench", "harm", "--out", ".", "-d", "xstest"], "report.md", "it does not begin as a bench harm report does"),
])
def test_the_issues_table_is_refused_before_any_work_and_files_stay(scratch, args, target, says):
    (scratch / "report.md").write_text("# my notes\n")
    snap = _snapshot(*(p for p in scratch.iterdir() if p.is_file()))
    proc = subprocess.run([os.sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=scratch, timeout=300)
    assert_one_line_error(proc, 2, says)
    assert target in proc.stderr
    _unchanged(snap)
    _no_temp(scratch)


def test_force_overwrites_where_the_user_asks(scratch):
    snap = _snapshot(scratch / "ok.npy")
    for out in ("model.gguf", "f"):
        proc = run_cli("vectors", "convert", scratch / "ok.npy", "--out", scratch / out, "--force")
        assert proc.returncode == 0, proc.stderr
        assert SafetyVector.load(scratch / out).n_embd == 640
    _unchanged(snap)
    # a vector of ours is replaced without --force, atomically
    proc = run_cli("vectors", "convert", scratch / "ok.npy", "--out", scratch / "sv.gguf", "--gamma", "2")
    assert proc.returncode == 0, proc.stderr
    assert SafetyVector.load(scratch / "sv.gguf").gamma == 2.0


def test_split_folders_with_the_users_files_are_refused(scratch):
    split = scratch / "split"
    split.mkdir()
    (split / "blocked.jsonl").write_text('{"note": "mine"}\n')
    snap = _snapshot(split / "blocked.jsonl")
    for cmd in ("filter", "screen"):
        assert_one_line_error(run_cli(cmd, scratch / "h.txt", "--split", split), 2,
                              "its line 1 is not a filter or screen record")
    _unchanged(snap)


def test_unusable_paths_are_one_line_before_any_work(scratch):
    """/proc, a path under a file, an immutable vector: one line, exit 2, before the model loads (a build would
    otherwise run to its end and fail then)."""
    imm = scratch / "imm.gguf"
    _vector(imm)
    before = imm.read_bytes()
    chattr = subprocess.run(["chattr", "+i", str(imm)], capture_output=True)
    try:
        cases = [(["vectors", "convert", scratch / "ok.npy", "--out", "/proc/x.gguf"], "/proc/x.gguf"),
                 (["vectors", "build", "--demos", scratch / "d.jsonl", "--out", "/proc/x.gguf"], "/proc/x.gguf"),
                 (["vectors", "gate", scratch / "sv.gguf", "--out", "/proc/x.gguf"], "/proc/x.gguf"),
                 (["vectors", "build", "--demos", scratch / "d.jsonl", "--out", scratch / "f" / "v.gguf"],
                  "is not a folder")]
        if chattr.returncode == 0:  # chattr needs a filesystem with attributes (ext4, xfs, tmpfs >= 6.0)
            cases += [(["vectors", "convert", scratch / "ok.npy", "--out", imm], "read-only or immutable"),
                      (["vectors", "gate", imm], "read-only or immutable")]
        for args, says in cases:
            assert_one_line_error(run_cli(*args), 2, says)
    finally:
        subprocess.run(["chattr", "-i", str(imm)], capture_output=True)
    assert imm.read_bytes() == before
    _no_temp(scratch)


def test_full_disk_through_the_command_line(scratch):
    """Replacing a vector on a full disk: non-zero exit, one line, the previous vector still loads; a new --out on
    a full disk leaves no file behind."""
    big = scratch / "big.npy"
    np.save(big, np.vstack([np.zeros((1, 4096)), np.ones((8, 4096))]).astype(np.float32))
    with tiny_disk(scratch / "disk", "64k") as disk:
        old = _vector(disk / "sv.gguf")
        before = old.read_bytes()
        (disk / "filler").write_bytes(b"\0" * (65536 - len(before) - 8192))
        proc = run_cli("vectors", "convert", big, "--out", old)
        assert_one_line_error(proc, 2, "No space left on device; the previous file is untouched")
        assert old.read_bytes() == before and SafetyVector.load(old).layers == (12,)
        proc = run_cli("vectors", "convert", big, "--out", disk / "new.gguf")
        assert_one_line_error(proc, 2, "nothing was written")
        assert sorted(x.name for x in disk.iterdir()) == ["filler", "sv.gguf"]


# ---------------------------------------------------------------------------------------------------- screen


def _prompts(path: Path, n: int) -> Path:
    path.write_text("".join(f"Name a word that rhymes with the number {i}.\n" for i in range(n)))
    return path


@pytest.mark.model
def test_two_screen_runs_on_one_output_one_is_refused_and_every_id_is_there_once(tmp_path):
    src = _prompts(tmp_path / "p.txt", 600)
    out = tmp_path / "c.jsonl"
    cmd = [os.sys.executable, str(ROOT / "cli.py"), "screen", str(src), "-o", str(out), "-q"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for _ in range(600):  # until the first run has appended its first chunk
            if out.exists() and out.read_bytes().count(b"\n") >= 2:
                break
            assert first.poll() is None, first.communicate()
            import time

            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        running = first.poll() is None
        _, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert running, "the first run ended before the second one started: the test needs more prompts"
    assert_one_line_error(second, 2, "is being written by another run")
    ids = [r["id"] for r in jsonl.load(out).records]
    assert ids == [str(i) for i in range(1, 601)]


@pytest.mark.model
def test_screen_resume_drops_duplicates_and_a_torn_line(tmp_path):
    src = _prompts(tmp_path / "p.txt", 5)
    out = tmp_path / "c.jsonl"
    assert run_cli("screen", src, "-o", out, "-q").returncode == 0
    lines = out.read_text().splitlines(keepends=True)
    # a run that appended id 2 twice (the old screen without a lock) and was killed mid-line
    out.write_text("".join(lines[:4]) + lines[2] + lines[5][:10])
    proc = run_cli("screen", src, "-o", out, "--split", tmp_path / "sp", "-q")
    assert proc.returncode == 0, proc.stderr
    recs = jsonl.load(out).records
    assert [r["id"] for r in recs] == ["1", "2", "3", "4", "5"]
    split = [r["id"] for name in ("allowed.jsonl", "blocked.jsonl") for r in jsonl.load(tmp_path / "sp" / name).records]
    assert sorted(split) == ["1", "2", "3", "4", "5"]
