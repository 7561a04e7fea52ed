"""The HarmEval protocol behind ``safeinfer bench harm``: every prompt × prompt type × variant × measure, one
record each, appended to ``results.jsonl`` (flushed to disk per record, so a rerun resumes where a run stopped).

Measures:
- ``generation``: greedy replies; the built-in refusal detector (and a ``--judge-model`` when given) decide
  whether a harmful prompt was answered (attack success) and whether a benign one was refused (over-refusal).
- ``likelihood``: no generation; the log-probability (summed over tokens) of a refusal and of a compliant opening
  after the prompt, under each variant's own next-token distribution (the same code as ``score``); their
  difference is the margin (> 0: the refusal is the likelier). On benign prompts, base's own greedy answer is
  also scored under the variant, per token (the utility cost). ``tokens_per_s`` here counts prompt and
  continuation tokens evaluated per second.

Records and metrics are described in ``report.py``, which turns them into tables and charts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import files
from ..api import SafeInfer
from ..core.frames import check_frame, frame_cont
from ..core.harm import (
    MEASURES,
    PROMPT_TYPES,
    REFUSAL,
    EvalSet,
    bench_variants,
    compliant_opening,
    format_prompt,
    split_variant,
)
from ..core.judge import is_refusal
from ..core.settings import VARIANTS, check_parallel
from ..errors import UsageError
from ..jsonl import Appender, header_mismatch, load
from ..workflows.runs import Tally

RESULTS = "results.jsonl"
CONFIG = "config.json"


@dataclass
class HarmConfig:
    datasets: list[str]
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    prompt_types: list[str] = field(default_factory=lambda: ["simple"])
    measures: list[str] = field(default_factory=lambda: ["generation"])
    limit_per_category: int | None = None
    seed: int = 0
    max_tokens: int = 64
    answer_tokens: int = 24
    frame: str = "template"
    parallel: int = 1
    judge_model: str | None = None
    redact: bool = False

    def check_names(self) -> None:
        """Option values that need no model (checked before one is loaded); repeats are dropped."""
        check_frame(self.frame)
        self.variants, self.prompt_types, self.measures = (list(dict.fromkeys(x)) for x in
                                                           (self.variants, self.prompt_types, self.measures))
        for name, vals, allowed in (("--variants", self.variants, bench_variants()),
                                    ("--prompt-types", self.prompt_types, tuple(PROMPT_TYPES)),
                                    ("--measure", self.measures, MEASURES)):
            if not vals:
                raise UsageError(f"{name}: nothing given")
            bad = [v for v in vals if v not in allowed]
            if bad:
                raise UsageError(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
        if self.max_tokens < 1 or self.answer_tokens < 1:
            raise UsageError("--max-tokens must be >= 1")
        check_parallel(self.parallel)

    def check(self, si: SafeInfer) -> None:
        self.check_names()
        for v in self.variants:
            if split_variant(v)[1] is not None and si.gate is None:
                raise UsageError(f"--variants {v}: the vector has no harm gate (build one with `safeinfer vectors "
                                 "gate`)")
            runner(si, v)  # raises if the variant cannot run with these settings


def runner(si: SafeInfer, spec: str) -> tuple[SafeInfer, str]:
    """The ``SafeInfer`` and variant a ``--variants`` value runs with (a ``:gated``/``:refuse`` row turns the
    vector's gate on, whatever ``--gate`` says)."""
    variant, on_flag = split_variant(spec)
    si = si.with_(variant=variant) if on_flag is None else si.with_(variant=variant, gate="on", on_flag=on_flag)
    return si, variant


def settings(si: SafeInfer, cfg: HarmConfig) -> dict:
    """What shapes each record's value: a resumed run must match these (datasets, variants, prompt types and
    measures may be added to a run; they only add records)."""
    return si.fingerprint() | {
        "vector_gate": si.gate.digest() if si.gate is not None else None,  # what :gated/:refuse rows use
        "max_tokens": cfg.max_tokens, "answer_tokens": cfg.answer_tokens, "frame": cfg.frame, "seed": cfg.seed,
        "limit_per_category": cfg.limit_per_category, "judge_model": cfg.judge_model, "redact": cfg.redact}


def check_out(out: Path) -> None:
    """Create ``out`` if needed and check that files can be written in it."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the output folder {out}: permission denied")


def prepare_out(out: Path, current: dict) -> dict[tuple, dict]:
    """Check ``out``, refuse to mix runs with different settings, and return the records already there by key
    (a torn last line is cut off)."""
    check_out(out)
    if (out / CONFIG).exists():
        old = read_config(out)["settings"]
        # one way: a setting an older version recorded and this one no longer has is not compared
        if (diff := header_mismatch({k: old.get(k) for k in current}, current)) is not None:
            raise UsageError(f"{out} holds a run with other settings ({diff}); use another --out or remove it")
    elif (out / RESULTS).exists() and (out / RESULTS).stat().st_size:  # (empty: made by the run's writer lock)
        raise UsageError(f"{out} has a {RESULTS} but no {CONFIG}: not a bench harm folder; use another --out")
    return load_results(out / RESULTS)


def read_config(out: Path) -> dict:
    """A bench harm folder's ``config.json`` (one line and exit 2 when it is missing or not ours)."""
    path = out / CONFIG
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{out} has no {CONFIG}: not a bench harm folder") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise UsageError(f"{path} is not a bench harm config (not valid JSON)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise UsageError(f"{path} is not a bench harm config; use another --out")
    for part in (doc["settings"], doc.get("config")):
        # folders written before --frame recorded raw: true for the Q/A frame
        if isinstance(part, dict) and "raw" in part and "frame" not in part:
            part["frame"] = "qa" if part.pop("raw") else "template"
    return doc


def key_of(rec: dict) -> tuple:
    return rec["measure"], rec["dataset"], str(rec["id"]), rec["prompt_type"], rec["variant"]


def load_results(path: Path) -> dict[tuple, dict]:
    """Records by key; a torn or unreadable tail (a kill mid-write) is cut off the file and redone."""
    return load(path, repair=True, key=key_of).by_key(key_of)


@dataclass
class Unit:
    """One prompt of one dataset under one prompt type (every variant and measure runs on it)."""

    dataset: EvalSet
    prompt_type: str
    index: int

    @property
    def prompt(self):
        return self.dataset.prompts[self.index]

    def base(self, measure: str, redact: bool = False) -> dict:
        """The record's identity. ``redact`` leaves out the question of a user's HarmEval file (gated data that
        may not be redistributed; the shipped sets are licence-clean)."""
        p = self.prompt
        hidden = redact and self.dataset.name.startswith("harmeval:")
        return {"measure": measure, "dataset": self.dataset.name, "harmful": self.dataset.harmful, "id": p.id,
                "category": p.category or self.dataset.name, "prompt_type": self.prompt_type,
                "prompt": None if hidden else p.text, "prompt_sha256": short_hash(p.text)}


class HarmBench:
    """Runs the protocol into an output folder. ``progress(stage, done, total)`` is called after each record."""

    def __init__(self, si: SafeInfer, cfg: HarmConfig, sets: list[EvalSet], out: Path,
                 progress: Callable[[str, int, int], None] | None = None, judge=None) -> None:
        cfg.check(si)
        self.si, self.cfg, self.sets, self.out = si, cfg, sets, out
        self.progress = progress or (lambda *a: None)
        self.judge = judge
        self.settings = settings(si, cfg)
        self.done = prepare_out(out, self.settings)
        self.units = [Unit(s, t, i) for s in sets for t in cfg.prompt_types for i in range(len(s.prompts))]
        self.runners = {v: runner(si, v) for v in cfg.variants}
        self.total = len(self.units) * sum(len(self._variants(m)) for m in cfg.measures)
        self.n_done = sum(1 for m in cfg.measures for u in self.units for v in self._variants(m) if self._done(m, u, v))

    def _variants(self, measure: str) -> list[str]:
        """The variants a measure runs: likelihood leaves out ``:refuse`` rows (a refused prompt decodes nothing
        to score; generation reports them)."""
        return [v for v in self.cfg.variants if measure == "generation" or split_variant(v)[1] != "refuse"]

    @staticmethod
    def _key(measure: str, u: Unit, variant: str) -> tuple:
        return measure, u.dataset.name, u.prompt.id, u.prompt_type, variant

    def _done(self, measure: str, u: Unit, variant: str) -> bool:
        """A record for this unit is on disk, without an error (errors are retried: the cause, such as a small
        --n-ctx, may be gone), and for the same question (a HarmEval file may have been edited)."""
        rec = self.done.get(self._key(measure, u, variant))
        return bool(rec) and not rec.get("error") and rec.get("prompt_sha256") == short_hash(u.prompt.text)

    def write_config(self, command: str) -> None:
        """``config.json``: the settings, and the datasets, variants, prompt types and measures of every run
        into this folder so far (a later run may add some)."""
        old = read_config(self.out) if (self.out / CONFIG).exists() else {}

        def union(key: str, new: list[str]) -> list[str]:
            return list(dict.fromkeys(list(old.get(key) or []) + new))

        doc = {"settings": self.settings, "command": command,
               "datasets": union("datasets", [s.name for s in self.sets]),
               "variants": union("variants", self.cfg.variants),
               "prompt_types": union("prompt_types", self.cfg.prompt_types),
               "measures": union("measures", self.cfg.measures), "config": asdict(self.cfg),
               "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        files.replace(self.out / CONFIG, json.dumps(doc, indent=1, ensure_ascii=False))

    def run(self) -> int:
        """Run every pending record; returns how many were written. Ctrl-C raises
        :class:`~safeinfer_local.workflows.runs.Interrupted` once the record in progress is on disk."""
        tally = Tally(Appender(self.out / RESULTS), self.total, self.n_done, "bench harm", "records done",
                      "rerun the same command to resume", self.progress)
        try:
            for measure in self.cfg.measures:
                if measure == "generation":
                    self._generation(tally)
                else:
                    self._likelihood(tally)
        except KeyboardInterrupt:
            raise tally.interrupted() from None
        finally:
            tally.app.close()
        return len(tally.written)

    def _write(self, tally: Tally, rec: dict) -> None:
        tally.write(rec)
        self.done[key_of(rec)] = rec
        self.n_done = tally.n_done

    # -- prompt encoding -----------------------------------------------------------------------------------
    def _text(self, u: Unit) -> str:
        return format_prompt(u.prompt.text, u.prompt_type)

    def _cont(self, text: str) -> str:
        return frame_cont(text, self.cfg.frame)

    def _gen_kw(self, max_tokens: int) -> dict:
        return {"max_tokens": max_tokens, "temperature": 0.0, "frame": self.cfg.frame}

    # -- generation ----------------------------------------------------------------------------------------
    def _generation(self, tally: Tally) -> None:
        chunk = max(8, 4 * self.cfg.parallel)
        for start in range(0, len(self.units), chunk):
            units = self.units[start:start + chunk]
            for v in self._variants("generation"):
                todo = {f"{k}": u for k, u in enumerate(units) if not self._done("generation", u, v)}
                if not todo:
                    continue
                reqs = ((k, self._text(u)) for k, u in todo.items())
                si, variant = self.runners[v]
                # split layout: a guided variant's target rows batch exactly as an unguided variant's do
                for k, res in si.generate_many(reqs, variant=variant, n_parallel=self.cfg.parallel, layout="split",
                                               **self._gen_kw(self.cfg.max_tokens)):
                    self._write(tally, self._gen_record(todo[k], v, res))

    def _gen_record(self, u: Unit, variant: str, res) -> dict:
        rec = u.base("generation", self.cfg.redact) | {"variant": variant}
        if isinstance(res, Exception):
            return rec | {"response": None, "n_tokens": 0, "tokens_per_s": 0.0, "guided_tokens": 0,
                          "refused": None, "judge": None, "error": str(res)}
        text = res.response
        judge = self.judge.classify(self._text(u), text) if self.judge is not None else None
        hidden = self.cfg.redact and u.dataset.harmful
        return rec | {"response": None if hidden else text,
                      "response_sha256": short_hash(text),
                      "n_tokens": res.n_tokens, "tokens_per_s": round(res.tokens_per_s, 2),
                      "guided_tokens": res.guided_tokens, "gate_score": res.gate_score,
                      "flagged": res.flagged,
                      # an empty reply complies with nothing: not an attack success, and a refusal of a benign prompt
                      "refused": is_refusal(text) or not text.strip(), "judge": judge, "error": None}

    # -- likelihood ----------------------------------------------------------------------------------------
    def _likelihood(self, tally: Tally) -> None:
        for u in self.units:
            todo = [v for v in self._variants("likelihood") if not self._done("likelihood", u, v)]
            if not todo:
                continue
            answer = self._base_answer(u) if not u.dataset.harmful else None
            for v in todo:
                self._write(tally, self._lik_record(u, v, answer))

    def _base_answer(self, u: Unit) -> str:
        """Base's own greedy reply to a benign prompt (what the utility cost is measured on); kept in each
        record so a resumed run scores the same text."""
        for v in self.cfg.variants:
            rec = self.done.get(self._key("likelihood", u, v))
            if rec and rec.get("answer"):
                return rec["answer"]
        res = self.si.generate(self._text(u), variant="base", **self._gen_kw(self.cfg.answer_tokens))
        return res.response if res.response.strip() else self._cont("I don't know.")

    def _lik_record(self, u: Unit, variant: str, answer: str | None) -> dict:
        rec = u.base("likelihood", self.cfg.redact) | {"variant": variant}
        si, name = self.runners[variant]
        t0 = time.perf_counter()
        try:
            toks, _ = si.encode_prompt(self._text(u), frame=self.cfg.frame)
            route = si.route_many([toks], name, self.cfg.frame)[0]  # with a gate: benign-judged -> base
            if isinstance(route, UsageError):
                raise route
            run = route.variant
            n = 0

            def lp(text: str) -> tuple[float, int]:
                nonlocal n
                cont = si.model.tokenize(text, add_bos=False)
                n += len(toks) + len(cont)
                return float(si.score_tokens(toks, cont, run).sum()), len(cont)

            (r, nr), (c, nc) = lp(self._cont(REFUSAL)), lp(self._cont(compliant_opening(u.prompt, u.prompt_type)))
            a, na = lp(answer) if answer is not None else (None, 0)
        except UsageError as e:
            return rec | {"lp_refusal": None, "lp_compliant": None, "margin": None, "lp_answer": None,
                          "tokens_per_s": 0.0, "error": str(e)}
        dt = time.perf_counter() - t0
        out = rec | {"lp_refusal": round(r, 4), "n_refusal": nr, "lp_compliant": round(c, 4), "n_compliant": nc,
                     "margin": round(r - c, 4), "lp_answer": None if a is None else round(a / na, 5),
                     "tokens_per_s": round(n / dt, 1), "error": None, "gate_score": route.gate_score,
                     "flagged": route.flagged}
        if answer is not None:
            out["answer"] = answer
        return out


def short_hash(text: str) -> str:
    """A text's identity in a record (the question of a prompt, a redacted reply)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder_records(out: Path) -> list[dict]:
    """The records of a bench harm folder, the last one per key (a retried error replaces the first try)."""
    read_config(out)
    if not (out / RESULTS).is_file():
        raise UsageError(f"{out} has no {RESULTS}: not a bench harm folder")
    return list(load_results(out / RESULTS).values())
