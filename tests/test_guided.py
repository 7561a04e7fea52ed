"""Safety-guided decoding (sGDS) with the real default model."""

import numpy as np
import pytest

from safeinfer_local.api import SafeInfer
from safeinfer_local.core.demos import REFUSAL_PROBE, qa_prompt
from safeinfer_local.decode.guidance import GuidanceSpec
from safeinfer_local.decode.sides import check_same_vocab
from safeinfer_local.errors import UsageError

from .conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.model

P = qa_prompt("How do I hotwire a car?")


def test_lambda_zero_with_plain_target_is_exactly_base(model):
    si = SafeInfer(model=model, gate="off", guidance="negative", lam=0.0)
    b = si.score(P, REFUSAL_PROBE, variant="base", raw=True)
    g = si.score(P, REFUSAL_PROBE, variant="sgds", raw=True)
    a = si.score(P, REFUSAL_PROBE, variant="sa", raw=True)
    s = si.score(P, REFUSAL_PROBE, variant="safeinfer", raw=True)
    # identical up to float32 rounding of renormalising an already normalised row
    np.testing.assert_allclose(g.token_logprobs, b.token_logprobs, atol=1e-5)
    np.testing.assert_allclose(s.token_logprobs, a.token_logprobs, atol=1e-5)
    assert a.logprob != b.logprob


def test_same_model_as_guidance_adds_no_penalty(model):
    """model:PATH guidance with the target's own file: identical distributions, so the penalty is zero."""
    si = SafeInfer(model=model, gate="off", guidance=f"model:{model.path}", lam=0.99)
    b = si.score(P, REFUSAL_PROBE, variant="base", raw=True)
    g = si.score(P, REFUSAL_PROBE, variant="sgds", raw=True)
    np.testing.assert_allclose(g.token_logprobs, b.token_logprobs, atol=1e-5)
    r = si.generate(P, variant="sgds", raw=True, max_tokens=6, temperature=0)
    assert r.guided_tokens == 0


def test_guidance_changes_distribution_and_reports_guided_tokens(model):
    si = SafeInfer(model=model, gate="off", guidance="negative", lam=0.9)
    b = si.score(P, " Sure, here is how", variant="base", raw=True)
    g = si.score(P, " Sure, here is how", variant="sgds", raw=True)
    assert g.logprob != b.logprob
    r = si.generate(P, variant="safeinfer", raw=True, max_tokens=12, temperature=0)
    assert 0 <= r.guided_tokens <= r.n_tokens
    assert sum(s.guided for s in r.steps) == r.guided_tokens


def test_prompt_guidance_prefix_is_decoded_once(model):
    si = SafeInfer(model=model, gate="off", guidance="prompt", lam=0.5)
    si.score(P, REFUSAL_PROBE, variant="sgds", raw=True)
    guide = si.batch("sgds").guide  # the guidance side score decodes on (the decoder keeps one per role)
    n_prefix = len(guide.prefix)
    assert n_prefix > 100 and guide._prefix_decoded
    first = si.score(qa_prompt("What is bread?"), " Bread is food.", variant="sgds", raw=True)
    # the cached prefix (KV sequence 0) is still there and only the request was decoded after it
    assert guide.ctx.pos[0] == n_prefix
    again = si.score(qa_prompt("What is bread?"), " Bread is food.", variant="sgds", raw=True)
    assert again.token_logprobs == first.token_logprobs


def test_vocab_check_rejects_a_different_vocabulary():
    class Fake:
        def __init__(self, toks):
            self.toks, self.n_vocab, self.path = toks, len(toks), type("P", (), {"name": "fake.gguf"})()

        def vocab_fingerprint(self):
            return self.toks

    check_same_vocab(Fake([b"a", b"b"]), Fake([b"a", b"b"]))
    with pytest.raises(UsageError, match="vocabulary of 3"):
        check_same_vocab(Fake([b"a", b"b"]), Fake([b"a", b"b", b"c"]))
    with pytest.raises(UsageError, match="at token 1"):
        check_same_vocab(Fake([b"a", b"b"]), Fake([b"a", b"x"]))


def test_guidance_spec_parsing(tmp_path):
    assert GuidanceSpec.parse(None).kind == "prompt"
    with pytest.raises(UsageError):
        GuidanceSpec.parse("wat")
    with pytest.raises(UsageError, match="not found"):
        GuidanceSpec.parse(f"model:{tmp_path}/nope.gguf")
    with pytest.raises(UsageError, match="needs a path"):
        GuidanceSpec.parse("lora")


def test_cli_bad_guidance_inputs(tmp_path):
    for lam in ("1", "-0.1", "nan"):
        assert_one_line_error(run_cli("score", P, "--gate", "off", " no", "--raw", "--variant", "sgds", "--lam", lam),
                              contains="lam")
    assert_one_line_error(run_cli("generate", "hi", "--guidance", "bogus"), contains="unknown guidance")
    assert_one_line_error(run_cli("generate", "hi", "--guidance", "model:/nope.gguf"), contains="not found")
    bad = tmp_path / "lora.gguf"
    import gguf

    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 1.0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((1, 16), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((16, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("generate", P, "--gate", "off", "--raw", "--variant", "sgds", "--guidance",
                                  f"lora:{bad}", "-n", "2"),
                          contains="LoRA")


def test_shared_prompt_head_matches_decoding_it(model):
    """With negative guidance the unsteered prompt head is decoded once and its KV copied to the guidance side;
    the guidance logits must match decoding the head there (up to thread-count rounding)."""
    from safeinfer_local.decode.batch import GenConfig
    from safeinfer_local.decode.steering import position_buffers

    si = SafeInfer(model=model, gate="off", guidance="negative", lam=0.5)
    toks = model.tokenize(P)
    gen = si.batch("safeinfer")
    target, guide = gen.target, gen.guide
    assert target.shares_head_with(guide, gen.tbuf, gen.gbuf)
    direct = guide.decode_slots([(0, guide.begin(0, toks, gen.gbuf[0]))], gen.gbuf[1])[0]
    gen.insert("k", toks, GenConfig(max_tokens=2, temperature=0))
    assert gen.admit() == []  # the head is decoded on the target and its KV imported into the guidance slot
    assert guide.ctx.pos[guide.slot_seq(0)] == len(toks) - 1
    copied = guide.decode_slots([(0, toks[-1:])], gen.gbuf[1])[0]
    np.testing.assert_allclose(copied, direct, atol=2e-3)
    # a vector on the head (positions "all") must not share
    all_buf = position_buffers(si.steering.__class__.from_vector(si.vector, model, 0.5, None, "all"), model.n_layer)
    assert not target.shares_head_with(guide, all_buf, gen.gbuf)


def _write_lora(path, b_scale):
    """A rank-1 LoRA on block 0's attn_q for Gemma 3 270M (B = 0 makes it a no-op)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 1.0)
    rng = np.random.default_rng(0)
    w.add_tensor("blk.0.attn_q.weight.lora_a", rng.normal(size=(1, 640)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", (rng.normal(size=(1024, 1)) * b_scale).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_lora_guidance_applies_to_the_guidance_side_only(model, tmp_path):
    zero = _write_lora(tmp_path / "zero.gguf", 0.0)
    si = SafeInfer(model=model, gate="off", guidance=f"lora:{zero}", lam=0.99)
    b = si.score(P, REFUSAL_PROBE, variant="base", raw=True)
    g = si.score(P, REFUSAL_PROBE, variant="sgds", raw=True)
    np.testing.assert_allclose(g.token_logprobs, b.token_logprobs, atol=1e-4)  # a no-op adapter: no penalty
    strong = _write_lora(tmp_path / "strong.gguf", 5.0)
    si2 = SafeInfer(model=model, gate="off", guidance=f"lora:{strong}", lam=0.9)
    g2 = si2.score(P, REFUSAL_PROBE, variant="sgds", raw=True)
    b2 = si2.score(P, REFUSAL_PROBE, variant="base", raw=True)
    assert abs(g2.logprob - b2.logprob) > 0.01  # the adapter changed the guidance distribution
    assert b2.token_logprobs == b.token_logprobs  # and the target's weights are untouched


def test_prompt_longer_than_context_is_a_usage_error():
    long = "word " * 400
    for v in ("base", "safeinfer"):
        assert_one_line_error(run_cli("generate", long, "--gate", "off", "--raw", "--variant", v, "--n-ctx", "256",
                                      "-n", "2"),
                              contains="context")


def test_guidance_model_with_another_vocabulary_is_refused(model, tmp_path):
    """A copy of the default model whose token 1000 is spelled differently: same size, another vocabulary."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(model.path))
    tokens = list(reader.get_field("tokenizer.ggml.tokens").contents())
    tokens[1000] = tokens[1000] + "_x"
    out = tmp_path / "other-vocab.gguf"
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    new = {"tokenizer.ggml.tokens": MetadataDetails(gguf.GGUFValueType.ARRAY, tokens,
                                                    sub_type=gguf.GGUFValueType.STRING)}
    copy_with_new_metadata(reader, writer, new, [])
    line = assert_one_line_error(run_cli("score", P, "--gate", "off", " no", "--raw", "--variant", "sgds", "--guidance",
                                         f"model:{out}"), contains="vocabulary")
    assert "token 1000" in line
