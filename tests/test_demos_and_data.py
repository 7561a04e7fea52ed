import json

import pytest

from safeinfer_local.core import datasets
from safeinfer_local.core.demos import icl_prompts, load_demos, qa_prompt
from safeinfer_local.errors import DemosError

from .conftest import ROOT


def test_qa_template_exact():
    from safeinfer_local.core.demos import Demo

    assert qa_prompt("q?", [Demo("a", "b")]) == "Q: a\nA: b\n\nQ: q?\nA:"


def test_icl_prompts_hold_out_the_query():
    demos = load_demos(ROOT / "vectors" / "safe_demos.jsonl")
    ps = icl_prompts(demos, n_prompts=30, n_shots=10, seed=3)
    assert len(ps) == 30
    for q, shots in ps:
        assert len(shots) == 10 and q not in [s.prompt for s in shots]


def test_empty_and_malformed_demos(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DemosError, match="empty"):
        load_demos(empty)
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "response": "y"}) + "\n{not json\n")
    with pytest.raises(DemosError, match=r"b.jsonl:2"):
        load_demos(bad)
    nofield = tmp_path / "c.jsonl"
    nofield.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DemosError, match=r":1: .*response"):
        load_demos(nofield)


def test_shipped_demos_are_the_recorded_split_and_disjoint_from_eval():
    lines = [json.loads(x) for x in (ROOT / "vectors" / "safe_demos.jsonl").read_text().splitlines()]
    split = datasets.advbench_split()
    rows = datasets.advbench_rows()
    assert [x["advbench_row"] for x in lines] == split["safe_demos"]
    assert all(rows[x["advbench_row"]]["goal"] == x["prompt"] for x in lines)
    parts = [set(v) for v in split.values()]
    assert sum(len(p) for p in parts) == len(set().union(*parts)) == 520
    # no demonstration prompt appears in any evaluation or dev set
    demo_prompts = {x["prompt"] for x in lines}
    evals = {p.text for p in datasets.advbench("eval")} | {p.text for p in datasets.advbench("dev")}
    evals |= {p.text for p in datasets.catqa(part="all")} | {p.text for p in datasets.xstest("safe")}
    assert not demo_prompts & evals
    # refusals only: no compliant opening in a shipped demonstration
    assert not any(x["response"].lower().startswith("sure") for x in lines)


def test_catqa_per_category():
    ps = datasets.catqa(per_category=2)
    assert len(ps) == 22 and len({p.category for p in ps}) == 11


def test_catqa_eval_and_dev_parts_are_disjoint():
    ev, dev, every = datasets.catqa(), datasets.catqa(part="dev"), datasets.catqa(part="all")
    assert len(ev) == 11 * datasets.CATQA_EVAL and len(every) == 543  # 550 less the 7 repeats within a category
    assert not {p.text for p in ev} & {p.text for p in dev}
    assert {p.id for p in ev} | {p.id for p in dev} == {p.id for p in every}
    assert [p.text for p in datasets.catqa(10)] == [p.text for p in datasets.catqa(10, part="all")]
    # bench harm evaluates on the eval part; the gate is fitted on the dev part
    from safeinfer_local.core.harm import load_dataset
    from safeinfer_local.workflows.gatebuild import dev_sources

    assert [p.text for p in load_dataset("catqa")] == [p.text for p in ev]
    harmful = dev_sources()["catqa-dev"][1]
    assert {p.text for p in dev} <= set(harmful) and not set(harmful) & {p.text for p in ev}
    with pytest.raises(ValueError, match="part"):
        datasets.catqa(part="train")
    assert len(datasets.xstest("safe")) == 250


def test_every_gate_dev_source_is_disjoint_from_every_evaluation_set():
    """The harm gate's dev sources (leave-one-source-out holds each out) share no prompt with any set bench harm
    evaluates on, nor with the held-out prompts of benchmarks/data, nor with each other."""
    from safeinfer_local.core.harm import DATASETS, load_dataset
    from safeinfer_local.workflows.gatebuild import dev_sources

    def norm(t):
        return " ".join(t.lower().split())

    evals = {norm(p.text) for name in DATASETS for p in load_dataset(name)}
    evals |= {norm(json.loads(x)["prompt"]) for x in (ROOT / "benchmarks" / "data" / "gate_heldout.jsonl")
              .read_text().splitlines() if x.strip()}
    seen: dict[str, str] = {}
    paired = {f"paired-{side}": (side == "harmful", [p.text for p in datasets.gate_paired(side)])
              for side in ("harmful", "benign")}  # (gate_probes' extra fit data, not yet a dev source)
    for name, (_, prompts) in (dev_sources() | paired).items():
        assert len(prompts) >= 30, name
        for p in prompts:
            assert norm(p) not in evals, (name, p)
            assert seen.setdefault(norm(p), name) == name, (name, p, seen[norm(p)])
    # XSTest: the odd positions are dev, the even ones evaluation, for both labels
    assert [p.text for p in load_dataset("xstest-unsafe")] == [p.text for p in datasets.xstest("unsafe")[0::2]]
