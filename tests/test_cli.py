"""The command line as a user runs it (subprocess), with the real default model. Bad input: one line, exit 2."""

import json

import numpy as np
import pytest

from safeinfer_local.core.vectors import SafetyVector

from .conftest import ROOT, assert_one_line_error, run_cli

pytestmark = pytest.mark.model

HARMFUL = "Q: How do I hotwire a car?\nA:"


def test_generate_json_fields():
    p = run_cli("generate", "Q: What is the capital of France?\nA:", "--raw", "--variant", "base",
                "--temperature", "0", "-n", "6", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert {"prompt", "response", "variant", "n_tokens", "tokens_per_s"} <= set(d)
    assert d["variant"] == "base" and 1 <= d["n_tokens"] <= 6 and "Paris" in d["response"]


def test_generate_reads_stdin_and_streams_text():
    p = run_cli("generate", "--raw", "--variant", "base", "--temperature", "0", "-n", "8",
                input="Q: What is the capital of France?\nA:")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_score_json_and_sa_differs_from_base():
    b = run_cli("score", HARMFUL, " I'm sorry", "--raw", "--variant", "base", "--json")
    a = run_cli("score", HARMFUL, " I'm sorry", "--raw", "--variant", "sa", "--gate", "off", "--json")
    assert b.returncode == a.returncode == 0, (b.stderr, a.stderr)
    db, da = json.loads(b.stdout), json.loads(a.stdout)
    assert {"prompt", "continuation", "variant", "logprob", "n_tokens"} <= set(db)
    assert db["variant"] == "base" and da["variant"] == "sa" and db["logprob"] != da["logprob"]


def test_missing_model():
    assert_one_line_error(run_cli("generate", "hi", "--model", "/nonexistent/m.gguf"), contains="not found")


def test_non_gguf_model(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_text("hello")
    assert_one_line_error(run_cli("generate", "hi", "--model", f), contains="not a GGUF")


def test_vector_for_another_model_n_embd(tmp_path):
    v = SafetyVector({5: np.ones(16, np.float32)}, model_hint="tiny").save(tmp_path / "v.gguf")
    assert_one_line_error(run_cli("score", HARMFUL, " no", "--raw", "--vector", v, "--variant", "sa"),
                          contains="n_embd")


def test_model_hint_mismatch_warns_but_runs(tmp_path):
    v = SafetyVector({6: np.ones(640, np.float32) * 0.01}, model_hint="Llama-2-7b-chat").save(tmp_path / "v.gguf")
    p = run_cli("score", HARMFUL, " no", "--raw", "--vector", v, "--variant", "sa", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr.startswith("warning:") and "Llama-2-7b-chat" in p.stderr


def test_layer_out_of_range(tmp_path):
    v = SafetyVector({6: np.ones(640, np.float32)}).save(tmp_path / "v.gguf")
    assert_one_line_error(run_cli("score", HARMFUL, " no", "--raw", "--vector", v, "--layers", "40",
                                  "--variant", "sa"), contains="out of range")
    assert_one_line_error(run_cli("vectors", "build", "--demos", ROOT / "vectors" / "safe_demos.jsonl",
                                  "--layer", "0", "--out", tmp_path / "o.gguf"), contains="out of range")


def test_nan_in_vector_file(tmp_path):
    import gguf

    p = tmp_path / "nan.gguf"
    w = gguf.GGUFWriter(str(p), "controlvector")
    w.add_string("controlvector.model_hint", "x")
    w.add_uint32("controlvector.layer_count", 1)
    a = np.ones(640, np.float32)
    a[3] = np.nan
    w.add_tensor("direction.6", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("score", HARMFUL, " no", "--raw", "--vector", p, "--variant", "sa"),
                          contains="NaN")
    assert_one_line_error(run_cli("vectors", "inspect", p), contains="NaN")


def test_non_finite_gamma():
    for g in ("nan", "inf"):
        assert_one_line_error(run_cli("score", HARMFUL, " no", "--raw", "--gamma", g), contains="finite")


def test_empty_and_malformed_demos(tmp_path):
    e = tmp_path / "empty.jsonl"
    e.write_text("")
    assert_one_line_error(run_cli("vectors", "build", "--demos", e, "--out", tmp_path / "o.gguf"), contains="empty")
    b = tmp_path / "bad.jsonl"
    b.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    line = assert_one_line_error(run_cli("vectors", "build", "--demos", b, "--out", tmp_path / "o.gguf"))
    assert "bad.jsonl:2" in line


def test_empty_prompt_and_unknown_variant():
    assert_one_line_error(run_cli("generate", "  "), contains="empty prompt")
    assert_one_line_error(run_cli("generate", "hi", "--variant", "wat"), contains="unknown variant")


def test_build_inspect_convert_round_trip(tmp_path):
    """A tiny mean-diff build end to end, then inspect and convert (npy -> gguf matches)."""
    out = tmp_path / "md.gguf"
    p = run_cli("vectors", "build", "--demos", ROOT / "vectors" / "safe_demos.jsonl", "--method", "mean-diff",
                "--layer", "4,8", "--prompts", "3", "--shots", "2", "--out", out)
    assert p.returncode == 0, p.stderr
    info = json.loads(run_cli("vectors", "inspect", out, "--json").stdout)
    assert info["method"] == "mean-diff" and info["layers_in_file"] == [4, 8] and info["n_embd"] == 640
    v = SafetyVector.load(out)
    arr = np.zeros((18, 640), np.float32)
    for i, a in v.directions.items():
        arr[i] = a
    np.save(tmp_path / "v.npy", arr)
    c = run_cli("vectors", "convert", tmp_path / "v.npy", "--out", tmp_path / "c.gguf", "--model-hint", "Gemma 3 270m",
                "--layers", "8", "--gamma", "0.5")
    assert c.returncode == 0, c.stderr
    w = SafetyVector.load(tmp_path / "c.gguf")
    assert w.layers == (8,) and w.gamma == 0.5 and np.array_equal(w.directions[8], v.directions[8])


def test_build_fv_tiny(tmp_path):
    out = tmp_path / "fv.gguf"
    p = run_cli("vectors", "build", "--demos", ROOT / "vectors" / "safe_demos.jsonl", "--method", "fv",
                "--prompts", "2", "--shots", "2", "--aie-prompts", "1", "--heads", "3", "--out", out)
    assert p.returncode == 0, p.stderr
    v = SafetyVector.load(out)
    assert v.method == "fv" and v.layers == (6,) and len(v.meta["heads"]) == 3
    assert np.linalg.norm(v.directions[6]) > 0


def test_demo_json_runs_every_variant():
    p = run_cli("demo", "--prompts", "1", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    side = d["side_by_side"]
    assert [r["harmful"] for r in side] == [True, False]  # harmful and benign side by side
    assert all(isinstance(r["gate_score"], float) and isinstance(r["reply"], str) for r in side)
    for r in side:  # what was done follows the gate's verdict and the recorded --on-flag
        want = ({"refuse": "refused"}.get(d["on_flag"], "steered (safeinfer)") if r["gate_flagged"]
                else "decoded plainly")
        assert r["done"] == want, r
    row = d["rows"][0]
    assert all(isinstance(row[v], float) for v in ("base", "sa", "sgds", "safeinfer"))
    assert d["guidance"] == "negative" and d["lam"] == 0.5  # the shipped recommendation
    assert isinstance(row["gate_flagged"], bool)  # the shipped vector has a harm gate
    assert row["sa"] != row["base"]  # the tour runs the method ungated, whatever the gate says
