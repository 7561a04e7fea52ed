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


@pytest.mark.parametrize(("variant", "layout"), [("base", "split"), ("safeinfer", "split"), ("safeinfer", "shared")])
def test_a_long_prompt_is_prefilled_in_pieces_while_a_stream_runs(si, variant, layout):
    # shared: negative guidance, both sides in one context, the pieces in the step's llama_decode with their rows'
    # own vector state
    s = si.with_(gate="off", guidance="negative" if layout == "shared" else None)
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
        assert s.batch(variant, slots=2, layout=layout, prefill_chunk=chunk).target.shared is not None
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
