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

from . import schema
from .core.frames import frame_cont, frame_prompt, frame_stops, resolve_frame
from .core.gate import DEFAULT_REFUSAL, ON_FLAG, Gate
from .core.models import default_vector_path, resolve_model
from .core.settings import (
    DEFAULT_LAMBDA,
    DEFAULT_N_CTX,
    DEFAULT_SPECULATE,
    check_lambda,
    check_variant,
)
from .core.vectors import SafetyVector
from .decode.batch import BatchGenerator, GenConfig, Result, Step
from .decode.decoder import Decoder
from .decode.gating import Handoff
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
    gate_score: float | None = None
    flagged: bool | None = None
    """The gate's verdict: True = judged harmful (scored under the variant), False = judged benign (scored under
    base), None = no gate ran."""

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "continuation": self.continuation, "variant": self.variant,
                "logprob": self.logprob, "n_tokens": self.n_tokens,
                "logprob_per_token": self.logprob / self.n_tokens, "token_logprobs": self.token_logprobs,
                "gate_score": self.gate_score, "flagged": self.flagged}


@dataclass(frozen=True)
class Settings:
    """What is applied: the steering (vector, γ, blocks, positions; ``None`` without a vector), the guidance
    source, λ, and the variant used when a call names none."""

    steering: Steering | None
    guidance: GuidanceSpec
    lam: float
    variant: str
    gate: str = "auto"
    """``auto``: use the vector's harm gate when it has one; ``on``: require one; ``off``: never gate."""
    gate_threshold: float | None = None
    """Overrides the gate's recorded threshold (every frame)."""
    on_flag: str = "steer"
    """What a prompt the gate flags gets: ``steer`` (the variant as configured) or ``refuse`` (``refusal``,
    without decoding it)."""
    refusal: str = DEFAULT_REFUSAL
    speculate: int = DEFAULT_SPECULATE
    """Guided variants: tokens the target drafts per round before the guidance verifies them (0: off)."""

    def values(self) -> dict:
        """Every setting ``with_`` may change, by its name in :data:`~safeinfer_local.schema.SETTINGS` (the
        steering's γ, blocks and positions are ``None`` without a vector)."""
        st = self.steering
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "steering"}
        return out | {"gamma": st.gamma if st else None, "layers": tuple(st.layers) if st else None,
                      "positions": st.positions if st else None}

    def describe(self, variant: str | None = None) -> dict:
        """The settings a call with ``variant`` applies, as recorded in outputs."""
        return schema.describe(self.values(), variant or self.variant)


@dataclass(frozen=True)
class Route:
    """What the harm gate makes of one prompt (:meth:`SafeInfer.route`, :meth:`SafeInfer.route_many`): every
    caller that decodes, scores, serves or evaluates a prompt takes its decision from here."""

    variant: str
    """The variant to decode with: the one asked for, or ``base`` for a prompt the gate judged benign."""
    gate_score: float | None = None
    flagged: bool | None = None
    """True: the gate judged the prompt harmful; False: benign (decoded plainly); None: no gate ran."""
    refuse: bool = False
    """Flagged under ``on_flag=refuse``: answer with the refusal text, decode nothing."""
    handoff: Handoff | None = None
    """The prompt's KV from the gate's reader (the head; for a passed prompt the whole prompt and its next-token
    logits): the side that goes on imports it instead of decoding it again."""

    def refusal(self, prompt: str, variant: str, text: str) -> tuple[Step, Result]:
        """The reply to a refused prompt: ``text``, nothing decoded (stop reason ``refused``)."""
        step = Step(-1, text, finish="refused")
        return step, self.tag(Result(prompt, text, variant, 0, 0.0, 0.0, "refused", [step], 0), variant)

    def tag(self, result: Result, variant: str) -> Result:
        """``result`` saying what the gate did: the variant asked for, the score and the verdict."""
        result.variant, result.gate_score, result.flagged = variant, self.gate_score, self.flagged
        return result


def _vector_hash(vec: SafetyVector) -> str:
    h = hashlib.sha256()
    for layer in sorted(vec.directions):
        h.update(str(layer).encode())
        h.update(vec.directions[layer].tobytes())
    return h.hexdigest()[:16]


def recommended_on_flag(vector: SafetyVector) -> str:
    """What a flagged prompt gets by default with this vector: its recorded recommendation (``guard.on_flag``,
    written by ``vectors gate --on-flag``), else ``steer``."""
    rec = (vector.meta.get("guard") or {}).get("on_flag", "steer")
    return rec if rec in ON_FLAG else "steer"


def _head_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]


class SafeInfer:
    """A model plus (optionally) a safety vector; ``generate``, ``stream`` and ``score`` for any variant."""

    def __init__(self, model: str | Path | Model | None = None, vector: str | Path | SafetyVector | None = "default",
                 gamma: float | None = None, layers: tuple[int, ...] | None = None, positions: str | None = None,
                 n_ctx: int = DEFAULT_N_CTX, n_threads: int | None = None, n_gpu_layers: int = 0,
                 chat_format: str | None = None, guidance: str | GuidanceSpec | None = None, lam: float | None = None,
                 variant: str | None = None, gate: str = "auto", gate_threshold: float | None = None,
                 on_flag: str | None = None, refusal: str = DEFAULT_REFUSAL, speculate: int = DEFAULT_SPECULATE,
                 warn=None) -> None:
        given = locals()
        # every setting (schema.SETTINGS) is checked before anything loads
        c = schema.check_settings({name: given[name] for name in schema.BY_NAME})
        self.model = model if isinstance(model, Model) else Model(resolve_model(model), n_gpu_layers=n_gpu_layers)
        if isinstance(vector, str) and vector == "default":
            path = default_vector_path() if isinstance(model, Model) or model in (None, "default") else None
            vector = path
        if vector is not None and not isinstance(vector, SafetyVector):
            vector = SafetyVector.load(vector)
        self.vector: SafetyVector | None = vector
        if vector is None and (gamma is not None or layers or positions):
            raise UsageError("--gamma/--layers/--positions need a safety vector (--vector)")
        steering = (Steering.from_vector(vector, self.model, c["gamma"], c["layers"], c["positions"], warn=warn)
                    if vector else None)
        self.chat_format = chat_format
        # sGDS settings: explicit, else the vector's recommendation (calibrated per model), else the defaults
        rec = (vector.meta.get("sgds") or {}) if isinstance(vector, SafetyVector) else {}
        spec = c["guidance"] or GuidanceSpec.parse(rec.get("guidance"))
        lam = c["lam"] if c["lam"] is not None else check_lambda(rec.get("lam", DEFAULT_LAMBDA))
        variant = c["variant"] or ("safeinfer" if steering is not None else "sgds")
        self.gate: Gate | None = None
        if isinstance(vector, SafetyVector) and vector.meta.get("gate"):
            self.gate = Gate.from_meta(vector.meta["gate"])
            self.gate.check_fits(self.model.n_embd, self.model.n_layer)
        if on_flag is None:  # the vector's recommendation when it has a gate (``vectors gate --on-flag``), else steer
            on_flag = recommended_on_flag(vector) if self.gate is not None else "steer"
        self.settings = Settings(steering, spec, lam, variant, c["gate"], c["gate_threshold"], on_flag, c["refusal"],
                                 c["speculate"])
        self._decoder = Decoder(self.model, n_ctx=n_ctx, n_threads=n_threads)
        self._check(variant)

    @classmethod
    def default(cls, **kw) -> SafeInfer:
        """The embedded Gemma 3 270M with its shipped safety vector at the recommended settings."""
        return cls(model=None, vector="default", **kw)

    # -- settings -------------------------------------------------------------------------------------------
    def with_(self, **changes) -> SafeInfer:
        """A ``SafeInfer`` with some settings changed (any of :data:`schema.CHANGEABLE
        <safeinfer_local.schema.CHANGEABLE>`: γ, blocks, positions, guidance, λ, variant, the gate's, speculate;
        ``None`` keeps a value); it shares this one's model, vector and decoder."""
        c = {k: v for k, v in schema.check_settings(changes, schema.CHANGEABLE).items() if v is not None}
        s = self.settings
        steering = s.steering
        aim = {k: c.pop(k) for k in ("gamma", "layers", "positions") if k in c}
        if aim:
            if steering is None:
                raise UsageError("gamma/layers/positions need a safety vector")
            steering = Steering.from_vector(steering.vector, self.model, aim.get("gamma", steering.gamma),
                                            aim.get("layers", steering.layers),
                                            aim.get("positions", steering.positions))
        other = object.__new__(SafeInfer)
        other.__dict__.update(self.__dict__)
        other.settings = dataclasses.replace(s, steering=steering, **c)
        other._check(other.settings.variant)
        return other

    def values(self) -> dict:
        """Every setting by its name in :data:`schema.SETTINGS <safeinfer_local.schema.SETTINGS>`, as
        ``SafeInfer(**values)`` rebuilds this object (the model by its path, the vector itself)."""
        return self.settings.values() | {
            "model": str(self.model.path), "vector": self.vector, "chat_format": self.chat_format,
            "n_ctx": self.n_ctx, "n_threads": self.n_threads, "n_gpu_layers": self.model.n_gpu_layers}

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
        """What decides this object's outputs, for files that must not mix runs: every setting the schema marks
        (``Setting.fingerprint``), the model by its name and a hash of its first MiB, the vector by a hash of its
        directions, the gate by its digest (``None`` when off)."""
        vals = self.values()
        out: dict = {}
        for st in schema.SETTINGS:
            v = vals[st.name]
            if not st.fingerprint or (st.omit_default and v == st.default):
                continue
            if st.name == "model":
                out |= {"model": self.model.path.name, "model_sha256_head": _head_hash(self.model.path)}
            elif st.name == "vector":
                out["vector_sha256"] = _vector_hash(self.vector) if self.vector is not None else None
            elif st.name == "gate":
                out["gate"] = self.gate.digest() if self.gate is not None and v != "off" else None
            else:
                out[st.name] = list(v) if isinstance(v, tuple) else str(v) if isinstance(v, GuidanceSpec) else v
        return out

    def default_variant(self) -> str:
        """``safeinfer`` when a vector is loaded, else ``sgds`` (guidance without amplification), unless the
        settings name another."""
        return self.settings.variant

    def _check(self, variant: str) -> None:
        check_variant(variant)
        self._decoder.check(variant, self.steering, self.settings.guidance)

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
    def _batch(self, variant: str, slots: int = 1, layout: str = "auto", prefill_chunk: int = 0):
        s = self.settings
        return self._decoder.batch(variant, s.steering, s.guidance, s.lam, slots, s.speculate, layout,
                                   prefill_chunk)

    def batch(self, variant: str | None = None, slots: int = 1, layout: str = "auto",
              prefill_chunk: int = 0) -> BatchGenerator:
        """The one decode loop (:class:`BatchGenerator`: insert / step / remove) for ``variant`` under these
        settings, with ``slots`` request slots. Generators run on the decoder's sides (llama.cpp contexts kept per
        role, guidance and slot count, shared by every settings copy): two generators whose ``target`` or
        ``guide`` side is the same object must not hold requests at the same time. ``layout``: see
        :meth:`generate_many` (``auto`` suits slots that are mostly full; ``split`` a request often alone).
        ``prefill_chunk`` > 0: a long prompt that arrives while others run is decoded that many tokens per step
        between their steps (serve), instead of stalling them while its whole head decodes."""
        return self._batch(self._variant(variant), slots, layout, prefill_chunk)

    # -- the harm gate ---------------------------------------------------------------------------------------
    def active_gate(self, variant: str | None = None) -> Gate | None:
        """The gate a call with ``variant`` goes through (None: it is not gated), with any threshold override."""
        s = self.settings
        if (variant or s.variant) == "base" or s.gate == "off":
            return None
        if self.gate is None:
            if s.gate == "on":
                raise UsageError("--gate on needs a vector with a harm gate (build one with `safeinfer vectors gate`)")
            return None
        return self.gate if s.gate_threshold is None else self.gate.with_threshold(s.gate_threshold)

    def gate_scores(self, prompts: list[str | list[Message]], raw: bool = False, frame: str | None = None):
        """The gate's score for each prompt (numpy array); a prompt is flagged at or above the threshold."""
        g = self.gate  # scores do not depend on the threshold
        if g is None:
            raise UsageError("this vector has no harm gate (build one with `safeinfer vectors gate`)")
        fr = resolve_frame(raw, frame)
        toks = [self.encode_prompt(p, frame=fr)[0] for p in prompts]
        return g.frame(fr).score(self._decoder.features(g.read, toks))

    def route_many(self, token_lists: list[list[int]], variant: str | None = None,
                   frame: str = "template") -> list[Route | UsageError]:
        """The harm gate's decision for each encoded prompt, many read per decode (no head KV kept: for batches
        and scores); a prompt the gate cannot read (too long) gets its ``UsageError`` in place of a Route."""
        variant = self._variant(variant)
        g = self.active_gate(variant)
        if g is None:
            return [Route(variant)] * len(token_lists)
        fg = g.frame(frame)
        try:
            feats = list(self._decoder.features(g.read, token_lists))
        except UsageError:
            feats = []
            for t in token_lists:
                try:
                    feats.append(self._decoder.features(g.read, [t])[0])
                except UsageError as e:
                    feats.append(e)
        return [f if isinstance(f, UsageError) else self._route(variant, float(fg.score(f)[0]), fg)
                for f in feats]

    def _route(self, variant: str, score: float, fg, handoff: Handoff | None = None) -> Route:
        flagged = fg.flags(score)
        return Route(variant if flagged else "base", score, flagged,
                     flagged and self.settings.on_flag == "refuse", handoff)

    @staticmethod
    def _tag(events, variant: str, route: Route):
        for step, res in events:
            if res is not None:
                route.tag(res, variant)
            yield step, res

    # -- verbs ----------------------------------------------------------------------------------------------
    def events(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False,
               frame: str | None = None, **gen) -> Iterator[tuple[Step, Result | None]]:
        """Yield ``(step, None)`` per token and ``(last step, Result)`` at the end: what :meth:`stream` and
        :meth:`generate` are made of. With a harm gate, the prompt is scored first: a prompt judged benign is
        decoded plainly (no vector, no guidance decode), a flagged one as configured, or refused."""
        variant = self._variant(variant)
        fr = resolve_frame(raw, frame)
        tokens, stops = self.encode_prompt(prompt, frame=fr)
        cfg = GenConfig(**{**gen, "stop": tuple(gen.get("stop", ())) + stops})
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        r = self.route(tokens, variant, fr)
        if r.refuse:
            yield r.refusal(text, variant, self.settings.refusal)
            return
        yield from self._tag(self._decoder.stream(self._batch(r.variant), tokens, cfg, text, r.handoff), variant, r)

    def route(self, tokens: list[int], variant: str | None = None, frame: str = "template") -> Route:
        """The harm gate's decision for one encoded prompt (:meth:`encode_prompt`): without a gate, ``variant``
        as asked; with one, the gate's reader decodes the prompt once, scores it, and keeps its KV for the side
        that goes on (``Route.handoff``): a prompt judged benign runs ``base`` without decoding its prompt again
        (a ``final`` read hands on the whole prompt and the first token's logits), a flagged one decodes only its
        last prompt token (with the vector)."""
        variant = self._variant(variant)
        g = self.active_gate(variant)
        if g is None:
            return Route(variant)
        fg = g.frame(frame)
        feat, handoff = self._decoder.features_and_head(g.read, tokens,
                                                        whole=lambda f: not fg.flags(float(fg.score(f)[0])))
        return self._route(variant, float(fg.score(feat)[0]), fg, handoff)

    def stream(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False,
               frame: str | None = None, **gen) -> Iterator[Step]:
        """Yield :class:`Step` objects (token, text, log-prob, whether guidance changed the token); the last one
        says why generation finished."""
        for step, _ in self.events(prompt, variant, raw, frame, **gen):
            yield step

    def generate(self, prompt: str | list[Message], variant: str | None = None, raw: bool = False,
                 frame: str | None = None, **gen) -> Result:
        """Generate a reply (``gen``: the fields of :class:`GenConfig`); ``raw``/``frame`` as in
        :meth:`encode_prompt`."""
        steps: list[Step] = []
        result = None
        for step, res in self.events(prompt, variant, raw, frame, **gen):
            steps.append(step)
            result = res or result
        assert result is not None
        result.steps = steps
        return result

    def generate_many(self, prompts: Iterable[tuple[Hashable, str | list[Message]]], variant: str | None = None,
                      raw: bool = False, frame: str | None = None, n_parallel: int = 1, layout: str = "auto",
                      **gen) -> Iterator[tuple[Hashable, Result | UsageError]]:
        """Yield ``(key, Result or UsageError)`` for ``(key, prompt)`` pairs as each finishes, decoding up to
        ``n_parallel`` of them in the same batches. A prompt that cannot run yields its error, and the rest go
        on. With a harm gate, every prompt is scored first (many per decode), and the benign ones and the
        flagged ones each go through their own batches. ``layout``: where a guided variant's two sides decode
        (``auto`` | ``split`` | ``shared``; see :meth:`Decoder.batch <safeinfer_local.decode.decoder.Decoder.batch>`):
        ``split`` keeps each side's batches the same as an unguided variant's, for comparisons between variants."""
        variant = self._variant(variant)
        fr = resolve_frame(raw, frame)
        cfg = GenConfig(**{**gen, "stop": tuple(gen.get("stop", ())) + self.frame_stops(frame=fr)})
        if self.active_gate(variant) is None:
            yield from self._many(variant, self._encoded(prompts, fr), cfg, n_parallel, layout)
            return
        enc = []
        for item in self._encoded(prompts, fr):
            if isinstance(item[1], UsageError):
                yield item
            else:
                enc.append(item)
        groups: dict[str, list] = {}
        for (key, text, toks), r in zip(enc, self.route_many([t for _, _, t in enc], variant, fr), strict=True):
            if isinstance(r, UsageError):
                yield key, r
            elif r.refuse:
                yield key, r.refusal(text, variant, self.settings.refusal)[1]
            else:
                groups.setdefault(r.variant, []).append((key, text, toks, r))
        for run, reqs in groups.items():
            routes = {key: r for key, _, _, r in reqs}
            for key, res in self._many(run, ((k, t, tk) for k, t, tk, _ in reqs), cfg, n_parallel, layout):
                yield key, routes[key].tag(res, variant) if isinstance(res, Result) else res

    def _encoded(self, prompts, frame: str):
        for key, prompt in prompts:
            try:
                tokens, _ = self.encode_prompt(prompt, frame=frame)
            except UsageError as e:
                yield key, e
                continue
            yield key, prompt if isinstance(prompt, str) else prompt[-1]["content"], tokens

    def _many(self, variant: str, encoded, cfg: GenConfig, n_parallel: int, layout: str = "auto"):
        errors: list = []

        def requests():
            for item in encoded:
                if isinstance(item[1], UsageError):
                    errors.append(item)
                else:
                    yield item

        for key, res in self._decoder.generate_many(self._batch(variant, n_parallel, layout), requests(), cfg):
            while errors:
                yield errors.pop(0)
            yield key, res
        while errors:
            yield errors.pop(0)

    def score(self, prompt: str | list[Message], continuation: str, variant: str | None = None,
              raw: bool = False, frame: str | None = None) -> Score:
        """Teacher-forced log-probability of ``continuation`` (tokenized without BOS) after the prompt, under
        the variant's own next-token distribution at T = 1. In the ``qa`` frame the continuation follows
        ``A:`` after a space. With a harm gate, a prompt judged benign is scored under ``base``."""
        variant = self._variant(variant)
        if not continuation:
            raise UsageError("empty continuation")
        fr = resolve_frame(raw, frame)
        tokens, _ = self.encode_prompt(prompt, frame=fr)
        cont = self.model.tokenize(frame_cont(continuation, fr), add_bos=False)
        r = self.route_many([tokens], variant, fr)[0]
        if isinstance(r, UsageError):
            raise r
        lps = self.score_tokens(tokens, cont, r.variant)
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        return Score(text, continuation, variant, float(lps.sum()), len(cont), [float(x) for x in lps],
                     r.gate_score, r.flagged)

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
