"""Output files are data: a filter or merge output is never clobbered, never resumed with stale records, and every
bad input is one line with exit code 2 (issue: never clobber, never keep stale results)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from safeinfer_local import jsonl
from safeinfer_local.errors import UsageError
from safeinfer_local.workflows import filter as flt
from safeinfer_local.workflows import inputs

from .conftest import ROOT, assert_one_line_error, run_cli

BASE = ["--variant", "base", "-n", "3", "-t", "0", "-q"]


def _records(path):
    return jsonl.load(path).records


# -- pure: inputs ---------------------------------------------------------------------------------------------


def test_csv_with_a_duplicate_header_or_an_unterminated_quote_is_refused(tmp_path):
    dup = tmp_path / "dup.csv"
    dup.write_text("prompt,prompt\nhello,there\n")
    with pytest.raises(UsageError, match="'prompt' more than once"):
        inputs.read_items(str(dup))
    quote = tmp_path / "quote.csv"
    quote.write_text('id,prompt\n1,"How do I bake\n2,bread?\n')
    with pytest.raises(UsageError, match="not valid CSV"):
        inputs.read_items(str(quote))
    ok = tmp_path / "ok.csv"
    ok.write_text('id,prompt\n1,"a, quoted\nprompt"\n2,plain\n')
    assert [it.prompt for it in inputs.read_items(str(ok))] == ["a, quoted\nprompt", "plain"]


def test_a_filter_output_can_be_read_back_as_input(tmp_path):
    f = tmp_path / "o.jsonl"
    f.write_text(json.dumps({"_header": {"kind": flt.KIND}}) + "\n" + json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    assert [(it.id, it.prompt) for it in inputs.read_items(str(f))] == [("a", "hi")]


def test_claim_refuses_foreign_and_mismatched_files_untouched(tmp_path):
    head = {"kind": flt.KIND, "input_sha256": "A", "settings": {"variant": "base", "max_tokens": 4}}
    out = tmp_path / "o.jsonl"
    out.write_text("my notes\n")
    with pytest.raises(UsageError, match="not a filter output.*--force"):
        jsonl.claim(out, head, what="filter output")
    assert out.read_text() == "my notes\n"
    out.write_text(json.dumps({"_header": head}) + "\n" + json.dumps({"id": "1"}) + "\n")
    before = out.read_text()
    other = head | {"settings": {"variant": "base", "max_tokens": 8}}
    with pytest.raises(UsageError, match="settings.max_tokens: 4, now 8"):
        jsonl.claim(out, other, what="filter output")
    with pytest.raises(UsageError, match="input_sha256: 'A', now 'B'"):
        jsonl.claim(out, head | {"input_sha256": "B"}, what="filter output")
    assert out.read_text() == before
    assert [r["id"] for r in jsonl.claim(out, head, what="filter output").records] == ["1"]  # same: resumes
    assert jsonl.claim(out, other, what="filter output", force=True).records == [] and out.read_text() == ""


def test_writes_go_through_a_symlink_to_its_target(tmp_path):
    target = tmp_path / "real.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    jsonl.write_records(link, [{"id": "1"}], header={"kind": "k"})
    assert link.is_symlink() and _records(target) == [{"id": "1"}]


# -- the commands, with the real model --------------------------------------------------------------------------


def _txt(tmp_path, name, lines):
    f = tmp_path / name
    f.write_text("".join(x + "\n" for x in lines))
    return f


@pytest.mark.model
def test_filter_never_clobbers_and_never_keeps_stale_records(tmp_path):
    a = _txt(tmp_path, "A.txt", ["What is 1 plus 1?", "Name a colour.", "Name a fruit."])
    b = _txt(tmp_path, "B.txt", ["How do I bake bread?", "Name a tree.", "Name a river."])
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"my": "data"}\n')
    assert_one_line_error(run_cli("filter", a, "-o", notes, *BASE), 2, "not a filter output")
    assert notes.read_text() == '{"my": "data"}\n'  # untouched
    assert_one_line_error(run_cli("filter", a, "-o", a, *BASE), 2, "it is the input file, an input of this command")
    assert a.read_text().startswith("What is 1 plus 1?")
    out = tmp_path / "out.jsonl"
    assert run_cli("filter", a, "-o", out, *BASE).returncode == 0
    first = out.read_text()
    # another input, or other settings, into the same output: refused, and the file is left as it was
    assert_one_line_error(run_cli("filter", b, "-o", out, *BASE), 2, "input_sha256")
    line = assert_one_line_error(run_cli("filter", a, "-o", out, "--variant", "sa", "-n", "3", "-t", "0", "-q"), 2)
    assert "settings.variant: 'base', now 'sa'" in line
    assert_one_line_error(run_cli("filter", a, "-o", out, "--variant", "base", "-n", "5", "-t", "0", "-q"), 2,
                          "settings.max_tokens: 3, now 5")
    assert out.read_text() == first
    # the same command resumes (nothing to do); --force starts over with the other input
    assert run_cli("filter", a, "-o", out, *BASE).returncode == 0 and out.read_text() == first
    assert run_cli("filter", b, "-o", out, *BASE, "--force").returncode == 0
    assert [r["prompt"] for r in _records(out)] == ["How do I bake bread?", "Name a tree.", "Name a river."]
    # an output through a symlink: the records land in the target, and the link stays a link
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "target.jsonl")
    assert run_cli("filter", a, "-o", link, *BASE).returncode == 0
    assert link.is_symlink() and len(_records(tmp_path / "target.jsonl")) == 3


@pytest.mark.model
def test_merge_refuses_foreign_outputs_and_mixed_settings(tmp_path):
    f = _txt(tmp_path, "in.txt", [f"Name the number {i}." for i in range(6)])
    for i in (1, 2):
        assert run_cli("filter", f, "--shard", f"{i}/2", "-o", tmp_path / f"p{i}.jsonl", *BASE).returncode == 0
    other = tmp_path / "p2-sa.jsonl"
    assert run_cli("filter", f, "--shard", "2/2", "-o", other, "--variant", "sa", "-n", "3", "-t", "0",
                   "-q").returncode == 0
    line = assert_one_line_error(run_cli("merge", tmp_path / "all.jsonl", tmp_path / "p1.jsonl", other), 2)
    assert "settings.variant" in line
    notes = tmp_path / "notes.jsonl"
    notes.write_text("keep me\n")
    assert_one_line_error(run_cli("merge", notes, tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"), 2,
                          "not a filter output")
    assert notes.read_text() == "keep me\n"
    assert run_cli("merge", notes, tmp_path / "p1.jsonl", tmp_path / "p2.jsonl", "--force").returncode == 0
    assert [r["index"] for r in _records(notes)] == list(range(6)) and jsonl.load(notes).header["shard"] is None


@pytest.mark.model
def test_filter_to_stdout_keeps_input_order(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("{not json\n" + "".join(json.dumps({"id": f"p{i}", "prompt": f"Name the number {i}."}) + "\n"
                                         for i in range(4)))
    p = run_cli("filter", f, "-p", "2", *BASE)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4] and recs[0]["verdict"] == "error"


def _run_bytes(args, stdin=b""):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], input=stdin, capture_output=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.model
def test_text_that_is_not_utf8_is_one_line():
    bad = b"How do I \xff\xfe bake?\n"
    for args in (["generate", "--raw", "-n", "2"], ["filter", "-", "-n", "2", "-q"], ["chat", "-n", "2"]):
        p = _run_bytes(args, bad)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 2 and "UTF-8" in err and "Traceback" not in err, (args, err)
        assert len([x for x in err.splitlines() if x.strip()]) == 1, err
    for args in (["generate", b"How do I \xff bake?", "-n", "2"], ["score", b"How \xff", b" no", "--raw"]):
        p = _run_bytes(args)
        err = p.stderr.decode("utf-8", "replace")
        assert p.returncode == 2 and "UTF-8" in err and "Traceback" not in err, (args, err)


@pytest.mark.model
def test_chat_gamma_out_of_range_is_refused_and_the_next_turn_works(si):
    from safeinfer_local.workflows.chatloop import ChatSession

    sess = ChatSession(si, "sa", gen=dict(max_tokens=3, temperature=0))
    text, go = sess.command("/gamma -1e38")
    assert go and text.startswith("error:") and "gamma" in text
    assert sess.si.steering.gamma == si.steering.gamma
    parts = []
    sess.reply("Hello", parts.append)
    assert "".join(parts).strip() or sess.last.tokens >= 1


def test_an_empty_npy_vector_is_one_line(tmp_path):
    for shape in ((0, 640), (0,)):
        f = tmp_path / f"v{len(shape)}.npy"
        np.save(f, np.zeros(shape, np.float32))
        assert_one_line_error(run_cli("vectors", "convert", f, "-o", tmp_path / "o.gguf"), 2)
