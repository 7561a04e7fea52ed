"""Safety amplification as applied: the vector, γ, the blocks it is added to, and the chunks of the decode layout
that get it (``positions``)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..core.settings import GUIDED_VARIANTS, SA_VARIANTS, check_gamma, check_positions
from ..core.vectors import SafetyVector
from ..errors import VectorError
from ..llama.engine import Model

Buffers = tuple
"""(prompt[:-1], last prompt token, generated tokens): a control-vector buffer or None each."""

NO_VECTOR: Buffers = (None, None, None)


@dataclass(frozen=True)
class Steering:
    """Safety amplification as applied: vector, γ, the blocks it is added to, and at which positions."""

    vector: SafetyVector
    gamma: float
    layers: tuple[int, ...]
    positions: str

    @classmethod
    def from_vector(cls, vector: SafetyVector, model: Model, gamma: float | None = None,
                    layers: tuple[int, ...] | None = None, positions: str | None = None,
                    warn=None) -> Steering:
        """Resolve settings (explicit value, else the vector's recommendation) and check the vector fits."""
        if vector.n_embd != model.n_embd:
            raise VectorError(f"vector has n_embd {vector.n_embd} but the model {model.name} has {model.n_embd}: "
                              "it was built for another model")
        hint = vector.model_hint
        if hint and hint not in (model.name, model.arch, model.path.name, model.path.stem):
            msg = f"vector was built for {hint!r}, this model is {model.name!r} ({model.arch})"
            (warn or (lambda m: warnings.warn(m, stacklevel=3)))(msg)
        g = check_gamma(vector.gamma if gamma is None else gamma)
        use = tuple(layers) if layers else vector.layers
        for i in use:
            if not 1 <= i <= model.n_layer - 1:
                raise VectorError(f"layer {i} is out of range: {model.name} has blocks 1..{model.n_layer - 1} "
                                  "that can be steered")
            if i not in vector.directions:
                raise VectorError(f"layer {i} is not in the vector (it has {sorted(vector.directions)})")
        return cls(vector, g, use, check_positions(positions or vector.positions))

    def buffer(self, n_layer: int) -> np.ndarray:
        return self.vector.buffer(n_layer, self.gamma, self.layers)


def position_buffers(steering: Steering | None, n_layer: int, sign: float = 1.0) -> Buffers:
    """Which chunks of the decode layout get the vector, per the steering's positions."""
    if steering is None:
        return NO_VECTOR
    b = steering.buffer(n_layer) * np.float32(sign)
    return {"generation": (None, b, b), "last": (None, b, None), "all": (b, b, b)}[steering.positions]


def check_steerable(model: Model, blocks: tuple[int, ...], what: str, n_threads: int | None = None) -> None:
    """Refuse ``what`` (a variant, a guidance, a build) on a model whose llama.cpp graph ignores control vectors
    at ``blocks`` (probed once per model, :meth:`Model.applies_control_vector`): it would silently do nothing."""
    if not model.applies_control_vector(blocks, n_threads):
        raise VectorError(f"llama.cpp ignores control vectors on the {model.arch} architecture ({model.path.name}), "
                          f"so {what} would change nothing; use --variant sgds with --guidance prompt or model:PATH, "
                          "which need no vector")


def check_plan_steerable(model: Model, steering: Steering | None, variant: str, source,
                         n_threads: int | None = None) -> None:
    """The control-vector check for what a variant applies: +γ·SV on the target (``sa``, ``safeinfer``) and, for a
    guidance ``source`` (a :class:`~.guidance.GuidanceSource`) whose guidance side carries the vector
    (``guide_vector``, e.g. ``negative``), on the guidance of ``sgds``/``safeinfer``."""
    if steering is None:
        return
    if variant in SA_VARIANTS:
        check_steerable(model, steering.layers, f"variant {variant!r}", n_threads)
    if variant in GUIDED_VARIANTS and source.guide_vector:
        check_steerable(model, steering.layers, f"--guidance {source.kind}", n_threads)
