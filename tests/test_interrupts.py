"""Ctrl-C is never lost around llama.cpp. llama.cpp calls back into Python through ctypes (llama-cpp-python's log
callback, the engine's cb_eval hook), and ctypes drops an exception raised there ("Exception ignored on calling
ctypes callback"): since Python 3.11 a pending SIGINT is handled at such a callback's first instruction, before
its ``try:``. The CLI's handler defers a Ctrl-C that lands inside a registered callback (or anything it calls)
and the engine raises it right after that ``llama_decode``; anywhere else it is a KeyboardInterrupt at once.

The model tests send SIGINT to real ``safeinfer`` processes in their long phase and want exit 130 within 2 s of
the signal, no traceback, no dropped exception and no partial output."""

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from safeinfer_local.llama import interrupts

from .conftest import ROOT


@pytest.fixture(autouse=True)
def _nothing_deferred():
    interrupts._deferred = False
    yield
    interrupts._deferred = False


def _sigint_here():
    interrupts._on_sigint(signal.SIGINT, sys._getframe(1))  # as if the signal landed in the caller's frame


# -- the handler -----------------------------------------------------------------------------------------------
def test_interrupt_inside_the_log_callback_is_deferred_to_the_next_decode():
    def llama_log_callback():  # the name of llama-cpp-python's callback
        _sigint_here()

    llama_log_callback()  # no exception here: it would be dropped by ctypes
    assert interrupts.pending()
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_deferred_interrupt()
    assert not interrupts.pending()
    interrupts.raise_deferred_interrupt()  # raised once only


def test_interrupt_in_a_registered_function_is_deferred():
    def callback():
        _sigint_here()

    assert interrupts.defer_in(callback) is callback
    callback()
    assert interrupts.pending()
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_deferred_interrupt()
    interrupts.raise_deferred_interrupt()
    assert not interrupts.pending()


def test_interrupt_in_a_function_called_by_a_registered_one_is_deferred():
    def patch():  # e.g. the fv build's patch function, called by ActivationHook._callback
        _sigint_here()

    @interrupts.defer_in
    def callback():
        patch()

    callback()
    assert interrupts.pending()


def test_methods_register_their_function():
    class Hook:
        def cb(self):
            _sigint_here()

        def other(self):
            _sigint_here()

    h = Hook()
    interrupts.defer_in(h.cb)  # a bound method registers the function's code
    h.cb()
    assert interrupts.pending()
    interrupts._deferred = False
    with pytest.raises(KeyboardInterrupt):
        h.other()
    with pytest.raises(TypeError):
        interrupts.defer_in(len)  # a builtin (Ray patches print once it has started)


def test_interrupt_elsewhere_raises_at_once():
    def not_registered():
        _sigint_here()

    with pytest.raises(KeyboardInterrupt):
        not_registered()
    with pytest.raises(KeyboardInterrupt):
        interrupts._on_sigint(signal.SIGINT, sys._getframe())
    assert not interrupts.pending()
    interrupts.raise_deferred_interrupt()  # nothing deferred


def _qsort():
    try:
        return ctypes.CDLL(None).qsort
    except (OSError, AttributeError, TypeError):
        return None


@pytest.mark.skipif(_qsort() is None or threading.current_thread() is not threading.main_thread(),
                    reason="needs libc's qsort and the main thread")
@pytest.mark.parametrize("registered", [True, False])
def test_a_real_sigint_inside_a_ctypes_callback(registered):
    """The bug itself, without a model: SIGINT arrives while C code (qsort) runs a Python ctypes callback. A
    registered callback defers it; an unregistered one loses it (ctypes reports it as unraisable, drops it, and
    qsort carries on with a made-up result), which is what happened in ActivationHook._callback."""
    qsort = _qsort()
    cmp_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    calls = []

    def compare(a, b):
        if not calls:
            calls.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the next instruction (or the next call's entry)
        return a[0] - b[0]

    if registered:
        interrupts.defer_in(compare)
    else:  # a code object of its own: an equal one (the other case's) counts as registered
        compare.__code__ = compare.__code__.replace(co_name="compare_unregistered")
    lost = []
    old, old_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    interrupts.install()
    sys.unraisablehook = lambda u: lost.append(u.exc_type)  # here, not by monkeypatch: pytest sets its own
    try:
        arr = (ctypes.c_int * 64)(*range(64, 0, -1))
        qsort(arr, len(arr), ctypes.sizeof(ctypes.c_int), cmp_t(compare))
        if registered:
            assert list(arr) == list(range(1, 65))
            assert lost == [] and interrupts.pending()
            with pytest.raises(KeyboardInterrupt):
                interrupts.raise_deferred_interrupt()
        else:
            assert lost == [KeyboardInterrupt] and not interrupts.pending()
    finally:
        sys.unraisablehook = old_hook
        signal.signal(signal.SIGINT, old)


def test_the_engine_callback_is_registered_and_cuts_the_decode_short():
    from safeinfer_local.llama.engine import ActivationHook

    assert ActivationHook._callback.__code__ in interrupts._codes
    hook = ActivationHook({"l_out-0"})
    interrupts._deferred = True  # as the handler leaves it when Ctrl-C lands in the callback
    # ask: "wanted" (so llama.cpp calls back with the data), then False: the scheduler stops the graph
    assert hook._callback(0, True, None) is True
    assert hook._callback(0, False, None) is False
    assert hook.error is None and hook.captured == {}


@pytest.mark.model
def test_an_interrupt_in_the_hook_is_raised_after_the_decode_and_the_context_stays_usable(model):
    from safeinfer_local.llama.engine import ActivationHook

    seen = []

    def patch(name, rows):
        seen.append(name)
        raise KeyboardInterrupt  # as Python's own handler raises it inside the callback's try

    hook = ActivationHook({"l_out-1", "l_out-5"})
    ctx = model.context(n_ctx=256, capture=hook, n_threads=1)
    toks = model.tokenize("Q: What colour is the sky?\nA:", add_bos=True)
    want = ctx.decode(toks)
    hook.patch = patch
    ctx.clear()
    with pytest.raises(KeyboardInterrupt):  # stored in hook.error, re-raised as itself after the decode
        ctx.decode(toks)
    assert seen == ["l_out-1"]  # and the rest of the graph was cut short
    hook.patch = None
    ctx.clear()
    interrupts._deferred = True  # a Ctrl-C deferred in a callback
    with pytest.raises(KeyboardInterrupt):
        ctx.decode(toks)
    assert not interrupts.pending()
    ctx.clear()
    np.testing.assert_allclose(ctx.decode(toks), want, rtol=1e-4, atol=1e-4)  # a decode cut short leaves no trace


# -- real processes --------------------------------------------------------------------------------------------
def _drain(stream, buf: bytearray) -> None:
    while chunk := os.read(stream.fileno(), 65536):
        buf.extend(chunk)


def _progress(buf: bytearray, stage: str) -> int:
    found = re.findall(rb"(?:^|[\r\n])" + re.escape(stage.encode()) + rb": (\d+)/", bytes(buf))
    return int(found[-1]) if found else 0


def _cmd(args) -> list[str]:
    # one thread: on a busy machine llama.cpp's threads spin-wait for each other at every graph node (a bench
    # harm run took 190 s with 2 threads on 2 shared cores, 25 s with 1), which is no part of what is tested here
    return [sys.executable, str(ROOT / "cli.py"), *map(str, args), "--threads", "1"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("SAFEINFER_VERBOSE", None)
    return env


def _rerun(args) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(args), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _interrupt(args, stage: str, at: int, wait_s: float = 300) -> tuple[int | None, float, str]:
    """Run ``python cli.py ARGS``; once its progress on stderr shows step ``at`` of ``stage`` done and then the
    next progress line, send SIGINT half that interval later (well inside the steps after). Returns the exit
    code (None: still running 30 s after the signal, then killed), the seconds from the signal to the exit, and
    stderr."""
    proc = subprocess.Popen(_cmd(args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    buf = bytearray()
    reader = threading.Thread(target=_drain, args=(proc.stderr, buf), daemon=True)
    reader.start()
    try:
        marks = []
        end = time.monotonic() + wait_s
        step = at
        for _ in range(2):  # step `at` (or the first line after it), then the next progress line
            while (done := _progress(buf, stage)) < step:
                if proc.poll() is not None or time.monotonic() > end:
                    pytest.fail(f"never reached {stage} {step} (exit {proc.poll()}): {buf.decode(errors='replace')}")
                time.sleep(0.01)
            marks.append(time.monotonic())
            step = done + 1
        time.sleep((marks[1] - marks[0]) / 2)
        assert proc.poll() is None, buf.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        dt = time.monotonic() - t0
        print(f"{' '.join(map(str, args[:2]))}: exit {rc} {dt:.2f} s after SIGINT")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    return rc, dt, buf.decode(errors="replace")


def _assert_interrupted(rc, dt, err):
    assert rc == 130, f"exit {rc} after Ctrl-C (ignored?): {err[-3000:]}"
    assert dt < 2.0, f"took {dt:.2f} s from SIGINT to exit"
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


def _jsonl_lines(path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a torn last line"
    return [json.loads(x) for x in data.splitlines()]


@pytest.mark.model
@pytest.mark.parametrize("method, stage, extra", [
    ("mean-diff", "capture", ["--prompts", "6"]),
    # the patched head scan: Ctrl-C lands in the fv build's patch function, called by the cb_eval hook
    ("fv", "screen", ["--prompts", "2", "--shots", "3", "--aie-prompts", "2", "--max-heads", "4", "--heads", "2"]),
])
def test_ctrl_c_stops_vectors_build(tmp_path, method, stage, extra):
    out = tmp_path / "v.gguf"
    rc, dt, err = _interrupt(["vectors", "build", "--demos", ROOT / "vectors" / "safe_demos.jsonl", "--method",
                              method, "--out", out, *extra], stage, 2)
    _assert_interrupted(rc, dt, err)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


def _benign_prompts(path, n: int) -> list[str]:
    things = ["a garden", "a river", "the moon", "bread", "a bicycle", "a violin", "the library", "a kite"]
    verbs = ["Describe", "Write a short poem about", "Give three fun facts about", "Explain how to draw"]
    ids = [f"b{i}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": ids[i], "prompt": f"{verbs[i % 4]} {things[i % 8]} (note {i})."})
                            + "\n" for i in range(n)))
    return ids


@pytest.mark.model
def test_ctrl_c_stops_screen_and_the_rerun_completes(tmp_path):
    f = tmp_path / "in.jsonl"
    ids = _benign_prompts(f, 300)
    out = tmp_path / "out.jsonl"
    args = ["screen", f, "-o", out]
    rc, dt, err = _interrupt(args, "screen", 64)  # in the third chunk of 64
    _assert_interrupted(rc, dt, err)
    assert "rerun the same command to resume" in err
    lines = _jsonl_lines(out)  # only whole lines
    assert "_header" in lines[0] and 0 < len(lines) - 1 < len(ids)
    p = _rerun(args)
    assert p.returncode == 0, p.stderr
    got = [r["id"] for r in _jsonl_lines(out)[1:]]
    assert sorted(got) == sorted(ids) and len(got) == len(set(got))


@pytest.mark.model
def test_ctrl_c_stops_bench_harm_and_the_rerun_completes(tmp_path):
    out = tmp_path / "bh"
    # safeinfer:gated reads every prompt through the gate's cb_eval hook, then scores it with two sides
    args = ["bench", "harm", "-o", out, "--dataset", "xstest", "--limit-per-category", "1",
            "--variants", "base,safeinfer:gated", "--measure", "likelihood"]
    rc, dt, err = _interrupt(args, "bench harm", 4)
    _assert_interrupted(rc, dt, err)
    assert not (out / "report.md").exists()
    recs = _jsonl_lines(out / "results.jsonl")  # only whole lines
    assert 0 < len(recs) < 20
    p = _rerun(args)
    assert p.returncode == 0, p.stderr
    keys = [(r["measure"], r["dataset"], str(r["id"]), r["prompt_type"], r["variant"])
            for r in _jsonl_lines(out / "results.jsonl")]
    assert len(keys) == len(set(keys))  # every record once
    ids = {k[2] for k in keys}
    assert len(ids) >= 10 and set(keys) == {("likelihood", "xstest", i, "simple", v)
                                            for i in ids for v in ("base", "safeinfer:gated")}
    assert (out / "report.md").exists()
