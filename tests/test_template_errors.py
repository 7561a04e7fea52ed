"""A GGUF's chat template is code from the file: whatever is wrong with it (the Jinja sandbox stops it, a syntax
error, an undefined name, an error it raises itself, or nothing rendered) is one line naming the GGUF and the
problem, exit 2, and a pointer to --chat-format, which works around it. Tiny GGUFs carry each kind."""

import json

import pytest

from .conftest import assert_one_line_error, run_cli
from .tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.model

BROKEN = {
    # a template that reaches for Python internals (the classic sandbox escape); nothing of it may run
    "sandbox": ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "Jinja sandbox"),
    "syntax": ("{% for m in messages %}{{ m['content'] }", "syntax error at line 1"),
    "undefined": ("{% for m in messages %}{{ m['content'] + conversation.system }}{% endfor %}",
                  "undefined name ('conversation' is undefined)"),
    "empty": ("{% if false %}{{ messages }}{% endif %}{{ bos_token }}", "renders nothing"),
    "raises": ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
               "raised an error: Conversation roles must alternate"),
}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    d = tmp_path_factory.mktemp("templates")
    return {k: write_tiny_gguf(d / f"tpl-{k}.gguf", arch="llama", chat_template=t) for k, (t, _) in BROKEN.items()}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_generate_names_the_gguf_and_the_problem(broken, kind):
    p = run_cli("generate", "hello", "--model", broken[kind], "--variant", "base", "-n", "2", "-t", "0")
    line = assert_one_line_error(p, contains=BROKEN[kind][1])
    assert f"tpl-{kind}.gguf" in line and "--chat-format" in line
    assert p.stdout == ""


def test_chat_filter_and_score_share_the_path(broken, tmp_path):
    for args in (["chat", "--variant", "base", "-n", "2"],
                 ["filter", "-", "-o", tmp_path / "out.jsonl", "--variant", "base", "-n", "2", "-q"],
                 ["score", "hello", " there", "--variant", "base"]):
        p = run_cli(*args, "--model", broken["sandbox"], input="hello\n")
        assert_one_line_error(p, contains="was stopped by the Jinja sandbox")
    assert not (tmp_path / "out.jsonl").exists() or "hello" not in (tmp_path / "out.jsonl").read_text()


def test_chat_format_works_around_a_broken_template(broken):
    p = run_cli("generate", "hello", "--model", broken["sandbox"], "--variant", "base", "-n", "3", "-t", "0",
                "--chat-format", "chatml", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["n_tokens"] >= 1
    # and --raw never renders the template at all
    p = run_cli("generate", "hello", "--model", broken["syntax"], "--variant", "base", "-n", "2", "--raw")
    assert p.returncode == 0, p.stderr
