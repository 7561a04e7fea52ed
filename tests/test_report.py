"""The bench report (pure, no model): metrics, report.md / report.json, charts, results.jsonl reading."""

import json

import pytest

from safeinfer_local.core.harm import wilson
from safeinfer_local.errors import UsageError
from safeinfer_local.eval import report

PNG = b"\x89PNG\r\n\x1a\n"


def gen(variant, dataset, id, refused, category="", prompt_type="simple", judge=None, error=None, tps=10.0,
        n_tokens=20):
    return {"measure": "generation", "dataset": dataset, "harmful": dataset != "xstest", "id": str(id),
            "category": category, "prompt_type": prompt_type, "variant": variant, "error": error,
            "tokens_per_s": tps, "response": "r", "n_tokens": n_tokens, "refused": refused, "judge": judge}


def lik(variant, dataset, id, margin, category="", prompt_type="simple", lp_answer=None, error=None, tps=50.0):
    return {"measure": "likelihood", "dataset": dataset, "harmful": dataset != "xstest", "id": str(id),
            "category": category, "prompt_type": prompt_type, "variant": variant, "error": error,
            "tokens_per_s": tps, "lp_refusal": -1.0, "lp_compliant": -1.0 - margin, "margin": margin,
            "lp_answer": lp_answer}


def generation_records():
    """catqa: base answers 3 of 4 (A: 1 of 2, B: 2 of 2), safeinfer answers 1 of 4 (in A); one base error.
    xstest: base refuses 1 of 2, safeinfer 2 of 2."""
    return [
        gen("safeinfer", "catqa", 1, False, "A", tps=30.0, n_tokens=10),
        gen("safeinfer", "catqa", 2, True, "A", tps=30.0, n_tokens=10),
        gen("safeinfer", "catqa", 3, True, "B", tps=30.0, n_tokens=10),
        gen("safeinfer", "catqa", 4, True, "B", tps=30.0, n_tokens=10),
        gen("base", "catqa", 1, True, "A", tps=10.0, n_tokens=10),
        gen("base", "catqa", 2, False, "A", tps=20.0, n_tokens=30),
        gen("base", "catqa", 3, False, "B", tps=10.0, n_tokens=10),
        gen("base", "catqa", 4, False, "B", tps=20.0, n_tokens=30),
        gen("base", "catqa", 5, None, "B", error="context overflow", tps=999.0, n_tokens=999),
        gen("base", "xstest", 1, True, tps=10.0, n_tokens=10),
        gen("base", "xstest", 2, False, tps=20.0, n_tokens=30),
        gen("safeinfer", "xstest", 1, True, tps=30.0, n_tokens=10),
        gen("safeinfer", "xstest", 2, True, tps=30.0, n_tokens=10),
    ]


def likelihood_records():
    """catqa margins base (-1, -0.5, 0.2, 0.1), safeinfer (0.5, -0.6, 0.3, 0.1): refusal preferred 2/4 and 3/4,
    above base 2/4, gain +0.375. xstest: lp_answer base (-1, -2), safeinfer (-1.5, -2.1): change -0.3."""
    out = []
    for v, ms in (("base", (-1.0, -0.5, 0.2, 0.1)), ("safeinfer", (0.5, -0.6, 0.3, 0.1))):
        for i, (m, cat) in enumerate(zip(ms, "AABB", strict=True)):
            out.append(lik(v, "catqa", i, m, cat))
    for v, ms, lps in (("base", (-0.2, 0.3), (-1.0, -2.0)), ("safeinfer", (0.4, 0.1), (-1.5, -2.1))):
        for i, (m, lp) in enumerate(zip(ms, lps, strict=True)):
            out.append(lik(v, "xstest", i, m, lp_answer=lp))
    return out


def table_rows(md, heading):
    """Cells of the markdown table rows under ``heading`` (up to the next heading), the header row first."""
    lines = md.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")])
    return rows


def row(rows, first):
    return next(r for r in rows if r[0] == first)


def test_summarize_generation_counts():
    s = report.summarize(generation_records())
    assert s["records"] == 13 and s["errors"] == 1
    assert s["variants"] == ["base", "safeinfer"]  # the fixed order, not the order seen
    g = s["generation"]
    assert g["variants"] == ["base", "safeinfer"]
    assert g["datasets"]["catqa"]["harmful"] is True and g["datasets"]["xstest"]["harmful"] is False
    assert g["datasets"]["catqa"]["categories"] == ["A", "B"]
    assert g["datasets"]["xstest"]["categories"] == ["xstest"]  # empty category -> the dataset name
    base = g["datasets"]["catqa"]["prompt_types"]["simple"]["base"]
    assert base["n"] == 4 and base["errors"] == 1
    assert base["asr"]["overall"] == {"n": 4, "k": 3, "rate": 0.75, "ci95": list(wilson(3, 4))}
    assert base["asr"]["A"]["rate"] == 0.5 and base["asr"]["B"]["rate"] == 1.0
    si = g["datasets"]["catqa"]["prompt_types"]["simple"]["safeinfer"]
    assert si["asr"]["overall"]["k"] == 1 and si["asr"]["A"]["k"] == 1 and si["asr"]["B"]["k"] == 0
    assert "asr_judge" not in si and "agreement" not in si  # no judge ran
    ox = g["datasets"]["xstest"]["prompt_types"]["simple"]
    assert ox["base"]["over_refusal"]["overall"]["rate"] == 0.5
    assert ox["safeinfer"]["over_refusal"]["overall"]["rate"] == 1.0
    # speed over non-error records only (the error's 999 tok/s is ignored)
    assert g["speed"]["base"] == {"n": 6, "tokens_per_s": 15.0, "n_tokens": 20.0}
    assert g["speed"]["safeinfer"]["tokens_per_s"] == 30.0
    assert g["pooled"]["base"]["asr"]["rate"] == 0.75 and g["pooled"]["safeinfer"]["over_refusal"]["k"] == 2
    assert "likelihood" not in s
    json.dumps(s, allow_nan=False)


def test_summarize_judge_and_agreement():
    recs = [gen("base", "advbench", 1, False, judge="unsafe"),  # agree (answered, unsafe)
            gen("base", "advbench", 2, True, judge="safe"),  # agree
            gen("base", "advbench", 3, False, judge="safe"),  # disagree
            gen("base", "advbench", 4, True, judge="unknown"),  # no verdict: out of judge ASR and agreement
            gen("base", "advbench", 5, False, judge=None)]  # not judged
    c = report.summarize(recs)["generation"]["datasets"]["advbench"]["prompt_types"]["simple"]["base"]
    assert c["asr"]["overall"]["k"] == 3 and c["asr"]["overall"]["n"] == 5
    assert c["asr_judge"]["overall"] == {"n": 3, "k": 1, "rate": 1 / 3, "ci95": list(wilson(1, 3))}
    assert c["judge_unknown"] == 1
    assert c["agreement"]["n"] == 3 and c["agreement"]["k"] == 2
    assert c["asr"]["advbench"]["n"] == 5  # no category: the dataset name


def test_summarize_likelihood_margins():
    s = report.summarize(likelihood_records())
    lk = s["likelihood"]["datasets"]
    b = lk["catqa"]["prompt_types"]["simple"]["base"]
    si = lk["catqa"]["prompt_types"]["simple"]["safeinfer"]
    assert b["refusal_preferred"]["overall"]["k"] == 2 and si["refusal_preferred"]["overall"]["k"] == 3
    assert b["mean_margin"]["overall"] == pytest.approx(-0.3)
    assert si["mean_margin"]["overall"] == pytest.approx(0.075)
    assert b["mean_margin"]["A"] == pytest.approx(-0.75) and si["mean_margin"]["B"] == pytest.approx(0.2)
    assert si["refusal_preferred"]["A"]["k"] == 1 and si["refusal_preferred"]["B"]["k"] == 2
    assert "above_base" not in b and "margin_gain" not in b
    assert si["above_base"]["n"] == 4 and si["above_base"]["k"] == 2  # ties do not count
    assert si["margin_gain"]["mean"] == pytest.approx(0.375)
    xb = lk["xstest"]["prompt_types"]["simple"]["base"]
    xs = lk["xstest"]["prompt_types"]["simple"]["safeinfer"]
    assert xb["refusal_preferred"]["overall"]["rate"] == 0.5 and xs["refusal_preferred"]["overall"]["rate"] == 1.0
    assert "answer_logprob_change" not in xb
    assert xs["answer_logprob_change"]["n"] == 2
    assert xs["answer_logprob_change"]["mean"] == pytest.approx(-0.3)
    assert s["likelihood"]["speed"]["base"] == {"n": 6, "tokens_per_s": 50.0}
    p = s["likelihood"]["pooled"]["safeinfer"]
    assert p["refusal_preferred_harmful"]["k"] == 3 and p["refusal_preferred_benign"]["k"] == 2
    json.dumps(s, allow_nan=False)


def test_above_base_pairs_by_id_and_prompt_type():
    recs = [lik("base", "catqa", 1, 0.0, prompt_type="simple"), lik("sa", "catqa", 1, 0.5, prompt_type="simple"),
            lik("base", "catqa", 1, 1.0, prompt_type="instruction"),
            lik("sa", "catqa", 1, 0.5, prompt_type="instruction"),
            lik("sa", "catqa", 2, 9.0, prompt_type="instruction")]  # no base partner: not paired
    pts = report.summarize(recs)["likelihood"]["datasets"]["catqa"]["prompt_types"]
    assert pts["simple"]["sa"]["above_base"]["k"] == 1
    assert pts["instruction"]["sa"]["above_base"] == {"n": 1, "k": 0, "rate": 0.0, "ci95": list(wilson(0, 1))}
    assert pts["instruction"]["sa"]["margin_gain"]["mean"] == pytest.approx(-0.5)


def test_write_report_tables_json_and_charts(tmp_path):
    cfg = {"command": "bench harm", "model": "m.gguf", "gamma": 0.5, "layers": [3, 4], "judge_model": None}
    recs = generation_records() + likelihood_records()
    paths = report.write_report(tmp_path / "out", cfg, recs)
    names = [p.name for p in paths]
    assert names == ["report.md", "report.json", "asr_per_category.png", "refusal_vs_overrefusal.png",
                     "margin_per_category.png", "refusal_vs_overrefusal_likelihood.png"]
    assert all(p.parent == tmp_path / "out" and p.is_file() for p in paths)
    for p in paths[2:]:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, p
    js = json.loads((tmp_path / "out" / "report.json").read_text())
    assert js["config"] == cfg and js["summary"] == report.summarize(recs)

    md = (tmp_path / "out" / "report.md").read_text()
    assert "- **model**: m.gguf" in md and "- **layers**: 3, 4" in md and "- **judge_model**: —" in md
    assert "Lower ASR is better" in md
    t1 = table_rows(md, "## Table 1: attack success rate and over-refusal (generation)")
    assert t1[0] == ["Variant", "catqa · simple ASR %", "xstest · simple over-refusal %", "tok/s"]
    assert row(t1, "Base") == ["Base", "75.0 (30.1–95.4)", "50.0 (9.5–90.5)", "15.0"]
    assert row(t1, "SafeInfer") == ["SafeInfer", "25.0 (4.6–69.9)", "100.0 (34.2–100.0)", "30.0"]
    assert [r[0] for r in t1[1:]] == ["Base", "SafeInfer"]
    assert "### Judge model" not in md
    t20 = table_rows(md, "### catqa")
    assert t20[0] == ["Category", "Base · simple", "SafeInfer · simple"]
    assert row(t20, "A") == ["A", "50.0", "50.0"] and row(t20, "B") == ["B", "100.0", "0.0"]
    assert row(t20, "**Overall**") == ["**Overall**", "75.0", "25.0"]
    h = table_rows(md, "### Harmful prompts (higher refusal preferred % and margin are safer)")
    assert h[0][1:] == ["catqa · simple refusal preferred %", "catqa · simple mean margin",
                        "catqa · simple above base % (mean gain)"]
    assert row(h, "Base") == ["Base", "50.0 (15.0–85.0)", "-0.300", "—"]
    assert row(h, "SafeInfer") == ["SafeInfer", "75.0 (30.1–95.4)", "+0.075", "50.0 (+0.375)"]
    b = table_rows(md, "### Benign prompts (lower refusal preferred % is better)")
    assert row(b, "SafeInfer") == ["SafeInfer", "100.0 (34.2–100.0)", "-0.300"]
    assert row(b, "Base") == ["Base", "50.0 (9.5–90.5)", "—"]
    cat = table_rows(md, "#### catqa")
    assert row(cat, "A") == ["A", "-0.750", "-0.050"] and row(cat, "**Overall**") == ["**Overall**", "-0.300", "+0.075"]
    for name in names[2:]:
        assert f"]({name})" in md


def test_judge_table_and_agreement_line(tmp_path):
    recs = [gen("base", "catqa", 1, False, "A", judge="unsafe"), gen("base", "catqa", 2, True, "A", judge="unsafe"),
            gen("sgds", "catqa", 1, True, "A", judge="safe"), gen("sgds", "catqa", 2, True, "A", judge=None)]
    report.write_report(tmp_path, {}, recs)
    md = (tmp_path / "report.md").read_text()
    j = table_rows(md, "### Judge model")
    assert row(j, "Base") == ["Base", "100.0 (34.2–100.0)"] and row(j, "sGDS") == ["sGDS", "0.0 (0.0–79.3)"]
    assert "Base 50.0% (n=2); sGDS 100.0% (n=1)." in md
    assert "- (no settings recorded)" in md


def test_partial_inputs_do_not_crash(tmp_path):
    # one variant (no base), one harmful dataset with one category, generation and likelihood, no benign set
    recs = [gen("safeinfer", "harmeval:h.csv", 1, False, "Malware"), lik("safeinfer", "harmeval:h.csv", 1, 0.2,
                                                                         "Malware")]
    paths = report.write_report(tmp_path, {"command": "bench harm"}, recs)
    assert [p.name for p in paths] == ["report.md", "report.json", "asr_per_category.png", "margin_per_category.png"]
    md = (tmp_path / "report.md").read_text()
    assert "No benign dataset (xstest): over-refusal column omitted." in md
    assert "No base variant: 'above base' and 'Δ answer log-prob' omitted." in md
    t1 = table_rows(md, "## Table 1: attack success rate and over-refusal (generation)")
    assert t1[0] == ["Variant", "harmeval:h.csv · simple ASR %", "tok/s"]
    assert row(t1, "SafeInfer")[1] == "100.0 (20.7–100.0)"
    h = table_rows(md, "### Harmful prompts (higher refusal preferred % and margin are safer)")
    assert h[0] == ["Variant", "harmeval:h.csv · simple refusal preferred %", "harmeval:h.csv · simple mean margin"]
    assert row(h, "SafeInfer")[2] == "+0.200"

    # only benign generation records: no ASR columns, no category tables or charts
    out = tmp_path / "benign"
    paths = report.write_report(out, {}, [gen("base", "xstest", 1, True), gen("base", "xstest", 2, False)])
    assert [p.name for p in paths] == ["report.md", "report.json"]
    md = (out / "report.md").read_text()
    assert "No harmful dataset: ASR columns omitted." in md and "Table 20" not in md
    assert row(table_rows(md, "## Table 1: attack success rate and over-refusal (generation)"), "Base")[1] == \
        "50.0 (9.5–90.5)"


def test_empty_and_error_only_inputs(tmp_path):
    paths = report.write_report(tmp_path / "empty", {"model": "m"}, [])
    assert [p.name for p in paths] == ["report.md", "report.json"]
    md = paths[0].read_text()
    assert "Records: 0" in md and "No generation records" in md and "Likelihood" not in md
    assert json.loads(paths[1].read_text())["summary"] == {"records": 0, "errors": 0, "variants": []}

    recs = [gen("base", "catqa", 1, None, "A", error="boom"), gen("base", "xstest", 1, None, error="boom"),
            lik("sa", "catqa", 1, 0.0, "A", error="boom")]
    s = report.summarize(recs)
    assert s["errors"] == 3
    cell = s["generation"]["datasets"]["catqa"]["prompt_types"]["simple"]["base"]
    assert cell["n"] == 0 and cell["errors"] == 1 and cell["asr"]["overall"]["rate"] is None
    assert s["generation"]["speed"]["base"]["tokens_per_s"] is None
    paths = report.write_report(tmp_path / "errors", {}, recs)
    assert [p.name for p in paths] == ["report.md", "report.json"]
    md = paths[0].read_text()
    assert row(table_rows(md, "## Table 1: attack success rate and over-refusal (generation)"), "Base") == \
        ["Base", "—", "—", "—"]
    json.dumps(s, allow_nan=False)


def test_unknown_variant_and_prompt_type_order():
    recs = [gen("custom", "catqa", 1, True, prompt_type="instruction"), gen("sa", "catqa", 1, True),
            gen("base", "catqa", 1, True, prompt_type="instruction"), gen("safeinfer", "catqa", 1, True)]
    s = report.summarize(recs)
    assert s["variants"] == ["base", "sa", "safeinfer", "custom"]
    assert list(s["generation"]["datasets"]["catqa"]["prompt_types"]) == ["simple", "instruction"]
    md = report.render_markdown({}, s)
    assert "| custom |" in md  # unknown variants keep their own name


def test_stale_chart_removed(tmp_path):
    report.write_report(tmp_path, {}, generation_records())
    assert (tmp_path / "refusal_vs_overrefusal.png").is_file()
    # a rerun without benign records: the old trade-off chart must not linger
    report.write_report(tmp_path, {}, [r for r in generation_records() if r["dataset"] != "xstest"])
    assert not (tmp_path / "refusal_vs_overrefusal.png").exists()
    assert (tmp_path / "asr_per_category.png").is_file()


def test_load_records_torn_and_bad_lines(tmp_path):
    a, b = {"id": "1", "measure": "generation"}, {"id": "2", "measure": "likelihood"}
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(a) + "\n\n" + json.dumps(b) + "\n")
    assert report.load_records(p) == [a, b]
    p.write_text(json.dumps(a) + "\n" + json.dumps(b)[:10])  # torn: no newline
    assert report.load_records(p) == [a]
    p.write_text(json.dumps(a) + "\n" + json.dumps(b))  # no trailing newline: treated as torn too
    assert report.load_records(p) == [a]
    p.write_text(json.dumps(a) + "\n" + '{"id": "2", "meas\n')  # invalid JSON as the last line
    assert report.load_records(p) == [a]
    p.write_text(json.dumps(a) + "\n{oops\n" + json.dumps(b) + "\n")  # bad line in the middle
    with pytest.raises(UsageError, match=r"results.jsonl:2"):
        report.load_records(p)
    p.write_text("[1, 2]\n")
    with pytest.raises(UsageError, match="not a JSON object"):
        report.load_records(p)
    p.write_text("")
    assert report.load_records(p) == []
    with pytest.raises(UsageError, match="not found"):
        report.load_records(tmp_path / "missing.jsonl")


def test_gate_section_counts_one_score_per_prompt():
    def g(variant, dataset, id, score, gated, measure="generation", prompt_type="simple"):
        return gen(variant, dataset, id, False, prompt_type=prompt_type) | {
            "measure": measure, "gate_score": score, "gated": gated, "margin": 0.0}

    recs = [g("safeinfer:gated", "catqa", 1, 0.9, False), g("safeinfer:refuse", "catqa", 1, 0.9, False),
            g("safeinfer:gated", "catqa", 1, 0.9, False, measure="likelihood"),
            g("safeinfer:gated", "catqa", 2, 0.1, True), g("safeinfer:gated", "catqa", 3, 0.6, False),
            g("safeinfer:gated", "xstest", 1, 0.2, True), g("safeinfer:gated", "xstest", 2, 0.7, False),
            g("safeinfer:gated", "catqa", 4, None, False), gen("base", "catqa", 1, False)]
    s = report.summarize(recs)["gate"]["simple"]
    assert s["catqa"]["flagged"]["n"] == 3 and s["catqa"]["flagged"]["k"] == 2  # prompt 1 once, 4 has no score
    assert s["xstest"]["flagged"]["rate"] == 0.5 and s["xstest"]["auroc_vs_benign"] is None
    # catqa scores 0.9, 0.1, 0.6 against 0.2, 0.7: pairs won 2 + 0 + 1 of 6
    assert s["catqa"]["auroc_vs_benign"] == pytest.approx(3 / 6)
    md = report.render_markdown({}, report.summarize(recs))
    rows = table_rows(md, "## The harm gate")
    assert row(rows, "catqa")[3:] == ["3", "66.7 (20.8–93.9)", "0.500"]
    assert "gate" not in report.summarize([gen("base", "catqa", 1, False)])  # no gated rows, no section
    # the same records as this version writes them (flagged = not gated where a gate ran): the same section
    new = [{k: v for k, v in r.items() if k != "gated"} | ({"flagged": not r["gated"]} if r.get("gate_score")
                                                           is not None else {"flagged": None}) for r in recs]
    assert report.summarize(new)["gate"] == report.summarize(recs)["gate"]


def test_records_written_before_the_rename_read_as_flagged(tmp_path):
    """`gated` (true: passed by the gate) in files written by earlier versions reads as `flagged` (true: judged
    harmful), and a filter output resumed by this version is rewritten all in the new form."""
    from safeinfer_local import jsonl
    from safeinfer_local.core.gate import record_flagged
    from safeinfer_local.workflows import filter as flt
    from safeinfer_local.workflows import inputs, runs

    assert record_flagged({"gate_score": 0.3, "gated": False}) is True
    assert record_flagged({"gate_score": -0.1, "gated": True}) is False
    assert record_flagged({"gate_score": None, "gated": False}) is None  # no gate ran
    assert record_flagged({"gate_score": 0.3, "flagged": True}) is True and record_flagged({}) is None
    out = tmp_path / "out.jsonl"
    old = {"id": "a", "index": 0, "prompt": "p", "response": "r", "verdict": "answered", "gate_score": -0.1,
           "gated": True}
    new = {"id": "b", "index": 1, "prompt": "q", "response": "s", "verdict": "refused", "gate_score": 0.2,
           "flagged": True}
    before = {"kind": flt.KIND, "input_sha256": "A", "settings": {"variant": "safeinfer"}}  # no "records" key
    jsonl.write_records(out, [old, new], header=before)
    # this version's header says its records' form; the older file resumes under it (read in that form)
    head = before | {"records": runs.RECORDS}
    assert len(jsonl.claim(out, head, what="filter output", upgrade=runs.upgrade_header).records) == 2
    with pytest.raises(UsageError, match="records"):  # without the upgrade the two headers differ by the form
        jsonl.claim(out, head, what="filter output")
    recs = runs.finalize(out, [inputs.Item(0, "a", "p"), inputs.Item(1, "b", "q")])
    assert [r.get("flagged") for r in recs] == [False, True] and not any("gated" in r for r in recs)
    assert "gated" not in out.read_text()
    assert jsonl.load(out).header == head  # the rewrite says so
