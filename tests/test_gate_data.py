"""The harm gate's added prompt sets (pure: no model): the project-written harmful / benign / contrast sets and the
PyRIT objectives. Sizes and spread, well-formed rows, no completions, and no prompt shared with the older sets or
with each other."""

import json
from collections import Counter

import pytest

from safeinfer_local.core import datasets
from safeinfer_local.core.datasets import DATA

from .conftest import ROOT

NEW = {"gate_harmful_requests": 240, "gate_benign_requests": 520, "gate_contrast_benign": 170, "pyrit_harmful": 150}
HARMFUL_FORMS = ("question", "imperative", "indirect", "roleplay", "fiction", "second_person", "short", "long",
                 "nonenglish", "instructions_around")
BENIGN_FORMS = ("question", "imperative", "multi_sentence", "with_instructions", "long", "short", "nonenglish")
LANGS = {"fr", "es", "de", "it", "pt"}
FORBIDDEN_FIELDS = ("response", "completion", "answer", "target", "output", "reply")


def rows(name: str) -> list[dict]:
    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("name", NEW)
def test_rows_well_formed(name):
    rs = rows(name)
    assert len(rs) >= NEW[name]
    ids = [r["id"] for r in rs]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(f"{name}-") for i in ids)
    prompts = [norm(r["prompt"]) for r in rs]
    assert len(set(prompts)) == len(prompts), [p for p, n in Counter(prompts).items() if n > 1]
    for r in rs:
        for k, v in r.items():
            assert isinstance(v, str) and v.strip(), (r["id"], k)
            assert not any(f in k.lower() for f in FORBIDDEN_FIELDS), (r["id"], k)


def check_forms(rs, forms_wanted, at_least):
    """Every form present, each at least ``at_least`` times, and each record true to its form: short and long by
    word count, a language tag exactly on the non-English ones, every language there."""
    forms = Counter(r["form"] for r in rs)
    assert set(forms) == set(forms_wanted)
    assert all(forms[f] >= at_least for f in forms_wanted), forms
    for r in rs:
        assert r["form"] != "short" or words(r["prompt"]) <= 6, r
        assert r["form"] != "long" or words(r["prompt"]) >= 60, r
        assert (r["form"] == "nonenglish") == ("lang" in r), r
    assert {r["lang"] for r in rs if "lang" in r} == LANGS


def test_harmful_spread():
    rs = rows("gate_harmful_requests")
    assert len({r["category"] for r in rs}) >= 12
    check_forms(rs, HARMFUL_FORMS, 15)


def test_benign_spread():
    rs = rows("gate_benign_requests")
    domains = Counter(r["domain"] for r in rs)
    assert len(domains) >= 28
    assert min(domains.values()) >= 10, domains
    check_forms(rs, BENIGN_FORMS, 10)
    summaries = [r["prompt"] for r in rs if r["domain"] == "summarising"]
    assert sum("'" in p or "«" in p or "\u201c" in p for p in summaries) >= 10  # the paragraph is pasted in


def test_contrast_topics():
    rs = rows("gate_contrast_benign")
    topics = Counter(r["topic"] for r in rs)
    assert len(topics) >= 12
    assert min(topics.values()) >= 5, topics


def test_pyrit_categories():
    rs = rows("pyrit_harmful")
    assert len({r["category"] for r in rs}) >= 8
    assert all(r["source"].startswith("pyrit/datasets/") for r in rs)


def older_prompts() -> dict[str, set[str]]:
    heldout = ROOT / "benchmarks" / "data" / "gate_heldout.jsonl"
    demos = DATA / "benign_demos.jsonl"
    return {
        "advbench": {norm(r["goal"]) for r in datasets.advbench_rows()},
        "catqa": {norm(p.text) for p in datasets.catqa(part="all")},
        "xstest": {norm(p.text) for label in ("safe", "unsafe") for p in datasets.xstest(label)},
        "benign_demos": {norm(json.loads(x)["prompt"]) for x in demos.read_text(encoding="utf-8").splitlines() if x},
        "gate_heldout": {norm(json.loads(x)["prompt"]) for x in heldout.read_text(encoding="utf-8").splitlines() if x},
    }


def test_no_prompt_shared_with_older_sets_or_across_new_ones():
    old = older_prompts()
    assert all(len(v) > 20 for v in old.values()), {k: len(v) for k, v in old.items()}
    seen: dict[str, str] = {}
    for name in NEW:
        for r in rows(name):
            p = norm(r["prompt"])
            hits = [k for k, v in old.items() if p in v]
            assert not hits, (r["id"], hits)
            assert p not in seen, (r["id"], seen.get(p))
            seen[p] = r["id"]


def test_loaders():
    for kind, name in datasets.GATE_WRITTEN.items():
        ps = datasets.gate_written(kind)
        rs = rows(name)
        assert [(p.id, p.text) for p in ps] == [(r["id"], r["prompt"]) for r in rs]
        assert [p.category for p in ps] == [r[datasets.GATE_LABEL[kind]] for r in rs]
        assert [p.category for p in datasets.gate_written(kind, "form")] == [r["form"] for r in rs]
        assert all(p.target == "" for p in ps)
    with pytest.raises(ValueError, match="kind"):
        datasets.gate_written("unsafe")
    ps = datasets.pyrit_harmful()
    assert [(p.id, p.text, p.category) for p in ps] == [(r["id"], r["prompt"], r["category"]) for r in
                                                        rows("pyrit_harmful")]
