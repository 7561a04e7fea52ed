"""The Python API: one object that holds a model, a safety vector and its settings, and runs any variant.

    >>> from safeinfer_local import SafeInfer
    >>> si = SafeInfer.default()
    >>> si.generate("How do I bake bread?", variant="sa", max_tokens=20).response  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .core.models import default_vector_path, resolve_model
from .core.sampling import DEFAULT_LAMBDA, check_lambda
from .core.vectors import SafetyVector
from .decode.generate import DEFAULT_N_CTX, GenConfig, Result, Runner, Steering, check_variant, generate_many
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


class SafeInfer:
    """A model plus (optionally) a safety vector; ``generate``, ``stream`` and ``score`` for any variant."""

    def __init__(self, model: str | Path | Model | None = None, vector: str | Path | SafetyVector | None = "default",
                 gamma: float | None = None, layers: tuple[int, ...] | None = None, positions: str | None = None,
                 n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, n_gpu_layers: int = 0,
                 chat_format: str | None = None, guidance: str | None = None, lam: float | None = None,
                 warn=None) -> None:
        self.model = model if isinstance(model, Model) else Model(resolve_model(model), n_gpu_layers=n_gpu_layers)
        if isinstance(vector, str) and vector == "default":
            path = default_vector_path() if isinstance(model, Model) or model in (None, "default") else None
            vector = path
        if vector is not None and not isinstance(vector, SafetyVector):
            vector = SafetyVector.load(vector)
        self.vector: SafetyVector | None = vector
        self.steering: Steering | None = (
            Steering.from_vector(vector, self.model, gamma, layers, positions, warn=warn) if vector else None)
        if vector is None and (gamma is not None or layers or positions):
            raise UsageError("--gamma/--layers/--positions need a safety vector (--vector)")
        self.chat_format = chat_format
        # sGDS settings: explicit, else the vector's recommendation (calibrated per model), else the defaults
        rec = (vector.meta.get("sgds") or {}) if isinstance(vector, SafetyVector) else {}
        guidance = guidance or rec.get("guidance")
        try:
            lam = check_lambda(lam if lam is not None else rec.get("lam", DEFAULT_LAMBDA))
        except ValueError as e:
            raise UsageError(f"--lam: {e}") from None
        self.runner = Runner(self.model, n_ctx=n_ctx, n_threads=n_threads, guidance=guidance, lam=lam)

    @classmethod
    def default(cls, **kw) -> SafeInfer:
        """The embedded Gemma 3 270M with its shipped safety vector at the recommended settings."""
        return cls(model=None, vector="default", **kw)

    # -- prompts --------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[Message], raw: bool = False) -> tuple[list[int], tuple[str, ...]]:
        """Token ids for a prompt: ``raw`` = BOS + the text's tokens; otherwise through the chat template."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("empty prompt")
            if raw:
                return self.model.tokenize(prompt, add_bos=True), ()
            messages = [{"role": "user", "content": prompt}]
        else:
            if not prompt:
                raise UsageError("empty message list")
            if raw:
                raise UsageError("raw mode takes a string prompt, not messages")
            messages = prompt
        r = render(self.model, messages, self.chat_format)
        return self.model.tokenize(r.text, add_bos=r.add_bos, special=True), r.stop

    def default_variant(self) -> str:
        """``safeinfer`` when a vector is loaded, else ``sgds`` (guidance without amplification)."""
        return "safeinfer" if self.steering is not None else "sgds"

    def _steering_for(self, variant: str | None) -> tuple[str, Steering | None]:
        variant = variant or self.default_variant()
        check_variant(variant, self.steering)
        return variant, self.steering

    # -- verbs ----------------------------------------------------------------------------------------------
    def stream(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False, **gen):
        """Yield :class:`Step` objects (token, text, log-prob, whether guidance changed the token)."""
        variant, steering = self._steering_for(variant)
        tokens, stops = self.encode_prompt(prompt, raw)
        cfg = GenConfig(**gen)
        cfg.stop = tuple(cfg.stop) + stops
        yield from self.runner.stream(tokens, steering, cfg, variant)

    def generate(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False, **gen) -> Result:
        variant, steering = self._steering_for(variant)
        tokens, stops = self.encode_prompt(prompt, raw)
        cfg = GenConfig(**gen)
        cfg.stop = tuple(cfg.stop) + stops
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return self.runner.generate(text, tokens, steering, cfg, variant)

    def generate_many(self, prompts, variant: str | None = None, raw: bool = False, n_parallel: int = 1, **gen):
        """Yield ``(key, Result or UsageError)`` for ``(key, prompt)`` pairs as each finishes, decoding up to
        ``n_parallel`` of them in the same batches. A prompt that cannot run yields its error, and the rest go
        on."""
        variant, steering = self._steering_for(variant)
        cfg = GenConfig(**gen)
        stop_sets: dict = {}

        def requests():
            for key, prompt in prompts:
                try:
                    tokens, stops = self.encode_prompt(prompt, raw)
                except UsageError as e:
                    errors.append((key, e))
                    continue
                stop_sets[key] = stops
                yield key, prompt, tokens

        errors: list = []
        cfg.stop = tuple(cfg.stop) + (render_stops(self.model, self.chat_format) if not raw else ())
        for key, res in generate_many(self.runner, requests(), steering, cfg, variant, n_parallel):
            while errors:
                yield errors.pop(0)
            yield key, res
        while errors:
            yield errors.pop(0)

    def score(self, prompt: str | list[Message], continuation: str, variant: str | None = None,
              raw: bool = False) -> Score:
        """Teacher-forced log-probability of ``continuation`` (tokenized without BOS) after the prompt, under
        the variant's own next-token distribution at T = 1."""
        variant, steering = self._steering_for(variant)
        if not continuation:
            raise UsageError("empty continuation")
        tokens, _ = self.encode_prompt(prompt, raw)
        cont = self.model.tokenize(continuation, add_bos=False)
        lps = self.runner.score(tokens, cont, steering, variant)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return Score(text, continuation, variant, float(lps.sum()), len(cont), [float(x) for x in lps])
