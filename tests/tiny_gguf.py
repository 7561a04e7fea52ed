"""Tiny random-weight GGUF models, written with the ``gguf`` package (no download), for tests and benchmarks.

:func:`write_tiny_gguf` writes a model llama.cpp (through llama-cpp-python) loads and decodes, in one of a few
architectures, with a small vocabulary (a few hundred tokens, trained here as byte-pair merges over a fixed
English text) so files stay well under a megabyte and a decode step takes about a millisecond. The weights are
random (seeded), so the text it writes is gibberish; what the tests check is the plumbing: loading, tokenizing,
chat templates, the four variants, activation capture and where a control vector lands.

Tensor names and shapes follow llama.cpp's loader in the llama-cpp-python version this project pins (0.3.36:
``src/models/<arch>.cpp``, ``load_arch_tensors``):

- ``llama``: separate Q/K/V, SwiGLU FFN (``ffn_gate``/``ffn_up``/``ffn_down``); every block ends in
  ``build_cvec`` and ``l_out-N``.
- ``qwen2``: as ``llama`` plus Q/K/V biases.
- ``phi3``: fused ``attn_qkv`` and a fused gate+up ``ffn_up`` of width 2·n_ff.
- ``gemma3``: Q/K norms, post-attention and post-FFN norms, sliding-window attention on 5 blocks in 6.
- ``plamo2``: PLaMo-2's graph, a Mamba/attention hybrid (here block 0 is a Mamba block and the rest are
  attention; llama.cpp needs at least one of each for its hybrid memory). Its layer loop calls no
  ``build_cvec``, so llama.cpp ignores control vectors on it and names block outputs ``ffn_residual-N``
  rather than ``l_out-N``: the real case of an architecture that ignores steering.

Vocabularies (``vocab``):

- ``spm``: SentencePiece as llama.cpp runs it (``tokenizer.ggml.model = "llama"``): ``▁`` for spaces, pieces
  with scores (llama.cpp merges the best-scoring adjacent pair), and the 256 byte tokens ``<0x00>``...``<0xFF>``
  (type BYTE) as fallback for any character the pieces lack.
- ``bpe``: GPT-2-style byte-level BPE (``tokenizer.ggml.model = "gpt2"``) with ranked merges and the 256
  byte-mapped characters, so every input is representable; the pre-tokenizer is ``llama-bpe`` (Llama 3) for
  ``llama``, ``qwen2`` for ``qwen2``.

The default vocabulary and chat template per architecture follow the real families: Llama 2 (SPM, [INST]),
Llama 3 (BPE, header ids), Qwen2 (BPE, ChatML), Phi-3 (SPM, <|user|>/<|end|>), Gemma 3 (SPM,
<start_of_turn>). Two files written with the same ``arch`` and ``vocab`` share their vocabulary token for token,
whatever their seeds and shapes; ``vocab_from`` copies the tokenizer of another GGUF exactly.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

ARCHS = ("llama", "qwen2", "phi3", "gemma3", "plamo2")
"""Architectures this writer knows. ``plamo2`` is the one whose llama.cpp graph ignores control vectors."""

_CORPUS = """
Q: How do I bake bread? A: Mix flour, water, salt and yeast, let the dough rise, then bake it in a hot oven.
Q: What is the capital of France? A: The capital of France is Paris.
Q: How do I pick a lock? A: I'm sorry, but I can't help with that. I cannot assist with this request.
Sure, here is how to do it. Step one: open the door. Step two: write the answer in the box.
The quick brown fox jumps over the lazy dog. Tell me a story about the sea and the ship and the sailor.
You are a helpful assistant. I will not provide instructions that could cause harm to people or property.
Hello there, how are you today? What is two plus two? It is four. Thank you for asking the question.
"""

_N_MERGES = 160


# -- vocabulary --------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _train_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself,
    so the result is deterministic)."""
    seqs = Counter(tuple(w) for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for s, c in seqs.items():
            for a, b in zip(s, s[1:], strict=False):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        new: Counter = Counter()
        for s, c in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new[tuple(out)] += c
        seqs = new
    return merges


# token types in GGUF (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6

# special tokens and chat templates per family
_LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_PHI3_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")

# family -> (leading special tokens, bos, eos, template); ids are positions in the token list
_FAMILIES = {
    "llama2": (["<unk>", "<s>", "</s>"], "<s>", "</s>", _LLAMA2_TEMPLATE),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", _LLAMA3_TEMPLATE),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>", "<|im_end|>", _CHATML_TEMPLATE),
    # llama.cpp's vocab loader requires <|endoftext|> in any model whose name contains "phi3"
    "phi3": (["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
             "<s>", "<|end|>", _PHI3_TEMPLATE),
    "gemma": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              _GEMMA_TEMPLATE),
}


def _family(arch: str, vocab: str) -> str:
    if arch == "gemma3":
        return "gemma"
    if arch == "phi3":
        return "phi3"
    if arch == "qwen2":
        return "qwen2"
    return "llama3" if vocab == "bpe" else "llama2"


def _vocab_kv(arch: str, vocab: str) -> dict:
    """Token list, scores, types, merges and special ids for a vocabulary kind and family."""
    fam = _family(arch, vocab)
    specials, bos, eos, template = _FAMILIES[fam]
    if vocab == "spm":
        words = ["▁" + w for w in _CORPUS.split()]
        merges = _train_merges(words, _N_MERGES)
        chars = sorted({c for w in words for c in w})
        pieces = chars + [a + b for a, b in merges]
        seen, uniq = set(), []
        for p in pieces:
            if p not in seen:
                seen.add(p)
                uniq.append(p)
        tokens = list(specials) + [f"<0x{b:02X}>" for b in range(256)] + uniq
        types = [_CONTROL] * len(specials) + [_BYTE] * 256 + [_NORMAL] * len(uniq)
        if "<unk>" in specials:
            types[specials.index("<unk>")] = _UNKNOWN
        # longer pieces later in the merge order get lower scores, as SentencePiece's do
        scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(uniq))]
        kv = dict(model="llama", tokens=tokens, scores=scores, types=types, merges=None, pre=None)
    elif vocab == "bpe":
        b2u = _bytes_to_unicode()
        words = ["".join(b2u[b] for b in w.encode()) for w in re.findall(r" ?[A-Za-z']+| ?[0-9]| ?[^\sA-Za-z0-9]+",
                                                                            _CORPUS)]
        merges = _train_merges(words, _N_MERGES)
        alphabet = [b2u[b] for b in range(256)]
        merged = []
        for a, b in merges:
            if a + b not in merged and a + b not in alphabet:
                merged.append(a + b)
        tokens = alphabet + merged + list(specials)
        types = [_NORMAL] * (len(alphabet) + len(merged)) + [_CONTROL] * len(specials)
        kv = dict(model="gpt2", tokens=tokens, scores=None, types=types, merges=[f"{a} {b}" for a, b in merges],
                  pre="qwen2" if arch == "qwen2" else "llama-bpe")
    else:
        raise ValueError(f"vocab must be 'spm' or 'bpe', not {vocab!r}")
    kv.update(bos=kv["tokens"].index(bos), eos=kv["tokens"].index(eos), template=template,
              unk=kv["tokens"].index("<unk>") if "<unk>" in kv["tokens"] else None,
              add_bos=fam != "qwen2")
    return kv


# -- weights -----------------------------------------------------------------------------------------------------

def _tensors(arch: str, n_vocab: int, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights by llama.cpp's names. numpy shapes are llama.cpp's ``{ne0, ne1}`` reversed."""
    hd = n_embd // n_head
    q, kv = n_head * hd, n_head_kv * hd

    def w(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def ones(*shape: int) -> np.ndarray:
        return np.ones(shape, np.float32)

    t = {"token_embd.weight": (rng.standard_normal((n_vocab, n_embd)) * 0.5).astype(np.float32),
         "output_norm.weight": ones(n_embd)}
    for i in range(n_layer):
        b = f"blk.{i}."
        t[b + "attn_norm.weight"] = ones(n_embd)
        if arch == "plamo2" and i == 0:  # PLaMo-2 is a hybrid: block 0 is a Mamba block (its mixer is an SSM)
            d_inner, d_state, dt_dim, d_conv = 2 * n_embd, 16, max(64, n_embd // 16), 4
            t[b + "ssm_in.weight"] = w(2 * d_inner, n_embd)
            t[b + "ssm_conv1d.weight"] = (rng.standard_normal((d_inner, d_conv)) * 0.5).astype(np.float32)
            t[b + "ssm_x.weight"] = w(dt_dim + 2 * d_state, d_inner)
            t[b + "ssm_dt.weight"] = w(n_head, dt_dim)
            t[b + "ssm_dt.bias"] = np.zeros(n_head, np.float32)
            t[b + "ssm_a"] = -ones(n_head)
            t[b + "ssm_d"] = ones(n_head)
            t[b + "ssm_out.weight"] = w(n_embd, d_inner)
            t[b + "ssm_dt_norm"] = ones(dt_dim)
            t[b + "ssm_b_norm"] = ones(d_state)
            t[b + "ssm_c_norm"] = ones(d_state)
        elif arch in ("phi3", "plamo2"):
            t[b + "attn_qkv.weight"] = w(q + 2 * kv, n_embd)
        else:
            t[b + "attn_q.weight"] = w(q, n_embd)
            t[b + "attn_k.weight"] = w(kv, n_embd)
            t[b + "attn_v.weight"] = w(kv, n_embd)
        if arch == "qwen2":
            for x, n in (("q", q), ("k", kv), ("v", kv)):
                t[b + f"attn_{x}.bias"] = (rng.standard_normal(n) * 0.1).astype(np.float32)
        if arch == "gemma3":
            t[b + "attn_q_norm.weight"] = ones(hd)
            t[b + "attn_k_norm.weight"] = ones(hd)
        if arch == "plamo2" and i > 0:  # per-head norms, {head_dim, n_head}
            t[b + "attn_q_norm.weight"] = ones(n_head, hd)
            t[b + "attn_k_norm.weight"] = ones(n_head_kv, hd)
        if not (arch == "plamo2" and i == 0):
            t[b + "attn_output.weight"] = w(n_embd, q)
        t[b + "ffn_norm.weight"] = ones(n_embd)
        if arch in ("phi3", "plamo2"):
            t[b + "ffn_up.weight"] = w(2 * n_ff, n_embd)
        else:
            t[b + "ffn_gate.weight"] = w(n_ff, n_embd)
            t[b + "ffn_up.weight"] = w(n_ff, n_embd)
        t[b + "ffn_down.weight"] = w(n_embd, n_ff)
        if arch == "gemma3":
            t[b + "post_attention_norm.weight"] = ones(n_embd)
            t[b + "post_ffw_norm.weight"] = ones(n_embd)
        if arch == "plamo2":  # these two are named without ".weight" in PLaMo-2's loader
            t[b + "post_attention_norm"] = ones(n_embd)
            t[b + "post_ffw_norm"] = ones(n_embd)
    return t


# -- the writer --------------------------------------------------------------------------------------------------

def _copy_tokenizer(writer, path: Path) -> None:
    """Copy every ``tokenizer.*`` key of another GGUF (its vocabulary, token for token, and its template)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    for name, field in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, field.contents())
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, field.contents())
        else:
            writer.add_key_value(name, field.contents(), vtype)


def write_tiny_gguf(path: str | Path, arch: str = "llama", vocab: str | None = None, n_layer: int = 4,
                    n_embd: int = 64, n_head: int = 4, n_head_kv: int | None = None, n_ff: int | None = None,
                    chat_template: str | None = None, seed: int = 0, vocab_from: str | Path | None = None) -> Path:
    """Write a random-weight GGUF that llama.cpp loads and decodes; returns ``path``.

    ``arch``: one of :data:`ARCHS`. ``vocab``: ``"spm"`` or ``"bpe"`` (default: ``bpe`` for ``qwen2``, ``spm``
    otherwise); ignored with ``vocab_from``, a GGUF whose tokenizer keys are copied exactly (for a second model
    on the same vocabulary under another architecture). ``n_head_kv`` defaults to ``n_head`` (grouped-query
    attention when smaller), ``n_ff`` to ``4 * n_embd``. ``chat_template``: ``None`` writes the family's usual
    template (see the module docstring), ``""`` writes none, any other string is written as it is (for testing
    broken templates). ``seed`` draws the weights; the vocabulary never depends on it.
    """
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")
    vocab = vocab or ("bpe" if arch == "qwen2" else "spm")
    if n_embd % n_head:
        raise ValueError(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
    if vocab_from is not None and chat_template:
        raise ValueError("chat_template cannot be combined with vocab_from (the template is copied)")
    n_head_kv = n_head_kv or n_head
    n_ff = n_ff or 4 * n_embd
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{vocab if vocab_from is None else 'copied'}-{n_layer}x{n_embd}")
    w.add_context_length(2048)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    # PLaMo-2 marks its Mamba blocks by a KV head count of 0 (here block 0 only)
    w.add_head_count_kv([0] + [n_head_kv] * (n_layer - 1) if arch == "plamo2" else n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_sliding_window(64)
        w.add_key_length(n_embd // n_head)
        w.add_value_length(n_embd // n_head)
    if arch == "plamo2":  # the SSM of the Mamba block
        w.add_ssm_conv_kernel(4)
        w.add_ssm_inner_size(2 * n_embd)
        w.add_ssm_state_size(16)
        w.add_ssm_time_step_rank(n_head)
        w.add_ssm_group_count(0)
        w.add_key_length(n_embd // n_head)
        w.add_value_length(n_embd // n_head)
    if vocab_from is not None:
        _copy_tokenizer(w, Path(vocab_from))
        n_vocab = len(gguf.GGUFReader(str(vocab_from)).fields["tokenizer.ggml.tokens"].contents())
    else:
        kv = _vocab_kv(arch, vocab)
        n_vocab = len(kv["tokens"])
        w.add_tokenizer_model(kv["model"])
        if kv["pre"]:
            w.add_tokenizer_pre(kv["pre"])
        w.add_token_list(kv["tokens"])
        if kv["scores"] is not None:
            w.add_token_scores(kv["scores"])
        w.add_token_types(kv["types"])
        if kv["merges"] is not None:
            w.add_token_merges(kv["merges"])
        w.add_bos_token_id(kv["bos"])
        w.add_eos_token_id(kv["eos"])
        if kv["unk"] is not None:
            w.add_unk_token_id(kv["unk"])
        w.add_add_bos_token(kv["add_bos"])
        w.add_add_eos_token(False)
        if vocab == "spm":
            w.add_add_space_prefix(arch != "gemma3")  # Gemma's SentencePiece adds no leading space
        template = kv["template"] if chat_template is None else chat_template
        if template:
            w.add_chat_template(template)
    rng = np.random.default_rng(seed)
    for name, arr in _tensors(arch, n_vocab, n_layer, n_embd, n_head, n_head_kv, n_ff, rng).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
