"""What every command shares, defined once: the options, their parsing, model loading, progress and output."""

from __future__ import annotations

import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import typer

from .. import schema
from ..core.frames import FRAMES
from ..core.settings import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    check_max_tokens,
    check_parallel,  # noqa: F401  (re-exported for the commands)
    check_sampling,
    check_seed,
    check_speculate,
)
from ..errors import SettingError, UsageError


def option(name: str):
    """The CLI option of a setting, from its declaration (``schema.SETTINGS``: flag, help, default)."""
    st = schema.BY_NAME[name]
    return typer.Option(st.default, st.flag, *([st.short] if st.short else []), help=st.help)


ModelOpt = option("model")
VectorOpt = option("vector")
GammaOpt = option("gamma")
LayersOpt = option("layers")
PositionsOpt = option("positions")
VariantOpt = option("variant")
GuidanceOpt = option("guidance")
LamOpt = option("lam")
SpeculateOpt = option("speculate")
RawOpt = typer.Option(False, "--raw", help="No chat template: BOS + the prompt's tokens (= --frame none).")
FrameOpt = typer.Option(None, "--frame", help=f"{' | '.join(FRAMES)}: the chat template (default), the prompt's "
                        "own tokens, or a plain 'Q: ...\\nA:' frame that stops at the next 'Q:' (for base models).")
StopOpt = typer.Option(None, "--stop", help="Stop when the reply contains this text (repeatable).")
NCtxOpt = option("n_ctx")
ThreadsOpt = option("n_threads")
GpuOpt = option("n_gpu_layers")
ChatFmtOpt = option("chat_format")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object.")
GateOpt = option("gate")
GateThresholdOpt = option("gate_threshold")
OnFlagOpt = option("on_flag")
RefusalOpt = option("refusal")
InputArg = typer.Argument(..., help="Prompt file (.jsonl, .csv, .txt) or - for stdin.")
OutFileOpt = typer.Option(None, "--out", "-o", help="Output JSON Lines (default: stdout). Rerunning the same "
                          "command resumes it.")
FormatOpt = typer.Option(None, "--format", help="jsonl | csv | txt (default: from the extension).")
FieldOpt = typer.Option(None, "--field", help="JSONL field / CSV column holding the prompt (default: prompt).")
SplitOpt = typer.Option(None, "--split", help="Also write DIR/allowed.jsonl and DIR/blocked.jsonl.")
ShardOpt = typer.Option(None, "--shard", help="I/N: take a deterministic 1/N of the input (by id).")
ForceOpt = typer.Option(False, "--force", help="Overwrite an output that is not this command's to overwrite (one of "
                        "its inputs, a file it did not write, or a run of another input or other settings) instead "
                        "of refusing it.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or summary.")
ParallelOpt = typer.Option(1, "--parallel", "-p", help="Prompts decoded in the same batch.")
MaxTokensOpt = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", "-n", help="Most tokens per reply.")
TemperatureOpt = typer.Option(DEFAULT_TEMPERATURE, "--temperature", "-t", help="0 = greedy.")
TopKOpt = typer.Option(DEFAULT_TOP_K, "--top-k", help="0 disables.")
TopPOpt = typer.Option(DEFAULT_TOP_P, "--top-p", help="1 disables.")
SeedOpt = typer.Option(None, "--seed", help="Sampling seed (default: random).")

def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def parse_layers(spec: str | None) -> tuple[int, ...] | None:
    return None if spec is None else schema.parse_layers(spec)


def parse_floats(name: str, spec: str, check=None) -> tuple[float, ...]:
    """A comma-separated list of finite numbers, each passed through ``check`` (a settings check) if given."""
    try:
        vals = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{name} must be numbers separated by commas, not {spec!r}") from None
    if not vals:
        raise UsageError(f"{name}: give at least one number, e.g. 0.25,0.5")
    for x in vals:
        check_finite(name, x)
        if check is not None:
            try:
                check(x)
            except SettingError as e:
                raise SettingError(f"{name}: {e}") from None
    return vals


def check_finite(name: str, x: float | None) -> None:
    import math

    if x is not None and not math.isfinite(x):
        raise UsageError(f"{name} must be a finite number, not {x}")


def csv_list(values: list[str] | None) -> list[str]:
    return [x.strip() for v in values or () for x in v.split(",") if x.strip()]


def check_threads(threads: int | None) -> None:
    schema.BY_NAME["n_threads"].checked(threads)


def gen_options(max_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                stop: list[str] | None = None) -> dict:
    """Sampling and length options, checked before any model is loaded; the keyword arguments of a generation."""
    check_sampling(temperature, top_k, top_p)
    check_max_tokens(max_tokens)
    check_seed(seed)
    if stop and not all(stop):
        raise SettingError("--stop takes a non-empty text")
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                stop=tuple(stop or ()))


def load(*, threads: int | None = None, **settings):
    """A SafeInfer from the common options (keywords: the settings of ``schema.SETTINGS``; ``threads`` is
    ``n_threads``, ``--vector none`` no vector); every value is checked before the model is loaded."""
    from ..api import SafeInfer

    vector = settings.pop("vector", None)
    vec = None if vector in ("none", "") else vector if vector is not None else "default"
    return SafeInfer(**settings, vector=vec, n_threads=threads, warn=warn)


def load_from(params: dict, **fixed):
    """:func:`load` with every setting a command takes, picked by its schema name from the command's parameters
    (``locals()``; ``threads`` for ``n_threads``), ``fixed`` over them."""
    picked = {name: params[name] for name in schema.BY_NAME if name in params}
    picked |= {"n_threads": params.get("threads")} | fixed
    return load(threads=picked.pop("n_threads"), **picked)


def parse_speculate_list(text: str | None) -> tuple[int, ...]:
    """``--speculate 2,4,8`` (a benchmark's list of K): each checked like ``--speculate``."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        try:
            out.append(check_speculate(int(part.strip())))
        except ValueError:
            raise SettingError(f"--speculate takes comma-separated integers, not {text!r}") from None
    return tuple(out)


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise UsageError("no prompt: pass it as an argument or on stdin")
        from ..workflows.inputs import read_stdin

        prompt = read_stdin()
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"the prompt is not valid UTF-8 (an undecodable byte at character {e.start})") from None
    if not prompt.strip():
        raise UsageError("empty prompt")
    return prompt


_ARGV: list[str] = []
"""The arguments of this run (recorded in outputs so that they say how to reproduce them)."""


def command_line() -> str:
    """This run's command line as a user would type it (recorded in vectors and reports)."""
    return "safeinfer " + " ".join(shlex.quote(a) for a in _ARGV)


def console():
    """stdout for tables: its own width on a terminal; wide enough for whole tables in a file or a pipe."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def check_out(path: Path, kind=None, *, inputs=(), force: bool = False, flag: str = "--out") -> Path:
    """Before any work: may this command write ``path`` (a ``files.Kind`` file, default any)? One line and exit 2
    when it is a folder, unwritable, one of ``inputs`` ((option, path) pairs) or a file of another kind
    (``--force`` allows the last two). See ``safeinfer_local.files.check_target``."""
    from .. import files

    return files.check_target(path, kind or files.ANY, inputs=inputs, force=force, flag=flag)


def model_input(model: str | None) -> tuple[str, str | None]:
    """The --model input as an (option, path) pair for :func:`check_out` (None for the default model)."""
    return ("--model file", model if model and Path(model).exists() else None)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h10m``."""
    s = max(0, round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """A rich progress bar per stage on stderr when it is a terminal (rate and time left); plain lines otherwise,
    every tenth of a stage, with its time left. Each stage's rate is measured from its own first update."""

    def __enter__(self):
        self.tty = sys.stderr.isatty()
        self.tasks: dict[str, int] = {}
        self.last: dict[str, int] = {}
        self.t0: dict[str, tuple[float, int]] = {}  # stage -> (time, done) at its first update
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.p = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                  console=Console(stderr=True), transient=False)
            self.p.__enter__()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        t0, d0 = self.t0.setdefault(stage, (now, done))
        per_s = (done - d0) / (now - t0) if now > t0 and done > d0 else 0.0
        if self.tty:
            if stage not in self.tasks:
                self.tasks[stage] = self.p.add_task(stage, total=total, rate="")
            self.p.update(self.tasks[stage], completed=done, total=total, rate=f"{per_s * 60:.1f}/min")
        else:
            step = max(1, total // 10)
            if done == total or done - self.last.get(stage, 0) >= step:
                self.last[stage] = done
                left = f", about {duration((total - done) / per_s)} left" if per_s and done < total else ""
                print(f"{stage}: {done}/{total}{left}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line on stderr that does not break the bars."""
        if self.tty:
            self.p.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self.tty:
            self.p.__exit__(*exc)
        return False


def progress(quiet: bool = False):
    return nullcontext(lambda *a: None) if quiet else Progress()


def judge(path: Path | None, threads: int | None):
    """``--judge-model``'s classifier, loaded (None without one)."""
    if path is None:
        return None
    from ..workflows.judge_model import ModelJudge

    return ModelJudge(path, n_threads=threads)


@contextmanager
def resumable(quiet: bool, where: object):
    """A resumable run's progress and ``on_resume`` (one line on stderr; none with --quiet). An interrupt, its
    finished records kept, prints its one line and exits 130."""
    from ..workflows.runs import Interrupted

    def on_resume(done: int, wanted: int) -> None:
        if not quiet:
            print(f"resuming: {done} of {wanted} already in {where}", file=sys.stderr)

    try:
        with progress(quiet) as prog:
            yield prog, on_resume
    except Interrupted as e:
        print(e.message, file=sys.stderr)
        raise typer.Exit(130) from None
