"""One meaning per option: --raw, --frame and --stop mean the same in every command that has them."""

import json

import pytest
import typer.main

from safeinfer_local.cli import app
from safeinfer_local.cli import options as o

from .conftest import assert_one_line_error, run_cli


def _commands():
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            yield f"{name} {sub_name}", sub
        if not getattr(cmd, "commands", None):
            yield name, cmd


def _opts(cmd) -> dict:
    return {opt: p for p in cmd.params for opt in getattr(p, "opts", [])}


def test_raw_and_frame_mean_the_same_everywhere():
    with_raw = {name: _opts(cmd) for name, cmd in _commands() if "--raw" in _opts(cmd)}
    assert {"generate", "score", "filter", "bench harm", "calibrate"} <= set(with_raw)
    for name, opts in with_raw.items():
        assert opts["--raw"].help == o.RawOpt.help, name
        assert "--frame" in opts and opts["--frame"].help == o.FrameOpt.help, name


def test_stop_is_on_every_generating_command():
    cmds = dict(_commands())
    for name in ("generate", "filter", "chat"):
        opts = _opts(cmds[name])
        assert "--stop" in opts and opts["--stop"].help == o.StopOpt.help and opts["--stop"].multiple, name


def test_shared_options_have_one_definition():
    # every command's --variant, --lam, --guidance, --n-ctx, --threads is the shared one
    for name, cmd in _commands():
        opts = _opts(cmd)
        for flag, shared in (("--variant", o.VariantOpt), ("--lam", o.LamOpt), ("--guidance", o.GuidanceOpt),
                             ("--threads", o.ThreadsOpt), ("--model", o.ModelOpt)):
            if flag in opts and name != "vectors convert":  # convert records a recommendation, not a run setting
                assert opts[flag].help == shared.help, (name, flag)


@pytest.mark.parametrize("cmd", [["generate", "hi"], ["score", "hi", " there"], ["filter", "x.txt"],
                                 ["bench", "harm", "-o", "out"], ["calibrate", "--dry-run"]])
def test_raw_contradicting_frame_is_one_line(cmd, tmp_path):
    assert_one_line_error(run_cli(*cmd, "--raw", "--frame", "qa"), 2, "--raw means --frame none")


def test_bad_frame_and_values_are_one_line():
    assert_one_line_error(run_cli("generate", "hi", "--frame", "xml"), 2, "unknown frame")
    assert_one_line_error(run_cli("generate", "hi", "--seed", "-1"), 2, "seed")
    assert_one_line_error(run_cli("generate", "hi", "--gamma", "1e38"), 2, "gamma")
    assert_one_line_error(run_cli("generate", "hi", "--threads", "100000"), 2, "--threads")
    assert_one_line_error(run_cli("generate", "hi", "--stop", ""), 2, "--stop")


@pytest.mark.model
def test_stop_and_frame_on_generate_and_filter(tmp_path):
    p = run_cli("generate", "What is the capital of France?", "--frame", "qa", "--variant", "base", "-t", "0",
                "-n", "24", "--stop", "Paris", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["stop_reason"] == "stop" and "Paris" not in r["response"]
    # the qa frame is the Q:/A: framing with its own stop at the next question; --raw on the framed text is the same
    q = run_cli("generate", "What is the capital of France?", "--frame", "qa", "--variant", "base", "-t", "0",
                "-n", "24", "--json")
    raw = run_cli("generate", "Q: What is the capital of France?\nA:", "--raw", "--variant", "base", "-t", "0",
                  "-n", "24", "--stop", "\nQ:", "--json")
    assert json.loads(q.stdout)["response"] == json.loads(raw.stdout)["response"]
    f = tmp_path / "in.txt"
    f.write_text("What is the capital of France?\n")
    out = tmp_path / "out.jsonl"
    p = run_cli("filter", f, "-o", out, "--frame", "qa", "--variant", "base", "-n", "24", "--stop", "Paris", "-q")
    assert p.returncode == 0, p.stderr
    rec = json.loads(out.read_text().splitlines()[1])  # after the header
    assert "Paris" not in rec["response"] and rec["verdict"] in ("answered", "refused")


@pytest.mark.model
def test_chat_session_stops_at_stop(si):
    from safeinfer_local.workflows.chatloop import ChatSession

    q = "What is the capital of France?"
    free, cut = [], []
    ChatSession(si, "base", gen=dict(max_tokens=24, temperature=0)).reply(q, free.append)
    text = "".join(free)
    word = text.split()[len(text.split()) // 2]  # a word from the middle of the free reply
    ChatSession(si, "base", gen=dict(max_tokens=24, temperature=0, stop=(word,))).reply(q, cut.append)
    assert "".join(cut) == text[: text.index(word)]


def test_every_command_that_loads_a_model_takes_n_gpu_layers():
    loads = {name: _opts(cmd) for name, cmd in _commands() if "--model" in _opts(cmd)}
    assert {"generate", "chat", "filter", "serve", "bench speed", "vectors build", "vectors gate"} <= set(loads)
    for name, opts in loads.items():
        assert "--n-gpu-layers" in opts, name
        assert opts["--n-gpu-layers"].default == 0, name  # CPU unless asked: a CPU-only build must not care


def test_progress_plain_lines_give_each_stage_its_own_time_left(monkeypatch, capsys):
    clock = iter([0.0, 10.0, 100.0, 130.0, 160.0])
    monkeypatch.setattr(o.time, "perf_counter", lambda: next(clock))
    with o.Progress() as p:  # stderr is not a terminal under pytest: plain lines
        p("capture", 1, 10)
        p("capture", 2, 10)  # 1 pass in 10 s, 8 to go
        p("heads", 1, 4)  # a new stage: its rate starts here, not at the first stage's start
        p("heads", 2, 4)  # 1 pass in 30 s, 2 to go
        p("heads", 4, 4)
        p.note("a note")
    assert capsys.readouterr().err.splitlines() == [
        "capture: 1/10", "capture: 2/10, about 1m20s left", "heads: 1/4", "heads: 2/4, about 1m00s left",
        "heads: 4/4", "a note"]
    assert [o.duration(s) for s in (42, 185, 7800)] == ["42s", "3m05s", "2h10m"]
