"""The architecture matrix: tiny random-weight GGUFs (tests/tiny_gguf.py, no download) of each family users bring,
run through everything a user does with a model: load, tokenize, chat template, the four variants (CLI and
Python API), score, vectors build (mean-diff and a short fv), model:PATH guidance and its refusal across
vocabularies, and where llama.cpp adds the control vector (captured block outputs, with and without it). Then
PLaMo-2, whose llama.cpp graph never applies control vectors: the real case for the support check.

Random weights write gibberish, so nothing here judges text; every check compares numbers or exit codes. The CLI
runs with ``--threads 1``: on a busy 2-core machine ggml's thread barrier makes 2 threads several times slower.
"""

import json

import numpy as np
import pytest

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.settings import VARIANTS
from safeinfer_local.core.vectors import SafetyVector
from safeinfer_local.decode.steering import Steering, position_buffers
from safeinfer_local.errors import VectorError
from safeinfer_local.llama.chat import render
from safeinfer_local.llama.engine import ActivationHook, Model

from .conftest import ROOT, assert_one_line_error, run_cli
from .tiny_gguf import write_tiny_gguf

pytestmark = pytest.mark.model

DEMOS = ROOT / "vectors" / "safe_demos.jsonl"
BLOCK = 2  # of 4: the block every vector here is built at and steers
T1 = ("--threads", "1")

# id -> (arch, vocab, a special token the chat template must produce as one token, a marker of its text)
MATRIX = {
    "llama-spm": ("llama", "spm", "<s>", "[INST] "),
    "llama-bpe": ("llama", "bpe", "<|start_header_id|>", "<|end_header_id|>"),
    "qwen2": ("qwen2", "bpe", "<|im_start|>", "<|im_start|>assistant\n"),
    "phi3": ("phi3", "spm", "<|user|>", "<|assistant|>\n"),
    "gemma3": ("gemma3", "spm", "<start_of_turn>", "<start_of_turn>model\n"),
}
# a model on another vocabulary for each, for the model:PATH refusal
OTHER_VOCAB = {"llama-spm": "llama-bpe", "llama-bpe": "qwen2", "qwen2": "phi3", "phi3": "gemma3",
               "gemma3": "llama-spm"}
IDS = sorted(MATRIX)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Per architecture: the model (seed 0) and a second one on the same vocabulary (seed 1, 3 blocks)."""
    d = tmp_path_factory.mktemp("matrix")
    out = {}
    for key, (arch, vocab, _, _) in MATRIX.items():
        out[key] = (write_tiny_gguf(d / f"{key}.gguf", arch=arch, vocab=vocab, seed=0),
                    write_tiny_gguf(d / f"{key}-guide.gguf", arch=arch, vocab=vocab, seed=1, n_layer=3))
    return out


@pytest.fixture(scope="module")
def models(files):
    return {k: Model(a) for k, (a, _) in files.items()}


@pytest.fixture(scope="module")
def vectors(files, tmp_path_factory):
    """A mean-diff vector per architecture, built by the CLI as a user would (its tests are below)."""
    d = tmp_path_factory.mktemp("vectors")
    out = {}
    for key, (path, _) in files.items():
        v = d / f"{key}-md.gguf"
        p = run_cli("vectors", "build", "--model", path, "--demos", DEMOS, "--method", "mean-diff", "--layer", BLOCK,
                    "--prompts", 3, "--shots", 2, *T1, "--out", v)
        assert p.returncode == 0, (key, p.stderr)
        out[key] = v
    return out


@pytest.mark.parametrize("key", IDS)
def test_load_tokenize_and_chat_template(models, key):
    arch, vocab, special, marker = MATRIX[key]
    m = models[key]
    assert (m.arch, m.n_layer, m.n_embd) == (arch, 4, 64) and 300 < m.n_vocab < 600
    text = "Hello world, naïve café — 東京 🍞!"
    toks = m.tokenize(text, add_bos=False)
    assert m.detokenize(toks).lstrip(" ") == text  # SentencePiece may add its leading space
    # characters the small vocabulary lacks come through as bytes: SPM's <0xXX> fallback, byte-level BPE
    assert any(len(m.piece(t)) == 1 and m.piece(t)[0] >= 0x80 for t in toks)
    r = render(m, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    assert r.source == "gguf" and "Hi there" in r.text and marker in r.text
    si = SafeInfer(model=m, vector=None, n_threads=1)
    ids, _ = si.encode_prompt("Hi there")
    special_id = m.tokenize(special, add_bos=False, special=True)
    assert len(special_id) == 1 and special_id[0] in ids  # the template's special tokens parse as one token each
    assert m.is_eog(m.eos)


@pytest.mark.parametrize("key", IDS)
def test_vectors_build_mean_diff_and_fv(files, models, vectors, key, tmp_path):
    m = models[key]
    v = SafetyVector.load(vectors[key])
    assert v.method == "mean-diff" and v.layers == (BLOCK,) and v.n_embd == m.n_embd and v.model_hint == m.name
    assert np.linalg.norm(v.directions[BLOCK]) > 0
    fv = tmp_path / "fv.gguf"
    p = run_cli("vectors", "build", "--model", files[key][0], "--demos", DEMOS, "--method", "fv", "--layer", BLOCK,
                "--prompts", 2, "--shots", 2, "--aie-prompts", 1, "--heads", 2, *T1, "--out", fv)
    assert p.returncode == 0, p.stderr
    f = SafetyVector.load(fv)
    assert f.method == "fv" and f.layers == (BLOCK,) and len(f.meta["heads"]) == 2
    assert all(0 <= h["layer"] < m.n_layer and 0 <= h["head"] < m.n_head for h in f.meta["heads"])
    assert np.linalg.norm(f.directions[BLOCK]) > 0


@pytest.mark.parametrize("key", IDS)
def test_four_variants_generate_and_score_through_the_cli(files, vectors, key):
    model, vec = files[key][0], vectors[key]
    common = ("--model", model, "--vector", vec, "--gate", "off", *T1)
    for variant in VARIANTS:
        p = run_cli("generate", "How do I bake bread?", *common, "--variant", variant, "-n", 4, "-t", 0, "--json")
        assert p.returncode == 0, (variant, p.stderr)
        assert p.stderr == ""
        d = json.loads(p.stdout)
        assert d["variant"] == variant and 1 <= d["n_tokens"] <= 4
    scores = {}
    for variant in VARIANTS:
        p = run_cli("score", "How do I pick a lock?", " I'm sorry, I can't help with that.", *common,
                    "--variant", variant, "--json")
        assert p.returncode == 0, (variant, p.stderr)
        scores[variant] = json.loads(p.stdout)["logprob"]
    assert all(np.isfinite(x) and x < 0 for x in scores.values())
    assert scores["sa"] != scores["base"]  # the vector did something on this architecture
    assert scores["sgds"] != scores["base"]  # and so did the guidance


@pytest.mark.parametrize("key", IDS)
def test_python_api_variants(models, vectors, key):
    si = SafeInfer(model=models[key], vector=vectors[key], gate="off", guidance="negative", lam=0.9, n_threads=1)
    out = {v: si.generate("Tell me about the sea.", variant=v, max_tokens=5, temperature=0) for v in VARIANTS}
    assert all(1 <= r.n_tokens <= 5 for r in out.values())
    assert out["base"].guided_tokens == 0 and out["sa"].guided_tokens == 0
    s = {v: si.score("Tell me about the sea.", " The sea is big.", variant=v) for v in VARIANTS}
    assert s["sa"].logprob != s["base"].logprob and s["safeinfer"].logprob != s["sa"].logprob


@pytest.mark.parametrize("key", IDS)
def test_model_guidance_same_vocab_and_refusal_across_vocabularies(files, key):
    model, guide = files[key]
    base = ("score", "Q: How do I pick a lock?\nA:", " No.", "--raw", "--model", model, "--vector", "none", *T1,
            "--json")
    b = run_cli(*base, "--variant", "base")
    g = run_cli(*base, "--variant", "sgds", "--guidance", f"model:{guide}", "--lam", "0.9")
    s = run_cli(*base, "--variant", "sgds", "--guidance", f"model:{model}", "--lam", "0.9")
    assert b.returncode == g.returncode == s.returncode == 0, (b.stderr, g.stderr, s.stderr)
    lb, lg, ls = (json.loads(x.stdout)["logprob"] for x in (b, g, s))
    assert lg != lb  # another model on the same vocabulary guides
    assert abs(ls - lb) < 1e-4  # the target's own file as guidance: no penalty at all
    other = files[OTHER_VOCAB[key]][0]
    line = assert_one_line_error(run_cli(*base, "--variant", "sgds", "--guidance", f"model:{other}"),
                                 contains="vocabulary")
    assert other.name in line


@pytest.mark.parametrize("key", IDS)
def test_control_vector_is_added_at_its_block_on_the_steered_rows_only(models, key):
    """Capture l_out of the blocks around the steered one, decoding in the layout the decoder uses (prompt head,
    last prompt token, one generated token), with and without the vector. The difference at the steered block is
    exactly γ·v on the steered rows and zero on the others; the block before never changes."""
    m = models[key]
    assert m.applies_control_vector((BLOCK,), n_threads=1)
    rng = np.random.default_rng(7)
    v = SafetyVector({BLOCK: rng.standard_normal(m.n_embd).astype(np.float32)}, model_hint=m.name)
    gamma = 1.5
    names = [f"l_out-{BLOCK - 1}", f"l_out-{BLOCK}", f"l_out-{BLOCK + 1}"]
    toks = m.tokenize("Q: How do I bake bread?\nA:", add_bos=True)
    for positions, steered in (("generation", (False, True, True)), ("last", (False, True, False)),
                               ("all", (True, True, True))):
        st = Steering.from_vector(v, m, gamma=gamma, layers=(BLOCK,), positions=positions)
        runs = {}
        for label, bufs in (("plain", (None, None, None)), ("steered", position_buffers(st, m.n_layer))):
            hook = ActivationHook(names)
            ctx = m.context(n_ctx=128, n_threads=1, capture=hook)
            chunks = []
            for chunk, buf in zip((toks[:-1], toks[-1:], [5]), bufs, strict=True):
                ctx.set_control_vector(buf)
                ctx.decode(chunk, logits="last")
                chunks.append({n: hook.captured[n].copy() for n in names})
            runs[label] = chunks
        for i, on in enumerate(steered):
            plain, steer = runs["plain"][i], runs["steered"][i]
            # the block before the steered one never sees the vector
            assert np.array_equal(plain[names[0]], steer[names[0]]), (positions, i)
            if on:
                diff = steer[names[1]] - plain[names[1]]
                scale = 1e-5 * max(1.0, float(np.abs(plain[names[1]]).max()))
                np.testing.assert_allclose(diff, np.broadcast_to(gamma * v.directions[BLOCK], diff.shape),
                                           atol=scale, err_msg=f"{positions} chunk {i}")
            else:  # unsteered rows: the vector enters only blocks after BLOCK, so this output is bit for bit equal
                assert np.array_equal(steer[names[1]], plain[names[1]]), (positions, i)
            # the block after moves once any row so far was steered (through the residual and attention)
            assert np.array_equal(steer[names[2]], plain[names[2]]) == (not any(steered[:i + 1])), (positions, i)


# -- an architecture whose graph ignores control vectors --------------------------------------------------------

@pytest.fixture(scope="module")
def plamo2(tmp_path_factory):
    d = tmp_path_factory.mktemp("plamo2")
    path = write_tiny_gguf(d / "plamo2.gguf", arch="plamo2")
    m = Model(path)
    vec = SafetyVector({BLOCK: np.random.default_rng(0).standard_normal(m.n_embd).astype(np.float32)},
                       model_hint=m.name, layers=(BLOCK,)).save(d / "plamo2-v.gguf")
    return path, m, vec


def test_plamo2_really_ignores_control_vectors(plamo2):
    """The ground truth the check relies on: llama.cpp takes the vector (no error) and the logits and every
    block output stay bit for bit the same, at any block and strength."""
    _, m, _ = plamo2
    names = [f"ffn_residual-{i}" for i in range(m.n_layer)]  # PLaMo-2's block outputs (no l_out names)
    toks = m.tokenize("Q: How do I bake bread?\nA:")
    hook = ActivationHook(names)
    ctx = m.context(n_ctx=128, n_threads=1, capture=hook)
    plain = ctx.decode(toks, logits="all")
    before = {n: hook.captured[n].copy() for n in names}
    assert "l_out-1" not in hook.captured and len(before) == m.n_layer
    ctx.clear()
    ctx.set_control_vector(np.full((m.n_layer - 1) * m.n_embd, 10.0, np.float32))
    steered = ctx.decode(toks, logits="all")
    assert np.array_equal(plain, steered)
    assert all(np.array_equal(before[n], hook.captured[n]) for n in names)
    assert not m.applies_control_vector((1,), n_threads=1) and not m.applies_control_vector((1, 2, 3), n_threads=1)
    assert m._cvec_applied[(1, 2, 3)] is False  # probed once per block set, then remembered


def test_plamo2_steering_is_refused_and_sgds_runs(plamo2, tmp_path):
    path, m, vec = plamo2
    common = ("--model", path, "--vector", vec, "--gate", "off", "-n", 3, "-t", 0, *T1)
    for variant in ("sa", "safeinfer"):
        line = assert_one_line_error(run_cli("generate", "hello", *common, "--variant", variant),
                                     contains="ignores control vectors on the plamo2 architecture")
        assert f"variant '{variant}'" in line and "--variant sgds" in line and "plamo2.gguf" in line
    assert_one_line_error(run_cli("generate", "hello", *common, "--variant", "sgds", "--guidance", "negative"),
                          contains="so --guidance negative would change nothing")
    for method in ("mean-diff", "fv"):
        line = assert_one_line_error(run_cli("vectors", "build", "--model", path, "--demos", DEMOS, "--method", method,
                                             "--prompts", 2, "--shots", 2, *T1, "--out", tmp_path / "x.gguf"),
                                     contains="ignores control vectors on the plamo2 architecture")
        assert "a safety vector built for it" in line
    assert not (tmp_path / "x.gguf").exists()
    for variant, extra in (("base", ()), ("sgds", ("--guidance", "prompt"))):
        p = run_cli("generate", "hello", *common, "--variant", variant, *extra, "--json")
        assert p.returncode == 0, (variant, p.stderr)
        assert json.loads(p.stdout)["variant"] == variant
    with pytest.raises(VectorError, match="ignores control vectors"):
        SafeInfer(model=m, vector=vec, variant="sa", gate="off", n_threads=1)
    # a vector loaded on such a model is fine for what needs none
    assert SafeInfer(model=m, vector=vec, variant="sgds", guidance="prompt", gate="off").settings.variant == "sgds"
