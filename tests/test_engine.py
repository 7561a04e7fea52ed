"""The engine against the real default model through llama.cpp."""

import ctypes

import numpy as np
import pytest

from safeinfer_local.core.vectors import SafetyVector
from safeinfer_local.llama.engine import ActivationHook, Detokenizer

pytestmark = pytest.mark.model


def test_model_facts(model):
    assert (model.n_vocab, model.n_embd, model.n_layer, model.arch) == (262144, 640, 18, "gemma3")
    assert model.chat_template() is None  # the base model ships no template: chat uses the fallback


def test_incremental_detokenize_utf8(model):
    text = "naïve café — 東京 🍞 ok"
    toks = model.tokenize(text, add_bos=False)
    d = Detokenizer(model)
    pieces = [d.add(t) for t in toks] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_two_sequences_in_one_batch(model):
    ctx = model.context(n_ctx=512, n_seq_max=2)
    a = model.tokenize("Q: What is bread?\nA:")
    b = model.tokenize("The capital of France is")
    la, lb = ctx.decode_multi([(0, a), (1, b)])
    one = model.context(n_ctx=512)
    ra = one.decode(a)
    one.clear()
    rb = one.decode(b)
    # same argmax; values may differ slightly (llama.cpp is not batch invariant)
    assert np.argmax(la) == np.argmax(ra) and np.argmax(lb) == np.argmax(rb)
    assert ctx.pos == [len(a), len(b)]


def test_capture_names_and_shapes(model):
    hook = ActivationHook({"l_out-3", "kqv_out-3", "l_out-17"})
    ctx = model.context(n_ctx=256, capture=hook)
    toks = model.tokenize("Q: hello\nA:")
    ctx.decode(toks)
    assert hook.captured["l_out-3"].shape == (len(toks), 640)
    assert hook.captured["kqv_out-3"].shape == (len(toks), model.n_head * model.head_dim())
    assert hook.captured["l_out-17"].shape[1] == 640


def test_hook_stop_if_cuts_the_graph_after_that_tensor(model):
    """``stop_if`` true at a tensor: the tensor is captured as without it and nothing after it is computed (the gate's
    reader reads block 8 of 18 this way); the decode still succeeds, and a hook without it reaches the last block."""
    toks = model.tokenize("Q: hello\nA:")
    hook = ActivationHook({"l_out-3", "l_out-10"})
    ctx = model.context(n_ctx=256, capture=hook)
    ctx.decode(toks, logits="none")
    full = {k: v.copy() for k, v in hook.captured.items()}
    ctx.clear()
    hook.captured = {}
    hook.stop_if = lambda name: name == "l_out-3"
    ctx.decode(toks, logits="none")
    assert set(hook.captured) == {"l_out-3"}  # block 10 was never computed
    np.testing.assert_array_equal(hook.captured["l_out-3"], full["l_out-3"])
    # stop_if: decided from what was captured (the gate's reader cuts a flagged prompt's last decode this way)
    asked = []
    hook.stop_if = lambda name: asked.append(name) or name == "l_out-3"
    ctx.clear()
    hook.captured = {}
    ctx.decode(toks, logits="none")
    assert asked == ["l_out-3"] and set(hook.captured) == {"l_out-3"}
    hook.stop_if = lambda name: False  # never cut: block 10 is reached
    ctx.clear()
    ctx.decode(toks, logits="none")
    assert set(hook.captured) == {"l_out-3", "l_out-10"}


def test_control_vector_adds_to_block_output(model):
    rng = np.random.default_rng(0)
    v = SafetyVector({6: rng.normal(size=640).astype(np.float32)})
    hook = ActivationHook({"l_out-6"})
    ctx = model.context(n_ctx=256, capture=hook)
    toks = model.tokenize("Q: hello\nA:")
    ctx.decode(toks)
    before = hook.captured["l_out-6"][-1].copy()
    ctx.clear()
    ctx.set_control_vector(v.buffer(model.n_layer, 2.0))
    ctx.decode(toks)
    np.testing.assert_allclose(hook.captured["l_out-6"][-1] - before, 2.0 * v.directions[6], atol=1e-3)


def test_same_file_same_logits_as_raw_llama_cpp_loader_rules(model, tmp_path):
    """Our engine applying a vector file == raw llama_set_adapter_cvec with the buffer built by the rules of
    llama.cpp's common/ loader (n_embd * max_layer floats, direction.N at row N-1, times the scale)."""
    import gguf
    import llama_cpp

    rng = np.random.default_rng(1)
    path = SafetyVector({4: rng.normal(size=640), 9: rng.normal(size=640)}, layers=(4, 9)).save(tmp_path / "v.gguf")
    scale = 0.7
    toks = model.tokenize("Q: How do I pick a lock?\nA:")

    ours = model.context(n_ctx=256)
    ours.set_control_vector(SafetyVector.load(path).buffer(model.n_layer, scale))
    lo = ours.decode(toks, logits="all")

    r = gguf.GGUFReader(str(path))
    dirs = {int(t.name.split(".")[1]): np.asarray(t.data, np.float32) for t in r.tensors}
    max_layer = max(dirs)
    data = np.zeros(640 * max_layer, np.float32)
    for n, d in dirs.items():
        data[640 * (n - 1):640 * n] += scale * d
    raw = model.context(n_ctx=256)
    rc = llama_cpp.llama_set_adapter_cvec(raw._ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                          data.size, 640, 1, model.n_layer)
    assert rc == 0
    lr = raw.decode(toks, logits="all")
    assert np.array_equal(lo, lr)
    plain = model.context(n_ctx=256).decode(toks, logits="all")
    assert np.abs(plain - lo).max() > 0.1  # the vector really changed something


def test_context_overflow_is_a_usage_error(model):
    from safeinfer_local.errors import ContextOverflowError

    ctx = model.context(n_ctx=32)
    with pytest.raises(ContextOverflowError):
        ctx.decode(list(range(100, 100 + ctx.n_ctx + 5)))
