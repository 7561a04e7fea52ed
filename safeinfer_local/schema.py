"""Every setting of a :class:`~safeinfer_local.api.SafeInfer`, declared once.

Each :class:`Setting` carries its check, its command-line flag and help, whether a request may set it (serve's
``safeinfer`` object), whether it is fixed when the model loads, whether it enters the fingerprint (what files
that must not mix runs record) and whether it shapes the decode (serve's group key). Everything that lists
settings is derived from :data:`SETTINGS`: ``SafeInfer.__init__`` (which checks them all before it loads a model),
``with_``, ``describe``, ``fingerprint`` and ``values``; the CLI's options and ``options.load``; serve's
``SafetyOptions`` and group key; ``ray.settings_of``. ``tests/test_schema.py`` checks each derivation covers every
field.

To add a setting: one :class:`Setting` here, the value's home in ``api.Settings`` (and where it acts), then a
command takes its option as ``o.option("name")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .core.gate import DEFAULT_REFUSAL, GATE_MODES, ON_FLAG
from .core.settings import (
    DEFAULT_N_CTX,
    DEFAULT_SPECULATE,
    GUIDED_VARIANTS,
    SA_VARIANTS,
    VARIANTS,
    check_choice,
    check_gamma,
    check_lambda,
    check_positions,
    check_speculate,
    check_variant,
)
from .decode.guidance import GuidanceSpec
from .errors import SettingError

MAX_THREADS = 512
MIN_N_CTX = 16


@dataclass(frozen=True)
class Setting:
    """One setting: ``name`` is its keyword in ``SafeInfer(...)``/``with_(...)``, ``flag`` its CLI option."""

    name: str
    flag: str
    help: str
    default: Any = None
    """``None``: not given (the vector's recommendation, or the default the help names)."""
    check: Callable[[Any], Any] | None = None
    """A given value -> the value normalised; raises :class:`~safeinfer_local.errors.SettingError`."""
    parse: Callable[[str], Any] | None = None
    """The CLI's text -> the value (before ``check``), for values that are not a plain str, int or float."""
    type: type = str
    """The CLI option's type."""
    short: str | None = None
    load: bool = False
    """Fixed when the model loads: ``SafeInfer(...)`` takes it, ``with_`` cannot change it."""
    request: bool = False
    """Serve: a request's ``safeinfer`` object may set it."""
    fingerprint: bool = True
    """Enters ``SafeInfer.fingerprint()`` (outputs of another value must not be mixed with these)."""
    omit_default: bool = False
    """In the fingerprint only when not ``default`` (so files written before the setting existed still resume)."""
    group: bool = False
    """Shapes the decode: part of ``describe()`` and of serve's group key (requests that may share a batch)."""
    variants: tuple[str, ...] = ()
    """The variants whose ``describe()`` records it (``group`` settings and the gate's)."""

    def checked(self, value: Any) -> Any:
        """``value`` checked and normalised (``None``, not given, stays ``None``)."""
        if value is None or self.check is None:
            return value
        return self.check(value)


def _int(name: str, lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(x):
        if isinstance(x, bool) or not isinstance(x, int) or x < lo or (hi is not None and x > hi):
            span = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise SettingError(f"{name} must be an integer {span}, not {x!r}")
        return x
    return check


def _threshold(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise SettingError(f"--gate-threshold must be a finite number, not {x}")
    return float(x)


def _refusal(x) -> str:
    if not isinstance(x, str) or not x.strip():
        raise SettingError("the refusal text must not be empty")
    return x


def parse_layers(spec: str) -> tuple[int, ...]:
    """``--layers 6,8`` -> ``(6, 8)``."""
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise SettingError(f"--layers must be block numbers separated by commas, not {spec!r}") from None


def _layers(x) -> tuple[int, ...]:
    layers = parse_layers(x) if isinstance(x, str) else tuple(x)
    if not layers or any(isinstance(b, bool) or not isinstance(b, int) for b in layers):
        raise SettingError(f"--layers must be block numbers, not {x!r}")
    return layers


def _guidance(x):
    return x if isinstance(x, GuidanceSpec) else GuidanceSpec.parse(x)


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "--model", "GGUF model path (default: the embedded Gemma 3 270M).", short="-m", load=True),
    Setting("vector", "--vector", "Safety vector GGUF/.npz/.npy ('none' for no vector). Default: the shipped "
            "vector when the default model is used.", load=True),
    Setting("gamma", "--gamma", "Vector strength γ (default: the vector's recommended γ).", check=check_gamma,
            type=float, request=True, group=True, variants=SA_VARIANTS),
    Setting("layers", "--layers", "Blocks to steer, e.g. 8 or 6,8 (default: the vector's).", check=_layers,
            parse=parse_layers, group=True, variants=SA_VARIANTS),
    Setting("positions", "--positions", "generation | last | all (default: the vector's).", check=check_positions,
            group=True, variants=SA_VARIANTS),
    Setting("guidance", "--guidance", "sGDS guidance: prompt | negative | none | model:PATH | lora:PATH (default: "
            "the vector's recommendation, else prompt).", check=_guidance, request=True, group=True,
            variants=GUIDED_VARIANTS),
    Setting("lam", "--lam", "sGDS λ in [0, 1) (default: the vector's recommendation, else 0.99, the paper's).",
            check=check_lambda, type=float, request=True, group=True, variants=GUIDED_VARIANTS),
    Setting("speculate", "--speculate", "Guided variants: the target drafts K tokens ahead while the guidance "
            "verifies the previous K in one batch (0 = off; on this 2-core CPU 0 measured fastest, see "
            "docs/RESULTS.md).", default=DEFAULT_SPECULATE, check=check_speculate, type=int, omit_default=True,
            group=True, variants=GUIDED_VARIANTS),
    Setting("variant", "--variant", f"{' | '.join(VARIANTS)} (SA + sGDS). Default: safeinfer when a vector is "
            "loaded, else sgds.", check=check_variant, request=True, fingerprint=False, group=True,
            variants=VARIANTS),
    Setting("gate", "--gate", "auto | on | off: score the prompt with the vector's harm gate and steer only prompts "
            "it flags (auto: when the vector has a gate; off: every prompt as before).", default="auto",
            check=lambda x: check_choice("gate", x, GATE_MODES), request=True, variants=VARIANTS[1:]),
    Setting("gate_threshold", "--gate-threshold", "Flag at this gate score instead of the recorded threshold.",
            check=_threshold, type=float, variants=VARIANTS[1:]),
    Setting("on_flag", "--on-flag", "steer | refuse: a flagged prompt gets the variant, or a fixed refusal without "
            "decoding it (--refusal). Default: the vector's recommendation (the shipped vector's: refuse), else "
            "steer.", check=lambda x: check_choice("on-flag", x, ON_FLAG), variants=VARIANTS[1:]),
    Setting("refusal", "--refusal", "The reply to a flagged prompt with --on-flag refuse.", default=DEFAULT_REFUSAL,
            check=_refusal, omit_default=True),
    Setting("chat_format", "--chat-format", "A built-in chat format (chatml, llama-2, gemma, ...) instead of the "
            "GGUF's template (default: the GGUF's template; without one, gemma for Gemma models, else chatml).",
            load=True),
    Setting("n_ctx", "--n-ctx", "Context length in tokens.", default=DEFAULT_N_CTX,
            check=_int("--n-ctx", MIN_N_CTX), type=int, load=True, fingerprint=False),
    Setting("n_threads", "--threads", "CPU threads (default: all cores).", check=_int("--threads", 1, MAX_THREADS),
            type=int, load=True, fingerprint=False),
    Setting("n_gpu_layers", "--n-gpu-layers", "Layers to offload on Metal/CUDA builds (-1 = all).", default=0,
            check=_int("--n-gpu-layers", -1), type=int, load=True, fingerprint=False),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
CHANGEABLE = tuple(s.name for s in SETTINGS if not s.load)
"""What ``SafeInfer.with_`` may change."""
REQUEST = tuple(s.name for s in SETTINGS if s.request)
"""What a request's ``safeinfer`` object may set (serve)."""
GROUP = tuple(s.name for s in SETTINGS if s.group)
"""What shapes the decode (serve's group key)."""


def check_settings(given: dict[str, Any], allowed: tuple[str, ...] = tuple(BY_NAME)) -> dict[str, Any]:
    """Every given setting (``None``: not given) checked and normalised, before anything loads; an unknown or
    not-allowed name is a ``TypeError`` (a programming error, as a wrong keyword would be)."""
    out = {}
    for name, value in given.items():
        if name not in allowed:
            raise TypeError(f"unknown setting {name!r}" if name not in BY_NAME else f"{name} is fixed when the model "
                            "loads (make another SafeInfer)")
        out[name] = BY_NAME[name].checked(value)
    return out


def describe(values: dict[str, Any], variant: str) -> dict:
    """The settings a call with ``variant`` applies, as recorded in outputs: each setting whose ``variants``
    include it, except a decode-shaping one without a value (γ, blocks, positions without a vector) and an
    ``omit_default`` one at its default."""
    out: dict = {"variant": variant}
    for s in SETTINGS:
        if s.name == "variant" or variant not in s.variants:
            continue
        v = values[s.name]
        if (v is None and s.group) or (s.omit_default and v == s.default):  # no vector: nothing steered
            continue
        out[s.name] = list(v) if isinstance(v, tuple) else str(v) if isinstance(v, GuidanceSpec) else v
    return out
