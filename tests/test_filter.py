"""safeinfer filter / merge: inputs, verdict records, resume after kill -9, shards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from safeinfer_local import jsonl
from safeinfer_local.errors import UsageError
from safeinfer_local.workflows import filter as flt
from safeinfer_local.workflows import inputs, runs

from .conftest import ROOT, assert_one_line_error, run_cli


def test_read_formats(tmp_path):
    j = tmp_path / "a.jsonl"
    j.write_text('{"id": "x1", "prompt": "hi"}\n{bad json\n{"prompt": "yo"}\n{"text": "no field"}\n')
    items = inputs.read_items(str(j))
    assert [(i.id, i.prompt) for i in items[:1]] == [("x1", "hi")]
    assert items[1].error.startswith("line 2: not valid JSON") and items[2].id == "3"
    assert "no field 'prompt'" in items[3].error
    c = tmp_path / "a.csv"
    c.write_text("id,question\nq1,What?\nq2,\n")
    items = inputs.read_items(str(c), field="question")
    assert items[0].prompt == "What?" and items[1].error == "line 3: empty 'question'"
    t = tmp_path / "a.txt"
    t.write_text("one\n\ntwo\n")
    assert [(i.id, i.prompt) for i in inputs.read_items(str(t))] == [("1", "one"), ("3", "two")]


def test_stdin_is_json_lines_when_every_line_is_an_object(monkeypatch):
    """`filter -` / `screen -`: JSON Lines when every non-empty line is a JSON object, else text lines; --format
    still decides."""
    def items(text, fmt=None):
        monkeypatch.setattr(inputs, "read_stdin", lambda: text)
        return [(i.id, i.prompt) for i in inputs.read_items("-", fmt)]

    objs = '{"id": "a", "prompt": "one"}\n\n{"id": "b", "prompt": "two"}\n'
    assert items(objs) == [("a", "one"), ("b", "two")]
    assert items(objs, "txt") == [("1", '{"id": "a", "prompt": "one"}'), ("3", '{"id": "b", "prompt": "two"}')]
    assert items('{"id": "a", "prompt": "one"}\nplain text\n') == [("1", '{"id": "a", "prompt": "one"}'),
                                                                  ("2", "plain text")]
    assert items('["a list"]\n{not json}\n') == [("1", '["a list"]'), ("2", "{not json}")]


def test_bad_inputs(tmp_path):
    e = tmp_path / "e.txt"
    e.write_text("")
    with pytest.raises(UsageError, match="empty"):
        inputs.read_items(str(e))
    c = tmp_path / "a.csv"
    c.write_text("id,question\n1,hi\n")
    with pytest.raises(UsageError, match="no column 'prompt'"):
        inputs.read_items(str(c))
    j = tmp_path / "a.jsonl"
    j.write_text('{"q": "hi"}\n')
    with pytest.raises(UsageError, match="no line has the field"):
        inputs.read_items(str(j))
    with pytest.raises(UsageError, match="format"):
        inputs.read_items(str(tmp_path / "a.xyz"))
    with pytest.raises(UsageError, match="not found"):
        inputs.read_items(str(tmp_path / "missing.txt"))


def test_torn_last_line_is_cut_and_redone(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "1", "verdict": "answered"}\n{"id": "2", "verd')
    done = runs.load_done(out)
    assert set(done) == {"1"}
    assert out.read_text() == '{"id": "1", "verdict": "answered"}\n'


def test_shards_partition_and_merge(tmp_path):
    ids = [str(i) for i in range(200)]
    parts = [[x for x in ids if inputs.in_shard(x, (i, 3))] for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == sorted(ids) and all(len(p) > 40 for p in parts)
    assert parts[0] == [x for x in ids if inputs.in_shard(x, (1, 3))]  # deterministic
    files = []
    for k, part in enumerate(parts):
        f = tmp_path / f"s{k}.jsonl"
        head = json.dumps({"_header": {"kind": flt.KIND, "input_sha256": "x", "shard": f"{k + 1}/3"}}) + "\n"
        f.write_text(head + "".join(json.dumps({"id": x, "index": int(x), "verdict": "answered"}) + "\n"
                                    for x in part))
        files.append(f)
    out = tmp_path / "m.jsonl"
    assert flt.merge(out, files) == 200
    assert [r["id"] for r in _records(out)] == ids
    assert _header(out)["shard"] is None and _header(out)["input_sha256"] == "x"
    with pytest.raises(UsageError, match="more than one shard"):
        flt.merge(out, files + [files[0]])
    with pytest.raises(UsageError, match="gap"):
        flt.merge(out, files[1:])
    with pytest.raises(UsageError, match="I/N"):
        inputs.parse_shard("1-3")


def _records(path):
    """The records of a filter output (its first line is the header)."""
    return jsonl.load(path).records


def _header(path):
    return jsonl.load(path).header


def _prompts(tmp_path, n):
    f = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": f"Q: What is {i} plus {i}?\nA:"}) for i in range(n)]
    lines.insert(2, "{not json")
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.model
def test_filter_records_split_and_errors(tmp_path):
    f = _prompts(tmp_path, 3)
    out = tmp_path / "out.jsonl"
    p = run_cli("filter", f, "-o", out, "--raw", "-n", "4", "--variant", "base", "--split", tmp_path / "sp")
    assert p.returncode == 0, p.stderr
    recs = _records(out)
    assert [r["id"] for r in recs] == ["p0", "p1", "3", "p2"]
    bad = recs[2]
    assert bad["verdict"] == "error" and "line 3" in bad["error"]
    for r in recs[:2] + recs[3:]:
        assert r["verdict"] in ("answered", "refused") and r["n_tokens"] >= 1 and r["variant"] == "base"
        assert set(r) >= {"id", "prompt", "response", "verdict", "error", "n_tokens", "tokens_per_s",
                          "guided_tokens"}
    allowed = (tmp_path / "sp" / "allowed.jsonl").read_text().splitlines()
    blocked = (tmp_path / "sp" / "blocked.jsonl").read_text().splitlines()
    assert len(allowed) + len(blocked) == 3


@pytest.mark.model
def test_kill_9_then_resume_gives_one_record_per_id(tmp_path):
    f = _prompts(tmp_path, 10)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(ROOT / "cli.py"), "filter", str(f), "-o", str(out), "--raw", "-n", "24", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 180
        while time.time() < end:
            if out.exists() and len(out.read_bytes().splitlines()) >= 4:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    n_before = len(_records(out))
    assert 3 <= n_before < 11
    with open(out, "a") as fh:  # as if the kill had torn a line mid-write
        fh.write('{"id": "p9", "respo')
    p = run_cli("filter", f, "-o", out, "--raw", "-n", "24")
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr
    ids = [r["id"] for r in _records(out)]
    assert ids == ["p0", "p1", "3"] + [f"p{i}" for i in range(2, 10)]


@pytest.mark.model
def test_filter_bad_arguments(tmp_path):
    f = _prompts(tmp_path, 1)
    locked = tmp_path / "ro"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
        bad_out = tmp_path / "in.jsonl" / "out.jsonl"
    else:
        bad_out = locked / "out.jsonl"
    assert_one_line_error(run_cli("filter", f, "-o", bad_out, "--raw"))
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert_one_line_error(run_cli("filter", empty), contains="empty")
    assert_one_line_error(run_cli("filter", f, "--field", "question"), contains="field")
    assert_one_line_error(run_cli("filter", f, "--shard", "5/2"), contains="shard")


@pytest.mark.model
def test_parallel_slots_refill_and_keep_input_order(tmp_path):
    """--parallel 3 over 7 prompts (so slots are refilled), with one bad line: one record per id, in input
    order, and greedy replies equal to --parallel 1 on this short run."""
    f = _prompts(tmp_path, 6)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pa = run_cli("filter", f, "-o", a, "--raw", "-n", "6", "--variant", "base", "-p", "3", "-q")
    pb = run_cli("filter", f, "-o", b, "--raw", "-n", "6", "--variant", "base", "-p", "1", "-q")
    assert pa.returncode == pb.returncode == 0, (pa.stderr, pb.stderr)
    ra = _records(a)
    rb = _records(b)
    assert [r["id"] for r in ra] == [r["id"] for r in rb] == ["p0", "p1", "3", "p2", "p3", "p4", "p5"]
    ok = [r for r in ra if r["verdict"] != "error"]
    assert len(ok) == 6 and all(r["n_tokens"] >= 1 for r in ok)
    same = sum(x["response"] == y["response"] for x, y in zip(ra, rb, strict=True))
    assert same >= 5  # llama.cpp is not batch invariant: a near-tie may flip in a batch of three


@pytest.mark.model
def test_judge_model_labels_every_reply(tmp_path, model):
    """Any GGUF runs as judge through the same engine (here the base model itself, which is no classifier, so
    its labels are mostly 'unknown'); 'unsafe' would move a reply to blocked.jsonl."""
    f = _prompts(tmp_path, 2)
    out = tmp_path / "o.jsonl"
    p = run_cli("filter", f, "-o", out, "--raw", "-n", "4", "--variant", "base", "--judge-model", model.path,
                "--split", tmp_path / "sp", "-q")
    assert p.returncode == 0, p.stderr
    recs = _records(out)
    assert all(r["judge"] in ("safe", "unsafe", "unknown") for r in recs if r["verdict"] != "error")
    assert_one_line_error(run_cli("filter", f, "--judge-model", tmp_path / "nope.gguf"), contains="not found")
    runs.write_split([{"verdict": "answered", "judge": "unsafe", "id": "a"},
                     {"verdict": "answered", "judge": "safe", "id": "b"}], tmp_path / "s2", flt.filter_blocked)
    assert '"a"' in (tmp_path / "s2" / "blocked.jsonl").read_text()
    assert '"b"' in (tmp_path / "s2" / "allowed.jsonl").read_text()


@pytest.mark.model
def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path):
    f = _prompts(tmp_path, 10)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, str(ROOT / "cli.py"), "filter", str(f), "-o", str(out), "--raw", "-n", "24", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 180
    while time.time() < end and not (out.exists() and len(out.read_bytes().splitlines()) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["_header"]["kind"] == flt.KIND
    assert all(json.loads(x)["id"] for x in lines[1:])  # every written line is whole


@pytest.mark.model
def test_full_disk_is_one_line_and_the_same_command_resumes(tmp_path):
    from .test_jsonl import grow, tiny_disk

    f = tmp_path / "in.txt"
    f.write_text("".join(f"What is {i} plus {i}?\n" for i in range(30)))
    with tiny_disk(tmp_path / "disk", "4k") as disk:  # room for about 20 records
        out = disk / "out.jsonl"
        args = ["filter", f, "-o", out, "--variant", "base", "--max-tokens", "4", "--temperature", "0", "-q"]
        line = assert_one_line_error(run_cli(*args), 2, "no space left on device")
        lines = out.read_text().splitlines(keepends=True)[1:]  # after the header
        assert all(x.endswith("\n") and json.loads(x)["id"] for x in lines)  # no torn line left behind
        assert 0 < len(lines) < 30 and str(out) in line
        assert f"keeps {len(lines)} whole records" in line and "free space and rerun the same command" in line
        grow(disk, "1m")
        p = run_cli(*args)
        assert p.returncode == 0, p.stderr
        ids = [r["id"] for r in _records(out)]
        assert ids == [str(n) for n in range(1, 31)]  # exactly one record per id, in input order
