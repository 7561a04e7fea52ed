"""Licence-clean prompt sets shipped in ``safeinfer_local/data`` (each with its SOURCE note and licence):
AdvBench (MIT) split into demonstration / guidance / dev / eval parts, CatQA English (Apache-2.0) split into
eval / dev parts, and XSTest (CC-BY-4.0)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    category: str = ""
    target: str = ""
    """A compliant opening for this prompt when the dataset has one (AdvBench's ``target`` column)."""


@lru_cache(maxsize=1)
def advbench_rows() -> list[dict[str, str]]:
    with open(DATA / "advbench_harmful_behaviors.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


@lru_cache(maxsize=1)
def advbench_split() -> dict[str, list[int]]:
    """Row indices per part: ``safe_demos``, ``unsafe_guidance``, ``dev``, ``eval`` (disjoint, recorded)."""
    doc = json.loads((DATA / "advbench_split.json").read_text())
    return {k: doc[k] for k in ("safe_demos", "unsafe_guidance", "dev", "eval")}


def advbench(part: str) -> list[Prompt]:
    rows = advbench_rows()
    return [Prompt(f"advbench-{i}", rows[i]["goal"], target=rows[i]["target"]) for i in advbench_split()[part]]


CATQA_EVAL = 30
"""CatQA's split: per category, the first ``CATQA_EVAL`` distinct questions in :func:`catqa`'s order (spread over
its subcategories) are for evaluation; the rest (positions 30 on, 4 or so per subcategory) are ``dev`` prompts,
which the harm gate is fitted on. Evaluation never sees a dev question."""
CATQA_PARTS = ("eval", "dev", "all")


def catqa(per_category: int | None = None, part: str = "eval") -> list[Prompt]:
    """CatQA English, in file order; ``per_category`` takes the first N distinct questions of each category,
    spread over its subcategories (one per subcategory in turn). ``part``: ``eval`` (the first
    :data:`CATQA_EVAL` of each category), ``dev`` (the rest) or ``all``."""
    if part not in CATQA_PARTS:
        raise ValueError(f"CatQA part must be one of {', '.join(CATQA_PARTS)}, not {part!r}")
    d = json.loads((DATA / "catqa_english.json").read_text(encoding="utf-8"))
    out: list[Prompt] = []
    for cat, subs in d.items():
        seen: set[str] = set()
        lists = list(subs.values())
        taken = []
        for j in range(max(len(q) for q in lists)):
            for qs in lists:
                if j < len(qs) and qs[j] not in seen:
                    seen.add(qs[j])
                    taken.append(qs[j])
        numbered = list(enumerate(taken))
        if part == "eval":
            numbered = numbered[:CATQA_EVAL]
        elif part == "dev":
            numbered = numbered[CATQA_EVAL:]
        if per_category is not None:
            numbered = numbered[:per_category]
        out.extend(Prompt(f"catqa-{cat}-{k}", q, cat) for k, q in numbered)
    return out


def xstest(label: str = "safe") -> list[Prompt]:
    with open(DATA / "xstest_prompts.csv", encoding="utf-8", newline="") as f:
        return [Prompt(f"xstest-{r['id']}", r["prompt"], r["type"]) for r in csv.DictReader(f) if r["label"] == label]


def dev_split(n_harmful: int, n_benign: int) -> tuple[list[Prompt], list[Prompt]]:
    """The dev prompts that sweeps and calibration tune on, kept out of every evaluation set: AdvBench ``dev``
    and the XSTest ``safe`` prompts at odd positions (``bench harm --dataset xstest`` uses the even ones)."""
    return advbench("dev")[:n_harmful], xstest("safe")[1::2][:n_benign]


GATE_WRITTEN = {
    "harmful": "gate_harmful_requests", "benign": "gate_benign_requests", "contrast": "gate_contrast_benign"}
"""The harm gate's project-written prompt sets (MIT, see ``SOURCE_gate_written.md``), by kind."""
GATE_LABEL = {"harmful": "category", "benign": "domain", "contrast": "topic"}


def _jsonl(name: str) -> list[dict[str, str]]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gate_written(kind: str, field: str | None = None) -> list[Prompt]:
    """``harmful`` requests, ordinary ``benign`` requests or benign ``contrast`` prompts (harm-adjacent words),
    written for the harm gate; ``Prompt.category`` is the row's category / domain / topic, or ``field`` (e.g.
    ``"form"``, ``"lang"``; empty where a row has none)."""
    if kind not in GATE_WRITTEN:
        raise ValueError(f"gate_written kind must be one of {', '.join(GATE_WRITTEN)}, not {kind!r}")
    key = field or GATE_LABEL[kind]
    return [Prompt(r["id"], r["prompt"], r.get(key, "")) for r in _jsonl(GATE_WRITTEN[kind])]


def gate_paired(side: str) -> list[Prompt]:
    """The ``harmful`` or the ``benign`` half of the style-paired requests (MIT, see ``SOURCE_gate_paired.md``), in
    pair order; ``Prompt.category`` is the pair's form."""
    if side not in ("harmful", "benign"):
        raise ValueError(f"gate_paired side must be harmful or benign, not {side!r}")
    return [Prompt(r["id"], r[side], r["form"]) for r in _jsonl("gate_paired")]


def pyrit_harmful() -> list[Prompt]:
    """Harmful objectives from PyRIT's package data (MIT, see ``SOURCE_pyrit_harmful.md``), PyRIT's category."""
    return [Prompt(r["id"], r["prompt"], r["category"]) for r in _jsonl("pyrit_harmful")]
