"""HarmEval loaders and metrics (pure, no model)."""

import json

import pytest

from safeinfer_local.core import harm
from safeinfer_local.errors import UsageError


def test_wilson_known_values():
    lo, hi = harm.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = harm.wilson(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
    assert harm.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        harm.wilson(3, 2)


def test_rate_table_per_category():
    rows = [{"category": "A", "harmful": True}, {"category": "A", "harmful": False},
            {"category": "B", "harmful": True}]
    t = harm.rate_table(rows, "harmful")
    assert list(t) == ["A", "B", "overall"]
    assert t["A"]["rate"] == 0.5 and t["B"]["k"] == 1 and t["overall"]["n"] == 3
    assert t["overall"]["ci95"][0] < 2 / 3 < t["overall"]["ci95"][1]


def test_harmeval_csv_and_jsonl(tmp_path):
    c = tmp_path / "h.csv"
    c.write_text("Question,Topic\nHow to x?,Malware\nHow to y?,Fraud/Deception\n")
    ps = harm.load_harmeval(c)
    assert [(p.text, p.category) for p in ps] == [("How to x?", "Malware"), ("How to y?", "Fraud/Deception")]
    j = tmp_path / "h.jsonl"
    j.write_text(json.dumps({"Question": "q", "Topic": "Adult Content"}) + "\n")
    assert harm.load_harmeval(j)[0].category == "Adult Content"


def test_harmeval_bad_files(tmp_path):
    c = tmp_path / "h.csv"
    c.write_text("Prompt,Category\nx,y\n")
    with pytest.raises(UsageError, match="missing column.*Question.*Topic"):
        harm.load_harmeval(c)
    e = tmp_path / "e.csv"
    e.write_text("")
    with pytest.raises(UsageError, match="empty"):
        harm.load_harmeval(e)
    with pytest.raises(UsageError, match="not found"):
        harm.load_harmeval(tmp_path / "nope.csv")
    with pytest.raises(UsageError, match="unknown dataset"):
        harm.load_dataset("harmbench")


def test_datasets_by_name_and_sampling():
    cat = harm.load_dataset("catqa")
    assert len({p.category for p in cat}) == 11
    s1 = harm.sample_per_category(cat, 3, seed=1)
    assert len(s1) == 33 and s1 == harm.sample_per_category(cat, 3, seed=1)
    assert s1 != harm.sample_per_category(cat, 3, seed=2)
    assert len(harm.load_dataset("xstest")) == 125 and len(harm.load_dataset("advbench")) == 360
