"""The engine: the one module that calls llama-cpp-python's low-level API.

Everything else in the package talks to :class:`Model` and :class:`Context`. API renames between
llama-cpp-python versions are absorbed in :data:`_api` (see :func:`_resolve`), so a rename is a one-line fix here.

Why the low-level API: the high-level ``Llama`` class has one sequence per context, no control vectors and a
logits processor that sees one context only, so safety amplification at chosen positions, activation capture
and (later) guided decoding with a second distribution cannot be expressed through it.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import ContextOverflowError, EngineError, ModelError, UsageError
from .interrupts import defer_in, pending, raise_deferred_interrupt

try:
    import llama_cpp as _L
    import llama_cpp._logger as _llog
    from llama_cpp._ggml import libggml as _ggml
except ImportError as e:  # pragma: no cover - the package depends on llama-cpp-python
    raise ImportError(f"safeinfer_local needs llama-cpp-python: {e}") from e


def _resolve(*names: str):
    """The first of ``names`` that this llama-cpp-python exports (newest name first)."""
    for n in names:
        fn = getattr(_L, n, None)
        if fn is not None:
            return fn
    raise ImportError(f"llama-cpp-python {getattr(_L, '__version__', '?')} has none of {names}")


_api = SimpleNamespace(
    load_model=_resolve("llama_model_load_from_file", "llama_load_model_from_file"),
    free_model=_resolve("llama_model_free", "llama_free_model"),
    new_context=_resolve("llama_init_from_model", "llama_new_context_with_model"),
    set_cvec=_resolve("llama_set_adapter_cvec", "llama_apply_adapter_cvec"),
    get_memory=_resolve("llama_get_memory"),
    mem_seq_rm=_resolve("llama_memory_seq_rm"),
    mem_seq_cp=_resolve("llama_memory_seq_cp"),
    mem_clear=_resolve("llama_memory_clear"),
    mem_pos_max=_resolve("llama_memory_seq_pos_max"),
    n_tokens=_resolve("llama_vocab_n_tokens", "llama_n_vocab"),
    lora_init=_resolve("llama_adapter_lora_init", "llama_lora_adapter_init"),
)

# ggml tensor access for activation capture (llama.cpp's cb_eval callback hands us raw ggml_tensor pointers).
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_nrows.argtypes = [ctypes.c_void_p]
_ggml.ggml_nrows.restype = ctypes.c_int64
_ggml.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
_ggml.ggml_is_contiguous.restype = ctypes.c_bool
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_get.restype = None
_ggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_set.restype = None

_backend_ready = False
_GGUF_MAGIC = b"GGUF"


def set_verbose(verbose: bool) -> None:
    """llama.cpp logs to stderr; keep it quiet unless asked (errors are reported by us, in one line)."""
    _llog.logger.setLevel(logging.DEBUG if verbose else logging.CRITICAL + 10)


set_verbose(os.environ.get("SAFEINFER_VERBOSE", "") not in ("", "0"))


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        _L.llama_backend_init()
        _backend_ready = True


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class Model:
    """A loaded GGUF model (weights only; contexts are created from it)."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, verbose: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError(f"model file not found: {self.path}")
        if not self.path.is_file():
            raise ModelError(f"model path is not a file: {self.path}")
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelError(f"cannot read model file {self.path}: {e.strerror}") from None
        if magic != _GGUF_MAGIC:
            raise ModelError(f"{self.path} is not a GGUF model file (no GGUF header)")
        if n_gpu_layers < -1:
            raise ModelError(f"--n-gpu-layers must be >= -1 (-1 = all), not {n_gpu_layers}")
        if verbose:
            set_verbose(True)
        _init_backend()
        params = _L.llama_model_default_params()
        self.n_gpu_layers = n_gpu_layers
        params.n_gpu_layers = 10**6 if n_gpu_layers == -1 else n_gpu_layers
        self._model = _api.load_model(str(self.path).encode(), params)
        raise_deferred_interrupt()  # a Ctrl-C that arrived inside llama.cpp's log callback while loading
        if not self._model:
            raise ModelError(f"llama.cpp could not load {self.path} (corrupt file or unsupported architecture)")
        self._vocab = _L.llama_model_get_vocab(self._model)
        self.n_vocab: int = _api.n_tokens(self._vocab)
        self.n_embd: int = _L.llama_model_n_embd(self._model)
        self.n_layer: int = _L.llama_model_n_layer(self._model)
        self.n_head: int = _L.llama_model_n_head(self._model)
        self.n_ctx_train: int = _L.llama_model_n_ctx_train(self._model)
        self.bos: int = _L.llama_vocab_bos(self._vocab)
        self.eos: int = _L.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(_L.llama_vocab_get_add_bos(self._vocab))
        self.arch: str = self.meta("general.architecture") or "?"
        self.name: str = self.meta("general.name") or self.path.stem
        self._piece_cache: dict[int, bytes] = {}
        self._cvec_applied: dict[tuple[int, ...], bool] = {}

    def __del__(self) -> None:
        m = getattr(self, "_model", None)
        if m:
            _api.free_model(m)
            self._model = None

    # -- metadata -------------------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = _L.llama_model_meta_val_str(self._model, key.encode(), buf, ctypes.sizeof(buf))
        if n < 0:
            return None
        if n >= ctypes.sizeof(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _L.llama_model_meta_val_str(self._model, key.encode(), buf, ctypes.sizeof(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        t = _L.llama_model_chat_template(self._model, None)
        return t.decode("utf-8", errors="replace") if t else None

    def head_dim(self) -> int:
        """Per-head width of the attention output (``kqv_out`` is n_head * head_dim wide)."""
        v = self.meta(f"{self.arch}.attention.value_length")
        return int(v) if v else self.n_embd // self.n_head

    # -- tokens ---------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text -> token ids. ``add_bos`` adds BOS only when the model wants one; ``special`` parses
        special-token text such as ``<start_of_turn>``."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8, kept as surrogates (argv, a lenient stdin)
            raise UsageError(f"the text is not valid UTF-8 (an undecodable byte at character {e.start}); "
                             "pass UTF-8 text") from None
        n_max = len(data) + 8
        arr = (_L.llama_token * n_max)()
        n = _L.llama_tokenize(self._vocab, data, len(data), arr, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            arr = (_L.llama_token * n_max)()
            n = _L.llama_tokenize(self._vocab, data, len(data), arr, n_max, add_bos, special)
        if n < 0:
            raise EngineError(f"tokenization failed ({n})")
        return list(arr[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""
        key = token if not special else -1 - token
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = _L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        out = buf.raw[:n]
        self._piece_cache[key] = out
        return out

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(_L.llama_vocab_is_eog(self._vocab, token))

    def vocab_fingerprint(self) -> list[bytes]:
        """Every token's text, for checking that two models share a vocabulary token for token."""
        return [self.piece(t, special=True) for t in range(self.n_vocab)]

    def applies_control_vector(self, blocks: Iterable[int], n_threads: int | None = None) -> bool:
        """Whether llama.cpp adds a control vector at these blocks for this architecture. Most graphs call
        ``build_cvec`` after every block, but some never do (PLaMo-2, for one), and there steering would silently
        change nothing. Probed once per block set: two tokens decoded twice without a vector (the noise floor)
        and once with a random probe vector at ``blocks`` (random, not constant: a LayerNorm would cancel a
        constant shift); it applies when the probe moves the logits well above that floor."""
        key = tuple(sorted(set(blocks)))
        hit = self._cvec_applied.get(key)
        if hit is not None:
            return hit
        if not key or not all(1 <= b < self.n_layer for b in key):
            raise EngineError(f"blocks {list(key)} are not steerable blocks of {self.name} (1..{self.n_layer - 1})")
        toks = self.tokenize("Hello, world", add_bos=True)[:2]
        probe = np.zeros((self.n_layer - 1, self.n_embd), np.float32)
        rng = np.random.default_rng(0)
        for b in key:
            probe[b - 1] = rng.standard_normal(self.n_embd)
        ctx = self.context(n_ctx=64, n_batch=8, n_threads=n_threads)
        runs = []
        for buf in (None, None, probe):
            ctx.clear()
            ctx.set_control_vector(buf)
            runs.append(ctx.decode(toks, logits="all"))
        noise = float(np.abs(runs[1] - runs[0]).max())
        moved = float(np.abs(runs[2] - runs[0]).max())
        self._cvec_applied[key] = hit = moved > max(1e-4, 10 * noise)
        return hit

    # -- contexts -------------------------------------------------------------------------------------------
    def context(
        self,
        n_ctx: int = 4096,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        n_batch: int = 512,
        capture: ActivationHook | None = None,
    ) -> Context:
        return Context(self, n_ctx=n_ctx, n_seq_max=n_seq_max, n_threads=n_threads, n_batch=n_batch,
                       capture=capture)


class Detokenizer:
    """Incremental detokenization: feed tokens, get only complete UTF-8 text back (no split characters)."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> str:
        return self._dec.decode(self._model.piece(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


Patch = Callable[[str, np.ndarray], np.ndarray | None]
"""Given a captured tensor's name and rows, return modified rows to write back into the graph (or None)."""


class ActivationHook:
    """Captures (and optionally patches) named graph tensors through llama.cpp's ``cb_eval`` callback.

    ``names`` can be changed between decodes. Captured rows land in :attr:`captured` (name -> array), replaced
    at every decode. A ``patch`` function may return new rows, which are written back with
    ``ggml_backend_tensor_set`` before the rest of the graph runs (used for activation patching).
    """

    def __init__(self, names: Iterable[str] = (), patch: Patch | None = None) -> None:
        self.names = set(names)
        self.patch = patch
        self.captured: dict[str, np.ndarray] = {}
        self.error: BaseException | None = None
        self.rows: tuple[int, int] = (0, 0)
        """The flat token range (start, stop) of the ``decode_multi`` input that the running ``llama_decode``
        holds (its rows, in order), so a patch can tell which row belongs to which sequence."""
        self.stop_if: Callable[[str], bool] | None = None
        """Asked after each capture with the tensor's name: True cuts the graph there (``cb_eval`` returning False:
        llama.cpp's scheduler stops computing the graph, as documented in ``ggml-backend.h``). The blocks after it
        are not computed, so their KV cells are left unwritten (and any logits are not computed): only for a
        decode whose later cells and logits are thrown away."""
        # keep the ctypes callback object referenced as long as llama.cpp may call it
        self._cfunc = _L.ggml_backend_sched_eval_callback(self._callback)

    @property
    def names(self) -> set[str]:
        return self._names

    @names.setter
    def names(self, names: Iterable[str]) -> None:
        self._names = set(names)
        self._bnames = frozenset(n.encode() for n in self._names)  # what the callback compares (no decode)

    def _callback(self, tensor: int, ask: bool, user_data: int) -> bool:
        # llama.cpp calls this through ctypes, which drops exceptions: Ctrl-C is deferred here (registered with
        # interrupts.defer_in below) and raised after the llama_decode. It is asked about every node of the graph
        # (about 700 per decode here), so the asking path is kept short.
        try:
            if ask:  # a deferred Ctrl-C or an error: want the node, then cut the decode short there
                return pending() or self.error is not None or _ggml.ggml_get_name(tensor) in self._bnames
            if pending() or self.error is not None:  # (False: llama.cpp's scheduler stops the graph)
                return False
            name = _ggml.ggml_get_name(tensor).decode()
            if name not in self._names:
                return True
            if not _ggml.ggml_is_contiguous(tensor):
                raise EngineError(f"graph tensor {name} is not contiguous; cannot capture it")
            nbytes = _ggml.ggml_nbytes(tensor)
            rows = _ggml.ggml_nrows(tensor)
            if nbytes == 0 or rows == 0:  # e.g. the last layer of a chunk that outputs no logits
                return True
            arr = np.empty(nbytes // 4, dtype=np.float32)
            _ggml.ggml_backend_tensor_get(tensor, arr.ctypes.data, 0, nbytes)
            arr = arr.reshape(rows, -1)
            if self.patch is not None:
                new = self.patch(name, arr)
                if new is not None:
                    new = np.ascontiguousarray(new, dtype=np.float32)
                    if new.shape != arr.shape:
                        raise EngineError(f"patch for {name} changed its shape {arr.shape} -> {new.shape}")
                    _ggml.ggml_backend_tensor_set(tensor, new.ctypes.data, 0, nbytes)
                    arr = new
            self.captured[name] = arr
            return not (self.stop_if is not None and self.stop_if(name))
        except BaseException as e:  # never let an exception cross the C boundary (decode_multi re-raises it)
            self.error = e
            return True


defer_in(ActivationHook._callback)


class Context:
    """A llama.cpp context: KV memory for up to ``n_seq_max`` sequences, a control vector, an optional hook."""

    def __init__(self, model: Model, n_ctx: int, n_seq_max: int, n_threads: int | None, n_batch: int,
                 capture: ActivationHook | None) -> None:
        self.model = model
        self.n_seq_max = n_seq_max
        self.hook = capture
        p = _L.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = n_batch
        p.n_seq_max = n_seq_max
        threads = n_threads or default_threads()
        p.n_threads = threads
        p.n_threads_batch = threads
        # full-size sliding-window cache: we roll sequences back (seq_rm) to reuse prefixes, which the
        # pruned SWA cache of Gemma-style models cannot do once old cells are evicted
        p.swa_full = True
        p.kv_unified = True
        if capture is not None:
            p.cb_eval = capture._cfunc
            p.cb_eval_user_data = None
        self._ctx = _api.new_context(model._model, p)
        raise_deferred_interrupt()  # a Ctrl-C that arrived inside llama.cpp's log callback (context set-up logs)
        if not self._ctx:
            raise ModelError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {model.path}")
        self.n_ctx: int = _L.llama_n_ctx(self._ctx)
        # llama.cpp may pad n_ctx up and clamp n_batch down: use what it actually took
        self.n_batch = min(n_batch, _L.llama_n_batch(self._ctx), _L.llama_n_ubatch(self._ctx))
        self._mem = _api.get_memory(self._ctx)
        self._batch = _L.llama_batch_init(n_batch, 0, n_seq_max)
        self.pos = [0] * n_seq_max  # next position per sequence
        self._cvec: tuple[np.ndarray, int, int] | None = None  # what is applied now

    def __del__(self) -> None:
        b = getattr(self, "_batch", None)
        if b is not None:
            _L.llama_batch_free(b)
            self._batch = None
        c = getattr(self, "_ctx", None)
        if c:
            _L.llama_free(c)
            self._ctx = None

    # -- KV memory ------------------------------------------------------------------------------------------
    def clear(self) -> None:
        # metadata only: zeroing the buffers too costs milliseconds per call at n_ctx 4096 (the gate's reader
        # clears twice per request), and a cell is never read before a decode writes it again
        _api.mem_clear(self._mem, False)
        self.pos = [0] * self.n_seq_max

    def truncate(self, seq: int, n: int) -> None:
        """Drop every token of sequence ``seq`` from position ``n`` on (roll back to a prefix)."""
        _api.mem_seq_rm(self._mem, seq, n, -1)
        self.pos[seq] = min(self.pos[seq], n)

    def copy_seq(self, src: int, dst: int) -> None:
        """Make ``dst`` share ``src``'s cached tokens (cheap with a unified KV buffer)."""
        _api.mem_seq_rm(self._mem, dst, 0, -1)
        _api.mem_seq_cp(self._mem, src, dst, 0, -1)
        self.pos[dst] = self.pos[src]

    def set_threads(self, n: int) -> None:
        _L.llama_set_n_threads(self._ctx, n, n)

    def export_seq(self, seq: int) -> bytes:
        """The KV state of one sequence (to copy it into another context of the same model)."""
        size = _L.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = _L.llama_state_seq_get_data(self._ctx, buf, size, seq)
        if n == 0 and size:
            raise EngineError("llama.cpp could not export the sequence state")
        return ctypes.string_at(buf, n)  # not bytes(buf[:n]): slicing a ctypes array builds a list of ints

    def import_seq(self, state: bytes, seq: int, n_tokens: int) -> None:
        """Load a sequence state exported by :meth:`export_seq` (same model) into sequence ``seq``."""
        _api.mem_seq_rm(self._mem, seq, 0, -1)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if _L.llama_state_seq_set_data(self._ctx, buf, len(state), seq) == 0:
            raise EngineError("llama.cpp could not import the sequence state")
        self.pos[seq] = n_tokens

    # -- control vector -------------------------------------------------------------------------------------
    def set_control_vector(self, buffer: np.ndarray | None, il_start: int = 1, il_end: int | None = None) -> None:
        """Apply a flat (n_layer - 1) * n_embd buffer (row i = block i + 1), or clear with ``None``.

        Applies to the whole context (every sequence) and makes llama.cpp re-reserve its scheduler, so call it
        per request, not per token.
        """
        m = self.model
        if buffer is None:
            if self._cvec is not None:
                rc = _api.set_cvec(self._ctx, None, 0, m.n_embd, 0, 0)
                if rc != 0:
                    raise EngineError(f"llama.cpp could not clear the control vector ({rc})")
                self._cvec = None
            return
        buf = np.ascontiguousarray(buffer, dtype=np.float32).reshape(-1)
        expected = (m.n_layer - 1) * m.n_embd
        if buf.size != expected:
            raise EngineError(f"control-vector buffer has {buf.size} floats, expected {expected}")
        il_end = il_end or m.n_layer - 1
        cur = self._cvec
        if cur is not None and cur[1:] == (il_start, il_end) and np.array_equal(cur[0], buf):
            return  # already applied: skip llama.cpp's scheduler re-reserve
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = _api.set_cvec(self._ctx, ptr, buf.size, m.n_embd, il_start, il_end)
        if rc != 0:
            raise EngineError(f"llama.cpp rejected the control vector ({rc})")
        self._cvec = (buf.copy(), il_start, il_end)

    # -- LoRA ---------------------------------------------------------------------------------------------
    def set_lora(self, path: str | os.PathLike, scale: float = 1.0) -> None:
        """Apply a GGUF LoRA adapter to this context only (the model's weights stay shared)."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"LoRA adapter not found: {path}")
        with open(path, "rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF LoRA adapter (no GGUF header)")
        adapter = _api.lora_init(self.model._model, str(path).encode())
        if not adapter:
            raise ModelError(f"llama.cpp could not load LoRA {path} for {self.model.name} "
                             "(an adapter for another model, or not a LoRA)")
        self._lora = adapter  # keep it alive as long as the context
        if hasattr(_L, "llama_set_adapters_lora"):
            arr = (_L.llama_adapter_lora_p_ctypes * 1)(adapter)
            rc = _L.llama_set_adapters_lora(self._ctx, arr, 1, (ctypes.c_float * 1)(scale))
        else:  # older llama-cpp-python
            rc = _L.llama_set_adapter_lora(self._ctx, adapter, scale)
        if rc != 0:
            raise ModelError(f"llama.cpp could not apply LoRA {path} ({rc})")

    # -- decoding -------------------------------------------------------------------------------------------
    def decode(self, tokens: Sequence[int], seq: int = 0, logits: str = "last") -> np.ndarray:
        """Append ``tokens`` to sequence ``seq`` and return logits: ``last`` -> (n_vocab,), ``all`` ->
        (len(tokens), n_vocab), ``none`` -> empty. Long inputs go in n_batch chunks."""
        return self.decode_multi([(seq, list(tokens))], logits=logits)[0]

    def decode_multi(self, items: Sequence[tuple[int, Sequence[int]]],
                     logits: str | Sequence[str] = "last") -> list[np.ndarray]:
        """Decode tokens for several sequences in the same batch(es); one logits array per item. ``logits``: one
        mode for every item, or one per item (a prompt piece with ``none`` beside decode steps with ``last``)."""
        modes = [logits] * len(items) if isinstance(logits, str) else list(logits)
        if len(modes) != len(items) or any(m not in ("last", "all", "none") for m in modes):
            raise ValueError(f"logits must be last|all|none (one, or one per item), not {logits!r}")
        for seq, toks in items:
            if not 0 <= seq < self.n_seq_max:
                raise EngineError(f"sequence {seq} out of range (context has {self.n_seq_max})")
            if self.pos[seq] + len(toks) > self.n_ctx:
                raise ContextOverflowError(
                    f"input needs {self.pos[seq] + len(toks)} tokens but the context holds {self.n_ctx} "
                    "(shorten the prompt or raise --n-ctx)")
            if not toks:
                raise EngineError("nothing to decode (empty token list)")
        # flatten to (seq, token, want_logits, item index)
        flat = []
        for k, (seq, toks) in enumerate(items):
            n = len(toks)
            for j, t in enumerate(toks):
                want = modes[k] == "all" or (modes[k] == "last" and j == n - 1)
                flat.append((seq, int(t), want, k))
        out: list[list[np.ndarray]] = [[] for _ in items]
        n_vocab = self.model.n_vocab
        b = self._batch
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            for i, (seq, tok, want, _) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = self.pos[seq]
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
                self.pos[seq] += 1
            b.n_tokens = len(chunk)
            if self.hook is not None:
                self.hook.error = None
                self.hook.rows = (start, start + len(chunk))
            rc = _L.llama_decode(self._ctx, b)
            raise_deferred_interrupt()  # a Ctrl-C that arrived inside a ctypes callback (log, cb_eval)
            if rc != 0:
                raise EngineError(f"llama_decode failed with code {rc}")
            if self.hook is not None and self.hook.error is not None:
                raise self.hook.error
            for i, (_, _, want, k) in enumerate(chunk):
                if want:
                    ptr = _L.llama_get_logits_ith(self._ctx, i)
                    out[k].append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())
        result = []
        for rows, mode in zip(out, modes, strict=True):
            if mode == "last":
                result.append(rows[-1])
            elif mode == "all":
                result.append(np.stack(rows))
            else:
                result.append(np.empty((0, n_vocab), dtype=np.float32))
        return result


def reference_stream(model_path: str | os.PathLike, prompt: str, max_tokens: int, n_ctx: int = 4096,
                     n_threads: int | None = None, n_gpu_layers: int = 0):
    """llama-cpp-python's own high-level ``Llama.create_completion`` (greedy, streaming): the plain reference
    that ``bench speed`` compares our loop against. Yields one text chunk per generated token."""
    threads = n_threads or default_threads()
    llm = _L.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                   n_gpu_layers=n_gpu_layers, verbose=False)
    try:
        for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            raise_deferred_interrupt()  # llama-cpp-python decoded it: a Ctrl-C deferred in its log callback
            yield chunk["choices"][0]["text"]
    finally:
        llm.close()
