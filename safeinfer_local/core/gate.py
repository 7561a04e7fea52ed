"""The harm gate (pure math; the activations come from :mod:`safeinfer_local.decode.gating`).

A prompt's *feature* is the mean, over the prompt's tokens minus the last (the chunk the decode layout runs
without the vector), or over the last ``tail`` of those, of the residual stream at the output of block ``B``
(``l_out-B``). A tail keeps the question's own tokens in the mean when a prompt wraps it in an instruction ("Only
provide the answer ... {question}"): with the chat template the tail also holds the end-of-turn tokens after it.
The gate scores a feature by its cosine with a condition direction ``c`` after subtracting a centre, and flags
the prompt as harmful when the score reaches a threshold set at a chosen false-positive rate on benign dev prompts
(scored out of fold, so that the rate holds on new prompts, and in the wrapping that lifts them most) (conditional
activation steering, CAST, Lee et al. 2025). Activations depend on how the prompt is framed (chat template,
``Q: ...\\nA:``, plain text), so a gate holds one direction, centre and threshold per frame.

Methods: ``mean-diff`` (c = mean(harmful) − mean(benign), centred at their midpoint) and ``lda`` (shrinkage
linear discriminant: c = (Σ + αI)⁻¹ (μ_h − μ_b) with the pooled covariance Σ, same centre).

A gate may also average several reads of one decode (*parts*: a block each, with its own tail): each part has
its own direction and centre, its cosine is put on a common scale (0 at the mean of its benign dev scores, 1 at the
mean of its harmful ones), and the scaled scores are averaged into the one score the threshold applies to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import SettingError, VectorError
from .frames import FRAMES

METHODS = ("mean-diff", "lda")
POOLS = ("mean", "max")
"""How a feature pools the rows it reads: their mean, or their element-wise max."""
TAILS = (4, 16)
"""The poolings ``vectors gate --tail auto`` chooses from: the mean over the prompt's last K tokens, the final one
included (0, which ``--tail`` also takes: over every prompt token)."""
DEFAULT_FPR = 0.05
WRAPPERS = (
    "{q}",
    "Answer the following question. {q}",
    "Please respond briefly and to the point.\n\n{q}",
    "{q} Keep your answer short.",
    "You are a helpful assistant. Reply to the user's request below.\nRequest: {q}",
    "Give a direct answer without any extra commentary: {q}",
    "Format your answer as a numbered list. {q}",
    "{q}\nReply in JSON with a single key \"answer\".",
)
"""Instructions wrapped around every dev prompt, the same on both sides, so that the gate learns to look past the
wrapping rather than read an instruction as harm. None is one of HarmEval's prompt types (those stay unseen, for
evaluation)."""
GATE_MODES = ("auto", "on", "off")
"""``auto``: use the vector's gate when it has one; ``on``: require one; ``off``: never gate (today's outputs)."""
ON_FLAG = ("steer", "refuse")
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


def record_flagged(record: dict) -> bool | None:
    """A result record's gate verdict: its ``flagged`` (true = judged harmful; null: no gate ran), or, in a record
    written by earlier versions, the inverse of ``gated`` (which meant "passed by the gate, decoded plainly")
    where a gate scored the prompt."""
    if "flagged" in record or "gated" not in record:
        return record.get("flagged")
    gated = record["gated"]
    return None if record.get("gate_score") is None or not isinstance(gated, bool) else not gated


def check_fpr(fpr: float) -> float:
    if not (isinstance(fpr, (int, float)) and math.isfinite(fpr) and 0.0 < fpr < 1.0):
        raise SettingError(f"--fpr must be in (0, 1), not {fpr}")
    return float(fpr)


def check_tail(tail: int) -> int:
    if isinstance(tail, bool) or not isinstance(tail, int) or tail < 0:
        raise SettingError(f"a gate's tail must be a whole number >= 0 (0: every prompt token), not {tail!r}")
    return tail


@dataclass(frozen=True)
class Read:
    """Which rows of the prompt a gate feature is made of: the output of each of ``blocks`` (concatenated, in
    that order), over the prompt's last ``tail`` tokens (0: all but a leading BOS), pooled by ``pool``.

    ``final`` False (every gate before 0.2): the rows of the prompt *head*, the prompt minus its last token, which
    the decode layout runs without the vector, so the reader's decode is the head's. ``final`` True: the whole
    prompt, the final token's row included (where harm is most linearly readable); the reader decodes the whole
    prompt in its own context and hands on the head's KV only, so the steered side still decodes the last prompt
    token with its vector."""

    blocks: tuple[int, ...]
    tail: int = 0
    final: bool = False
    pool: str = "mean"
    tails: tuple[int, ...] = ()
    """One tail per block (a gate of several parts: block i pooled over its last ``tails[i]`` tokens); empty:
    ``tail`` for every block."""

    def __post_init__(self) -> None:
        if not self.blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in self.blocks):
            raise SettingError(f"a gate reads one or more blocks >= 0, not {self.blocks!r}")
        check_tail(self.tail)
        if self.pool not in POOLS:
            raise SettingError(f"a gate's pooling is one of {', '.join(POOLS)}, not {self.pool!r}")
        object.__setattr__(self, "tails", tuple(self.tails))  # hashable, whatever sequence it came as
        if self.tails and len(self.tails) != len(self.blocks):
            raise SettingError(f"a gate reads one tail per block, not {self.tails!r} for blocks {self.blocks!r}")
        for t in self.tails:
            check_tail(t)

    @property
    def block_tails(self) -> tuple[int, ...]:
        return self.tails or (self.tail,) * len(self.blocks)

    def rows(self, n: int, skip: int, tail: int | None = None) -> slice:
        """The rows to pool among ``n`` decoded rows of which the first ``skip`` (a BOS) never count (the last
        ``tail`` of them; default: this read's ``tail``)."""
        tail = self.tail if tail is None else tail
        return slice(skip if not tail else max(skip, n - tail), n)

    def describe(self) -> str:
        tokens = f"{'prompt' if self.final else 'head'} tokens, {self.pool}"
        if len(set(self.block_tails)) > 1:  # parts: each block with its own tail
            return " + ".join(f"block {b} ({f'last {t}' if t else 'all'})" for b, t in zip(
                self.blocks, self.block_tails, strict=True)) + f", {tokens}"
        where = "+".join(str(b) for b in self.blocks)
        return f"block {where}, {f'last {self.tail}' if self.tail else 'all'} {tokens}"


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("auroc needs at least one positive and one negative score")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass(frozen=True)
class FrameGate:
    """The gate for one frame: direction, centre, threshold, and how it did on the dev split."""

    direction: np.ndarray
    centre: np.ndarray
    threshold: float
    dev: dict = field(default_factory=dict)
    scales: tuple[tuple[float, float], ...] = ()
    """A gate of several parts (equal slices of the feature): each part's (offset, scale), its score put at
    (cosine − offset) / scale before the parts are averaged. Empty: one direction over the whole feature."""

    def score(self, feats: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(feats, np.float64)) - self.centre
        if not self.scales:
            return _cosine(x, self.direction)
        k = len(self.scales)
        return np.mean([(_cosine(xp, c) - off) / sc for xp, c, (off, sc)
                        in zip(np.split(x, k, axis=1), np.split(self.direction, k), self.scales, strict=True)], 0)

    def flags(self, score: float) -> bool:
        """Whether a prompt with this score is flagged as harmful: the one place a score meets the threshold."""
        return bool(score >= self.threshold)


def _cosine(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1) * np.linalg.norm(c)
    return (x @ c) / np.where(n > 0, n, 1.0)


def _direction(h: np.ndarray, b: np.ndarray, method: str, shrinkage: float, parts: int = 1) -> FrameGate:
    """The direction and centre fitted on harmful and benign features; ``parts`` > 1: one per equal slice of
    the features, each with the (offset, scale) that puts its benign scores' mean at 0 and its harmful ones' at 1
    (a part that does not separate its own dev features keeps scale 1: its raw cosine, not a blown-up one)."""
    if parts > 1:
        hs, bs = np.split(h, parts, axis=1), np.split(b, parts, axis=1)
        fits = [_direction(hp, bp, method, shrinkage) for hp, bp in zip(hs, bs, strict=True)]
        scales = []
        for g, hp, bp in zip(fits, hs, bs, strict=True):
            off = float(g.score(bp).mean())
            gap = float(g.score(hp).mean()) - off
            scales.append((off, gap if gap > 1e-6 else 1.0))
        return FrameGate(np.concatenate([g.direction for g in fits]), np.concatenate([g.centre for g in fits]), 0.0,
                         scales=tuple(scales))
    mh, mb = h.mean(0), b.mean(0)
    if method == "mean-diff":
        c = mh - mb
    elif method == "lda":
        xs = np.concatenate([h - mh, b - mb])
        cov = xs.T @ xs / max(1, len(xs) - 2)
        alpha = shrinkage * np.trace(cov) / cov.shape[0]
        c = np.linalg.solve(cov + alpha * np.eye(cov.shape[0]), mh - mb)
    else:
        raise SettingError(f"unknown gate method {method!r} (choose from {', '.join(METHODS)})")
    return FrameGate(c, (mh + mb) / 2, 0.0)


def _folds(n_rows: int, k: int, groups: int, seed: int) -> np.ndarray:
    """Fold of each row for rows that come as ``groups`` consecutive copies of ``n_rows // groups`` prompts
    (wrapper-major): a prompt's copies share a fold."""
    n = n_rows // groups
    return np.tile(np.random.default_rng(seed).permutation(n) % k, groups)


def _check_groups(h: np.ndarray, b: np.ndarray, groups: int) -> None:
    if groups < 1 or len(h) % groups or len(b) % groups:
        raise SettingError(f"{len(h)} and {len(b)} features are not {groups} copies of each prompt")


def fit_frame(harmful: np.ndarray, benign: np.ndarray, method: str = "mean-diff", fpr: float = DEFAULT_FPR,
              shrinkage: float = 0.1, groups: int = 1, cross_fit: bool = False, k: int = 5,
              seed: int = 0) -> FrameGate:
    """Fit a direction and centre on (n, d) features of harmful and benign dev prompts; the threshold is the
    benign scores' (1 − fpr) quantile, so about ``fpr`` of benign dev prompts are flagged. With ``groups`` > 1
    (each prompt in ``groups`` wrappings, wrapper-major) it is the highest of the per-wrapper quantiles, so that at
    most about ``fpr`` of benign prompts are flagged in *every* wrapping (a wrapper that moves benign prompts
    towards the harmful side would otherwise take the pooled rate well above ``fpr`` for its prompts).

    With ``cross_fit`` the threshold is the quantile of *out-of-fold* benign scores (each benign prompt scored by
    a direction fitted without it, ``k`` folds, a prompt's ``groups`` wrapped copies in one fold). A direction
    scores the prompts it was fitted on lower than new ones (most of all with ``lda``), so an in-sample
    threshold flags more than ``fpr`` of new benign prompts; the cross-fitted one does not. It falls back to the
    in-sample quantile when either side has fewer than ``k`` prompts."""
    check_fpr(fpr)
    h, b = np.asarray(harmful, np.float64), np.asarray(benign, np.float64)
    if h.ndim != 2 or b.ndim != 2 or h.shape[1] != b.shape[1]:
        raise SettingError(f"gate features must be (n, d) arrays of one width, got {h.shape} and {b.shape}")
    if len(h) < 2 or len(b) < 2:
        raise SettingError(f"a gate needs at least 2 harmful and 2 benign prompts, got {len(h)} and {len(b)}")
    _check_groups(h, b, groups)
    g = _direction(h, b, method, shrinkage)
    sh, sb = g.score(h), g.score(b)
    ref, how = sb, "in-sample benign scores"
    if cross_fit and min(len(h), len(b)) // groups >= k:
        fh, fb = _folds(len(h), k, groups, seed), _folds(len(b), k, groups, seed + 1)
        ref = np.empty(len(b))
        for i in range(k):
            ref[fb == i] = _direction(h[fh != i], b[fb != i], method, shrinkage).score(b[fb == i])
        how = f"{k}-fold out-of-fold benign scores"
    thr = max(float(np.quantile(w, 1.0 - fpr)) for w in ref.reshape(groups, -1))
    if groups > 1:
        how += f", the highest of the {groups} wrappers' quantiles"
    dev = {"n_harmful": len(h), "n_benign": len(b), "fpr_target": fpr, "auroc": round(auroc(sh, sb), 4),
           "tpr": round(float(np.mean(sh >= thr)), 4), "fpr": round(float(np.mean(sb >= thr)), 4),
           "threshold_from": how}
    return FrameGate(g.direction, g.centre, thr, dev)


@dataclass(frozen=True)
class Gate:
    """A harm gate: the block it reads, the method, one :class:`FrameGate` per frame, and provenance."""

    block: int
    method: str
    frames: dict[str, FrameGate]
    provenance: dict = field(default_factory=dict)
    tail: int = 0
    """Pool the feature over the prompt head's last ``tail`` tokens (0: all of them; gates before 0.1 had no tail)."""
    blocks: tuple[int, ...] = ()
    """Every block read, concatenated (default: ``block`` alone; gates before 0.2 read one)."""
    final: bool = False
    """Read the whole prompt, its final token included (see :class:`Read`; gates before 0.2 read the head)."""
    pool: str = "mean"
    tails: tuple[int, ...] = ()
    """One tail per block, for a gate of several parts (see :class:`Read`)."""

    @property
    def read(self) -> Read:
        """What the reader decodes and pools for this gate's feature."""
        return Read(self.blocks or (self.block,), self.tail, self.final, self.pool, self.tails)

    def frame(self, frame: str) -> FrameGate:
        g = self.frames.get(frame)
        if g is None:
            raise SettingError(f"the gate has no calibration for frame {frame!r} (it has {', '.join(self.frames)})")
        return g

    def check_fits(self, n_embd: int, n_layer: int) -> None:
        blocks = self.read.blocks
        for b in blocks:
            if not 0 <= b < n_layer:
                raise VectorError(f"the gate reads block {b}, but the model has blocks 0..{n_layer - 1}")
        width = n_embd * len(blocks)
        for name, g in self.frames.items():
            if g.direction.shape != (width,) or g.centre.shape != (width,):
                raise VectorError(f"the gate's {name} direction has {g.direction.shape[0]} dimensions but the model "
                                  f"has n_embd {n_embd} ({len(blocks)} block(s) read): it was built for another "
                                  "model")

    def to_meta(self) -> dict:
        read = {} if self.read == Read((self.block,), self.tail) else {  # a gate of before 0.2 stays as it was
            "blocks": list(self.read.blocks), "final": self.final, "pool": self.pool}
        if self.tails:  # a gate of several parts (0.3)
            read["tails"] = list(self.tails)

        def frame(g: FrameGate) -> dict:
            return {"direction": [float(x) for x in g.direction.astype(np.float32)],
                    "centre": [float(x) for x in g.centre.astype(np.float32)], "threshold": g.threshold,
                    **({"scales": [list(p) for p in g.scales]} if g.scales else {}), "dev": g.dev}
        return {"block": self.block, "method": self.method, "tail": self.tail, **read, "provenance": self.provenance,
                "frames": {k: frame(g) for k, g in self.frames.items()}}

    @classmethod
    def from_meta(cls, d: dict) -> Gate:
        """Read a gate from a vector's metadata; a malformed one is a one-line VectorError."""
        try:
            blocks = tuple(int(b) for b in d.get("blocks") or (d["block"],))
            final, pool = d.get("final", False), d.get("pool", "mean")
            if not isinstance(final, bool):
                raise ValueError(f"final must be true or false, not {final!r}")
            tails = d.get("tails") or []
            if not isinstance(tails, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in tails):
                raise ValueError(f"tails must be a list of whole numbers, not {tails!r}")
            read = Read(blocks, check_tail(d.get("tail", 0)), final, pool, tuple(tails))  # SettingError: ValueError
            frames = {}
            for k, f in d["frames"].items():
                if k not in FRAMES:
                    raise ValueError(f"unknown frame {k!r}")
                thr = float(f["threshold"])
                if not math.isfinite(thr):
                    raise ValueError(f"threshold {f['threshold']} is not finite")
                c, m = np.asarray(f["direction"], np.float64), np.asarray(f["centre"], np.float64)
                if c.ndim != 1 or c.shape != m.shape or not np.all(np.isfinite(c)) or not np.all(np.isfinite(m)):
                    raise ValueError("direction and centre must be finite vectors of one length")
                scales = tuple((float(o), float(sc)) for o, sc in f.get("scales") or ())
                if not all(math.isfinite(o) and math.isfinite(sc) and sc > 0 for o, sc in scales) or (
                        scales and (len(scales) != len(blocks) or c.size % len(scales))):
                    raise ValueError(f"the {k} frame's scales {f['scales']} are not finite pairs with a positive "
                                     f"scale, one per block read ({len(blocks)}) and equal part of the direction")
                frames[k] = FrameGate(c, m, thr, dict(f.get("dev") or {}), scales)
            if not frames:
                raise ValueError("no frame")
            return cls(int(d["block"]), str(d.get("method", "mean-diff")), frames, dict(d.get("provenance") or {}),
                       read.tail, read.blocks, read.final, read.pool, read.tails)
        except (KeyError, TypeError, ValueError) as e:
            raise VectorError(f"the vector's gate is malformed ({e})") from None

    def digest(self) -> str:
        """A short hash of the whole gate (what result files record to tell gates apart)."""
        return hashlib.sha256(json.dumps(self.to_meta(), sort_keys=True).encode()).hexdigest()[:16]

    def with_threshold(self, threshold: float) -> Gate:
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise SettingError(f"--gate-threshold must be a finite number, not {threshold}")
        return dataclasses.replace(self, frames={k: dataclasses.replace(g, threshold=float(threshold))
                                                 for k, g in self.frames.items()})


def cv_scores(harmful: np.ndarray, benign: np.ndarray, method: str, fpr: float = DEFAULT_FPR, k: int = 5,
              seed: int = 0, groups: int = 1) -> dict:
    """Cross-validation on dev features: held-out AUROC, and TPR and FPR at each fold's threshold (how
    ``--block auto`` chooses without looking at evaluation prompts).

    ``groups`` = 1: plain ``k``-fold. ``groups`` > 1: the features come as ``groups`` consecutive copies of each
    prompt, one per wrapper (wrapper-major), and the folds leave one wrapper *and* one share of the prompts out:
    fold i fits on the other prompts in the other wrappers and tests on its held-out prompts in wrapper i. So a
    held-out figure is that of a question never fitted, in a wrapping never seen (as HarmEval's prompt types are
    to a shipped gate). ``objective`` is the held-out TPR − FPR over the folds, ``worst`` that of the fold (the
    wrapper) that does worst."""
    harmful, benign = np.asarray(harmful), np.asarray(benign)
    _check_groups(harmful, benign, groups)
    folds = k if groups == 1 else groups
    fh, fb = _folds(len(harmful), folds, groups, seed), _folds(len(benign), folds, groups, seed)
    wh, wb = np.repeat(np.arange(groups), len(harmful) // groups), np.repeat(np.arange(groups), len(benign) // groups)
    au, tpr, fp, per = [], [], [], []
    for i in range(folds):
        train_h, train_b = fh != i, fb != i
        test_h, test_b = fh == i, fb == i
        if groups > 1:
            train_h, train_b = train_h & (wh != i), train_b & (wb != i)
            test_h, test_b = test_h & (wh == i), test_b & (wb == i)
        if not (test_h.any() and test_b.any()) or min(train_h.sum(), train_b.sum()) < 2:
            continue
        g = fit_frame(harmful[train_h], benign[train_b], method, fpr, groups=max(1, groups - 1))
        sh, sb = g.score(harmful[test_h]), g.score(benign[test_b])
        au.append(auroc(sh, sb))
        tpr.append(float(np.mean(sh >= g.threshold)))
        fp.append(float(np.mean(sb >= g.threshold)))
        per.append(tpr[-1] - fp[-1])
    if not per:
        raise SettingError(f"too few dev prompts to cross-validate ({len(harmful) // groups} harmful, "
                           f"{len(benign) // groups} benign)")
    return {"auroc": float(np.mean(au)), "tpr": float(np.mean(tpr)), "fpr": float(np.mean(fp)),
            "objective": float(np.mean(per)), "worst": float(np.min(per))}


@dataclass(frozen=True)
class Source:
    """One source of dev prompts for leave-one-source-out cross-validation: its name, its class, and its
    features, ``groups`` wrapped copies of each prompt, wrapper-major (copy w of prompt i at row w * n + i).
    ``held`` False: in every fit and never held out (nor in the threshold), for data that teaches the direction
    but is no stand-in for a source the gate never saw, such as pairs written to differ only in harm."""

    name: str
    harmful: bool
    feats: np.ndarray
    held: bool = True


def _quantile_tpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The share of ``pos`` at or above the (1 − fpr) quantile of ``neg``: TPR at that FPR."""
    return float(np.mean(pos >= np.quantile(neg, 1.0 - fpr)))


def loso_scores(sources: list[Source], method: str, fpr: float = DEFAULT_FPR, groups: int = 1,
                shrinkage: float = 0.1, parts: int = 1) -> dict:
    """Leave-one-source-out cross-validation, a harmful and a benign source at a time: for every pair, a gate is
    fitted on all the other sources and scores the two it never saw, so each figure compares a harmful source
    with a benign one, both unseen, under one fit. (Held out alone, a source is compared with benign scores of
    other fits, whose scales differ; and a pair of matched sources such as XSTest's safe and unsafe prompts would
    each be judged by a fit that learnt the other's style.) With ``groups`` > 1 (each prompt in ``groups``
    wrappings, wrapper-major) a fold also holds one wrapping out, in turn: it fits on the other wrappings and
    scores the pair in that one. A source with ``held`` False is in every fit and in no row or threshold.
    ``parts``: the features are that many reads side by side, each fitted on its own and their scores averaged.

    Per held-out source, over its pairs: ``auroc`` (the lowest), ``tpr_1``/``tpr_5``/``tpr`` for a harmful source
    (the lowest share flagged at 1%, 5% and ``fpr`` FPR of the held-out benign source), ``fpr`` for a benign
    source (the share flagged at the threshold, the (1 − ``fpr``) quantile of the other benign sources' held-out
    scores).
    ``threshold`` is that quantile over every benign source's held-out scores: what a gate fitted on all the
    sources uses. ``worst_tpr`` (the objective a gate is chosen by), ``worst_auroc``, ``worst_fpr``: over sources."""
    check_fpr(fpr)
    harm = [s for s in sources if s.harmful and s.held]
    ben = [s for s in sources if not s.harmful and s.held]
    if len(harm) < 2 or len(ben) < 2:
        raise SettingError("leave-one-source-out needs at least 2 harmful and 2 benign sources")
    if len({s.name for s in sources}) < len(sources):
        raise SettingError("leave-one-source-out needs a different name for each source")
    for s in sources:
        if len(s.feats) % groups or len(s.feats) < groups:
            raise SettingError(f"source {s.name}: {len(s.feats)} features are not {groups} copies of each prompt")
    wrapper = {s.name: np.repeat(np.arange(groups), len(s.feats) // groups) for s in sources}
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    k = 0
    for h in harm:
        for b in ben:
            w = k % groups
            k += 1
            keep = {o.name: wrapper[o.name] != w if groups > 1 else slice(None) for o in sources}
            test = {o.name: wrapper[o.name] == w if groups > 1 else slice(None) for o in (h, b)}
            th = np.concatenate([o.feats[keep[o.name]] for o in sources if o.harmful and o is not h])
            tb = np.concatenate([o.feats[keep[o.name]] for o in sources if not o.harmful and o is not b])
            g = _direction(np.asarray(th, np.float64), np.asarray(tb, np.float64), method, shrinkage, parts)
            pairs[h.name, b.name] = (g.score(h.feats[test[h.name]]), g.score(b.feats[test[b.name]]))
    held_b = {b.name: np.concatenate([pairs[h.name, b.name][1] for h in harm]) for b in ben}
    rows = []
    for h in harm:
        ps = [pairs[h.name, b.name] for b in ben]
        rows.append({"source": h.name, "harmful": True, "n": len(h.feats) // groups,
                     "auroc": min(auroc(sh, sb) for sh, sb in ps),
                     "tpr_1": min(_quantile_tpr(sh, sb, 0.01) for sh, sb in ps),
                     "tpr_5": min(_quantile_tpr(sh, sb, 0.05) for sh, sb in ps),
                     "tpr": min(_quantile_tpr(sh, sb, fpr) for sh, sb in ps)})
    for b in ben:
        others = np.concatenate([held_b[o.name] for o in ben if o is not b])
        rows.append({"source": b.name, "harmful": False, "n": len(b.feats) // groups,
                     "auroc": min(auroc(*pairs[h.name, b.name]) for h in harm),
                     "fpr": float(np.mean(held_b[b.name] >= np.quantile(others, 1.0 - fpr)))})
    return {"sources": rows, "threshold": float(np.quantile(np.concatenate(list(held_b.values())), 1.0 - fpr)),
            "worst_tpr": min(r["tpr"] for r in rows if r["harmful"]),
            "worst_auroc": min(r["auroc"] for r in rows),
            "worst_fpr": max(r["fpr"] for r in rows if not r["harmful"])}


def fit_sources(sources: list[Source], method: str, fpr: float = DEFAULT_FPR, groups: int = 1,
                shrinkage: float = 0.1, loso: dict | None = None, parts: int = 1) -> FrameGate:
    """A gate for one frame fitted on every source, its threshold from leave-one-source-out: the (1 − ``fpr``)
    quantile of the benign sources' scores from fits that never saw them (:func:`loso_scores`, or ``loso`` when
    it was computed already), so that about ``fpr`` of prompts from a *new* benign source are flagged, not of the
    ones the direction was fitted on. ``dev`` records the per-source leave-one-source-out table (held-out sources
    only; ``n_harmful``/``n_benign`` count every prompt fitted, fit-only sources too)."""
    loso = loso or loso_scores(sources, method, fpr, groups, shrinkage, parts)
    h = np.concatenate([s.feats for s in sources if s.harmful]).astype(np.float64)
    b = np.concatenate([s.feats for s in sources if not s.harmful]).astype(np.float64)
    g = _direction(h, b, method, shrinkage, parts)
    dev = {"n_harmful": len(h) // groups, "n_benign": len(b) // groups, "fpr_target": fpr,
           "threshold_from": "leave-one-source-out: the benign sources' held-out scores",
           "worst_tpr": round(loso["worst_tpr"], 4), "worst_auroc": round(loso["worst_auroc"], 4),
           "worst_fpr": round(loso["worst_fpr"], 4),
           "sources": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                       for r in loso["sources"]]}
    return dataclasses.replace(g, threshold=float(loso["threshold"]), dev=dev)
