"""Chunked prefill (``BatchGenerator.prefill_chunk``): a long prompt that arrives while others run is decoded a
piece per step between their steps, so they keep producing tokens; alone, a prompt is admitted whole as before."""

import pytest

from safeinfer_local.api import SafeInfer
from safeinfer_local.decode.batch import GenConfig

pytestmark = pytest.mark.model

LONG = "The printing press changed how books were made and who could read them. " * 12 + "Summarise this."


def _admit_long(gen, si, chunk_tokens):
    """One stream running, then the long prompt: (steps until its reply ends, stream tokens meanwhile, its
    first token, its reply)."""
    cfg = GenConfig(max_tokens=200, temperature=0)
    gen.insert("s", si.encode_prompt("Tell me about the sea.")[0], cfg)
    for _ in range(3):
        gen.step()
    gen.insert("long", chunk_tokens, GenConfig(max_tokens=6, temperature=0), LONG)
    steps, stream_tokens, first, reply = 0, 0, None, None
    while reply is None:
        events = gen.step()
        steps += 1
        stream_tokens += sum(1 for e in events if e.key == "s" and e.step is not None)
        if first is None:
            first = next((e.step.token for e in events if e.key == "long" and e.step is not None), None)
        reply = next((e.result for e in events if e.key == "long" and e.result is not None), None)
        if steps > 400:
            raise AssertionError("the long prompt never finished")
    assert gen.remove("s")
    return steps, stream_tokens, first, reply


@pytest.mark.parametrize(("variant", "layout", "guidance"), [
    ("base", "split", None), ("safeinfer", "split", None), ("safeinfer", "split", "prompt"),
    ("safeinfer", "shared", "negative")])
def test_a_long_prompt_is_prefilled_in_pieces_while_a_stream_runs(si, variant, layout, guidance):
    # shared: negative guidance, both sides in one context, the pieces in the step's llama_decode with their rows'
    # own vector state; prompt: both split sides carry a prefix of demonstrations
    s = si.with_(gate="off", guidance=guidance)
    toks = s.encode_prompt(LONG)[0]
    chunk = 16
    whole_steps, _, whole_first, _ = _admit_long(s.batch(variant, slots=2, layout=layout), s, toks)
    steps, stream_tokens, first, pieces = _admit_long(s.batch(variant, slots=2, layout=layout, prefill_chunk=chunk), s,
                                               toks)
    n_pieces = -(-(len(toks) - 1) // chunk)
    if variant == "safeinfer" and layout == "split":
        # head and steps in different vector states: steered per row with pieces on (so a piece rides in the
        # step's decode), by llama.cpp's per-context control vector without
        assert s.batch(variant, slots=2, layout=layout).target.shared is None
        chunked = s.batch(variant, slots=2, layout=layout, prefill_chunk=chunk)
        assert chunked.target.shared is not None
        assert bool(chunked.target.prefix) == (guidance == "prompt")
    # whole: the head is decoded inside one step; in pieces: one piece per step, the stream stepping each time
    assert whole_steps < n_pieces <= steps
    assert stream_tokens >= n_pieces - 1
    assert pieces.n_tokens > 0
    if variant == "base":  # plain decoding's first token is stable across head layouts on this prompt; the guided
        assert first == whole_first  # one is not: sGDS's choice moves with head KV rounding (batch of 16 or 179)


def test_a_prompt_alone_is_admitted_whole_and_a_prefilling_one_can_be_removed(si):
    s = si.with_(gate="off")
    toks = s.encode_prompt(LONG)[0]
    gen = s.batch("base", slots=2, layout="split", prefill_chunk=8)
    gen.insert("alone", toks, GenConfig(max_tokens=2, temperature=0))
    events = gen.step()  # nothing else runs: the head decodes whole and the first token comes at once
    assert any(e.key == "alone" and e.step is not None for e in events)
    gen.remove("alone")
    gen.insert("s", s.encode_prompt("Hi there.")[0], GenConfig(max_tokens=50, temperature=0))
    gen.step()
    gen.insert("long", toks, GenConfig(max_tokens=2, temperature=0))
    gen.step()
    assert gen.n_active == 2 and gen.remove("long") and gen.n_active == 1  # its slot is free again
    assert gen.remove("s") and not gen
    with pytest.raises(ValueError):
        SafeInfer.batch(s, "base", slots=1, prefill_chunk=-1)


def test_a_prefixed_side_steered_per_row_decodes_as_with_the_context_vector(si):
    # prompt guidance with pieces on: the target (safe demonstrations as prefix, SA vector on its steps) is steered
    # per row in a context of its own; a request alone is admitted whole, so its greedy reply must equal the one
    # decoded with llama.cpp's control vector (a prefix steered, or a slot sequence off by one, would change it)
    s = si.with_(gate="off", guidance="prompt")
    toks = s.encode_prompt("How can I use someone else's identity to commit loan fraud?")[0]
    replies = []
    for chunk in (0, 16):
        gen = s.batch("safeinfer", slots=2, layout="split", prefill_chunk=chunk)
        assert (gen.target.shared is not None) == bool(chunk) and gen.target.prefix
        assert not chunk or gen.target.shared.blocks  # the vector is added per row there
        gen.insert(0, toks, GenConfig(max_tokens=24, temperature=0))
        result = None
        while gen:
            result = next((e.result for e in gen.step() if e.result is not None), result)
        replies.append((result.response, result.guided_tokens))
    assert replies[0] == replies[1]
    assert replies[0][1] > 0  # guidance changed tokens: both sides' prefixes mattered
    unsteered = s.generate("How can I use someone else's identity to commit loan fraud?", "sgds", max_tokens=24,
                           temperature=0)  # the same two prefixes, no vector on the target
    assert unsteered.response != replies[0][0]  # and so did the target's vector
