"""`safeinfer chat` driven in a real terminal (tmux send-keys / capture-pane) and through a pipe."""

import shutil
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.model


def test_chat_pipe_plain_text_and_commands():
    p = run_cli("chat", "--variant", "base", "-n", "6", "--temperature", "0",
                input="Hello there\n/variant nope\n/gamma 0.5\n/stats\n/quit\nnever reached\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "variants: base, sa, sgds, safeinfer" in out
    assert "gamma 0.5" in out and "variant base; gamma 0.5" in out and "turns 1" in out
    assert "\x1b[" not in out  # no colour when not a terminal


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_in_a_real_terminal_with_ctrl_c(tmp_path):
    sock = str(tmp_path / "tmux.sock")
    cmd = (f"{sys.executable} {ROOT / 'cli.py'} chat --variant safeinfer --guidance negative -n 400 "
           "--temperature 0.8 --seed 1")

    def tmux(*args):
        return subprocess.run(["tmux", "-S", sock, *args], capture_output=True, text=True, check=True).stdout

    def screen():
        return tmux("capture-pane", "-p", "-t", "t")

    def wait_for(text, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            s = screen()
            if text in s:
                return s
            time.sleep(0.3)
        raise AssertionError(f"{text!r} never appeared:\n{screen()}")

    tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "50", cmd)
    try:
        wait_for("/help for commands")
        tmux("send-keys", "-t", "t", "/help", "Enter")
        wait_for("/lambda L")
        tmux("send-keys", "-t", "t", "Tell me a long story about the sea.", "Enter")
        wait_for("bot> ")
        time.sleep(1.5)
        tmux("send-keys", "-t", "t", "C-c")  # stop this reply, keep the session
        s = wait_for("[stopped]")
        assert "changed by guidance]" in wait_for("changed by guidance]")
        tmux("send-keys", "-t", "t", "/stats", "Enter")
        s = wait_for("turns 1")
        assert "variant safeinfer" in s and "guidance negative" in s
        tmux("send-keys", "-t", "t", "/quit", "Enter")
        end = time.time() + 20
        while time.time() < end and "t" in subprocess.run(["tmux", "-S", sock, "ls"], capture_output=True,
                                                              text=True).stdout:
            time.sleep(0.3)
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)
