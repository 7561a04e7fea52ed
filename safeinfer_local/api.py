"""The Python API: one object that holds a model, a safety vector and its settings, and runs any variant.

    >>> from safeinfer_local import SafeInfer
    >>> si = SafeInfer.default()
    >>> si.generate("How do I bake bread?", variant="sa", max_tokens=20).response  # doctest: +SKIP
    >>> si.with_(gamma=1.0, lam=0.5).generate("How do I bake bread?").response  # doctest: +SKIP

Settings are a frozen value (:class:`Settings`); :meth:`SafeInfer.with_` returns a new ``SafeInfer`` with some
of them changed that shares the model and its decoder (no reload, no re-decoded prefix).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .core.frames import frame_cont, frame_prompt, frame_stops, resolve_frame
from .core.models import default_vector_path, resolve_model
from .core.settings import DEFAULT_LAMBDA, DEFAULT_N_CTX, SA_VARIANTS, check_lambda, check_variant
from .core.vectors import SafetyVector
from .decode.batch import GenConfig, Result, Step
from .decode.decoder import Decoder
from .decode.guidance import GuidanceSpec
from .decode.steering import Steering
from .errors import UsageError
from .llama.chat import Message, render, render_stops
from .llama.engine import Model


@dataclass
class Score:
    prompt: str
    continuation: str
    variant: str
    logprob: float
    n_tokens: int
    token_logprobs: list[float]

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "continuation": self.continuation, "variant": self.variant,
                "logprob": self.logprob, "n_tokens": self.n_tokens,
                "logprob_per_token": self.logprob / self.n_tokens, "token_logprobs": self.token_logprobs}


@dataclass(frozen=True)
class Settings:
    """What is applied: the steering (vector, γ, blocks, positions; ``None`` without a vector), the guidance
    source, λ, and the variant used when a call names none."""

    steering: Steering | None
    guidance: GuidanceSpec
    lam: float
    variant: str

    def describe(self, variant: str | None = None) -> dict:
        """The settings a call with ``variant`` applies, as recorded in outputs."""
        v = variant or self.variant
        out: dict = {"variant": v}
        if self.steering is not None and v in SA_VARIANTS:
            st = self.steering
            out.update(gamma=st.gamma, layers=list(st.layers), positions=st.positions)
        if v in ("sgds", "safeinfer"):
            out.update(guidance=str(self.guidance), lam=self.lam)
        return out


def _vector_hash(vec: SafetyVector) -> str:
    h = hashlib.sha256()
    for layer in sorted(vec.directions):
        h.update(str(layer).encode())
        h.update(vec.directions[layer].tobytes())
    return h.hexdigest()[:16]


def _head_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]


class SafeInfer:
    """A model plus (optionally) a safety vector; ``generate``, ``stream`` and ``score`` for any variant."""

    def __init__(self, model: str | Path | Model | None = None, vector: str | Path | SafetyVector | None = "default",
                 gamma: float | None = None, layers: tuple[int, ...] | None = None, positions: str | None = None,
                 n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, n_gpu_layers: int = 0,
                 chat_format: str | None = None, guidance: str | GuidanceSpec | None = None, lam: float | None = None,
                 variant: str | None = None, warn=None) -> None:
        self.model = model if isinstance(model, Model) else Model(resolve_model(model), n_gpu_layers=n_gpu_layers)
        if isinstance(vector, str) and vector == "default":
            path = default_vector_path() if isinstance(model, Model) or model in (None, "default") else None
            vector = path
        if vector is not None and not isinstance(vector, SafetyVector):
            vector = SafetyVector.load(vector)
        self.vector: SafetyVector | None = vector
        if vector is None and (gamma is not None or layers or positions):
            raise UsageError("--gamma/--layers/--positions need a safety vector (--vector)")
        steering = Steering.from_vector(vector, self.model, gamma, layers, positions, warn=warn) if vector else None
        self.chat_format = chat_format
        # sGDS settings: explicit, else the vector's recommendation (calibrated per model), else the defaults
        rec = (vector.meta.get("sgds") or {}) if isinstance(vector, SafetyVector) else {}
        spec = guidance if isinstance(guidance, GuidanceSpec) else GuidanceSpec.parse(guidance or rec.get("guidance"))
        lam = check_lambda(lam if lam is not None else rec.get("lam", DEFAULT_LAMBDA))
        variant = check_variant(variant or ("safeinfer" if steering is not None else "sgds"))
        self.settings = Settings(steering, spec, lam, variant)
        self._check(variant)
        self._decoder = Decoder(self.model, n_ctx=n_ctx, n_threads=n_threads)

    @classmethod
    def default(cls, **kw) -> SafeInfer:
        """The embedded Gemma 3 270M with its shipped safety vector at the recommended settings."""
        return cls(model=None, vector="default", **kw)

    # -- settings -------------------------------------------------------------------------------------------
    def with_(self, *, gamma: float | None = None, layers: tuple[int, ...] | None = None,
              positions: str | None = None, lam: float | None = None, guidance: str | GuidanceSpec | None = None,
              variant: str | None = None) -> SafeInfer:
        """A ``SafeInfer`` with some settings changed; it shares this one's model, vector and decoder."""
        s = self.settings
        steering = s.steering
        if gamma is not None or layers or positions:
            if steering is None:
                raise UsageError("gamma/layers/positions need a safety vector")
            steering = Steering.from_vector(steering.vector, self.model, steering.gamma if gamma is None else gamma,
                                            layers or steering.layers, positions or steering.positions)
        spec = s.guidance
        if guidance is not None:
            spec = guidance if isinstance(guidance, GuidanceSpec) else GuidanceSpec.parse(guidance)
        new = dataclasses.replace(s, steering=steering, guidance=spec,
                                  lam=s.lam if lam is None else check_lambda(lam),
                                  variant=s.variant if variant is None else check_variant(variant))
        other = object.__new__(SafeInfer)
        other.__dict__.update(self.__dict__)
        other.settings = new
        other._check(new.variant)
        return other

    @property
    def steering(self) -> Steering | None:
        return self.settings.steering

    @property
    def guidance(self) -> GuidanceSpec:
        return self.settings.guidance

    @property
    def lam(self) -> float:
        return self.settings.lam

    @property
    def n_ctx(self) -> int:
        return self._decoder.n_ctx

    @property
    def n_threads(self) -> int | None:
        return self._decoder.n_threads

    @property
    def decode_seconds(self) -> float:
        """Wall time spent in llama.cpp decoding by this model's decoder so far."""
        return self._decoder.decode_s

    def fingerprint(self) -> dict:
        """What decides this object's outputs, for files that must not mix runs: the model (name and a hash of
        its first MiB), the vector (a hash of its directions), γ, blocks, positions, guidance, λ, chat format."""
        st = self.steering
        return {"model": self.model.path.name, "model_sha256_head": _head_hash(self.model.path),
                "vector_sha256": _vector_hash(self.vector) if self.vector is not None else None,
                "gamma": st.gamma if st else None, "layers": list(st.layers) if st else None,
                "positions": st.positions if st else None, "guidance": str(self.guidance), "lam": self.lam,
                "chat_format": self.chat_format}

    def default_variant(self) -> str:
        """``safeinfer`` when a vector is loaded, else ``sgds`` (guidance without amplification), unless the
        settings name another."""
        return self.settings.variant

    def _check(self, variant: str) -> None:
        check_variant(variant)
        if variant in SA_VARIANTS and self.settings.steering is None:
            raise UsageError(f"variant {variant!r} needs a safety vector (--vector)")
        if variant in ("sgds", "safeinfer") and self.settings.guidance.kind == "negative" and self.steering is None:
            raise UsageError("--guidance negative needs a safety vector (--vector)")

    def _variant(self, variant: str | None) -> str:
        variant = variant or self.settings.variant
        self._check(variant)
        return variant

    # -- prompts --------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[Message], raw: bool = False, frame: str | None = None
                      ) -> tuple[list[int], tuple[str, ...]]:
        """Token ids for a prompt and the stop strings its frame adds (see :mod:`.core.frames`): ``template``
        (the default) through the chat template; ``none`` (``raw=True``) BOS + the text's tokens; ``qa`` the
        text in a ``Q: ...\\nA:`` frame, stopping at the next question."""
        frame = resolve_frame(raw, frame)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("empty prompt")
            if frame != "template":
                return self.model.tokenize(frame_prompt(prompt, frame), add_bos=True), frame_stops(frame)
            messages = [{"role": "user", "content": prompt}]
        else:
            if not prompt:
                raise UsageError("empty message list")
            if frame != "template":
                raise UsageError(f"frame {frame!r} takes a string prompt, not messages")
            messages = prompt
        r = render(self.model, messages, self.chat_format)
        return self.model.tokenize(r.text, add_bos=r.add_bos, special=True), r.stop

    def frame_stops(self, raw: bool = False, frame: str | None = None) -> tuple[str, ...]:
        """The stop strings every prompt in this frame adds (the template's turn end, or the next ``Q:``)."""
        frame = resolve_frame(raw, frame)
        return render_stops(self.model, self.chat_format) if frame == "template" else frame_stops(frame)

    # -- verbs ----------------------------------------------------------------------------------------------
    def _batch(self, variant: str, slots: int = 1):
        s = self.settings
        return self._decoder.batch(variant, s.steering, s.guidance, s.lam, slots)

    def _run(self, prompt, variant, raw, frame, gen) -> Iterator[tuple[Step, Result | None]]:
        variant = self._variant(variant)
        tokens, stops = self.encode_prompt(prompt, raw, frame)
        cfg = GenConfig(**{**gen, "stop": tuple(gen.get("stop", ())) + stops})
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return self._decoder.stream(self._batch(variant), tokens, cfg, text)

    def stream(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False,
               frame: str | None = None, **gen) -> Iterator[Step]:
        """Yield :class:`Step` objects (token, text, log-prob, whether guidance changed the token); the last one
        says why generation finished."""
        for step, _ in self._run(prompt, variant, raw, frame, gen):
            yield step

    def generate(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False,
                 frame: str | None = None, **gen) -> Result:
        """Generate a reply (``gen``: the fields of :class:`GenConfig`); ``raw``/``frame`` as in
        :meth:`encode_prompt`."""
        steps: list[Step] = []
        result = None
        for step, res in self._run(prompt, variant, raw, frame, gen):
            steps.append(step)
            result = res or result
        assert result is not None
        result.steps = steps
        return result

    def generate_many(self, prompts: Iterable[tuple[Hashable, str | list[Message]]], variant: str | None = None,
                      raw: bool = False, frame: str | None = None, n_parallel: int = 1, **gen
                      ) -> Iterator[tuple[Hashable, Result | UsageError]]:
        """Yield ``(key, Result or UsageError)`` for ``(key, prompt)`` pairs as each finishes, decoding up to
        ``n_parallel`` of them in the same batches. A prompt that cannot run yields its error, and the rest go
        on."""
        variant = self._variant(variant)
        cfg = GenConfig(**{**gen, "stop": tuple(gen.get("stop", ())) + self.frame_stops(raw, frame)})
        errors: list = []

        def requests():
            for key, prompt in prompts:
                try:
                    tokens, _ = self.encode_prompt(prompt, raw, frame)
                except UsageError as e:
                    errors.append((key, e))
                    continue
                yield key, prompt if isinstance(prompt, str) else prompt[-1]["content"], tokens

        for key, res in self._decoder.generate_many(self._batch(variant, n_parallel), requests(), cfg):
            while errors:
                yield errors.pop(0)
            yield key, res
        while errors:
            yield errors.pop(0)

    def score(self, prompt: str | list[Message], continuation: str, variant: str | None = None,
              raw: bool = False, frame: str | None = None) -> Score:
        """Teacher-forced log-probability of ``continuation`` (tokenized without BOS) after the prompt, under
        the variant's own next-token distribution at T = 1. In the ``qa`` frame the continuation follows
        ``A:`` after a space."""
        variant = self._variant(variant)
        if not continuation:
            raise UsageError("empty continuation")
        tokens, _ = self.encode_prompt(prompt, raw, frame)
        cont = self.model.tokenize(frame_cont(continuation, resolve_frame(raw, frame)), add_bos=False)
        lps = self.score_tokens(tokens, cont, variant)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return Score(text, continuation, variant, float(lps.sum()), len(cont), [float(x) for x in lps])

    def score_tokens(self, prompt_tokens: list[int], cont_tokens: list[int], variant: str | None = None):
        """Per-token log-probabilities of ``cont_tokens`` after ``prompt_tokens`` (numpy array)."""
        variant = self._variant(variant)
        s = self.settings
        return self._decoder.score(prompt_tokens, cont_tokens, variant, s.steering, s.guidance, s.lam)

    def score_rows(self, prompt_tokens: list[int], cont_tokens: list[int], variant: str | None = None):
        """Target and guidance logit rows behind :meth:`score_tokens` (guidance ``None`` when unguided), for
        sweeps that apply many λ to one pass."""
        variant = self._variant(variant)
        s = self.settings
        return self._decoder.score_rows(prompt_tokens, cont_tokens, variant, s.steering, s.guidance)
