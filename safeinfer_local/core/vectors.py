"""The safety vector as a value: per-layer directions plus provenance, stored as a llama.cpp control vector.

File format (llama.cpp ``common/`` control-vector loader, also written by repeng):
``general.architecture = "controlvector"``, ``controlvector.model_hint`` (string),
``controlvector.layer_count`` (uint32), and one F32 1-D tensor ``direction.N`` (N >= 1) of length n_embd per
steered layer. ``direction.N`` is added to the output of 0-based decoder block N. Our own provenance goes in
extra ``safeinfer.*`` keys, which llama.cpp ignores, so the file loads unchanged in
``llama-cli --control-vector-scaled FILE:GAMMA --control-vector-layer-range L L``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import files
from ..errors import SettingError, VectorError
from .settings import POSITIONS, check_gamma, check_positions  # noqa: F401  (POSITIONS re-exported)

ARCH = "controlvector"
"""Where the vector is added: ``generation`` = last prompt token and every generated token (the paper's
reference semantics), ``last`` = the last prompt token only, ``all`` = every token."""

_DIRECTION_RE = re.compile(r"^direction\.(\d+)$")

PROVENANCE_KEY = "safeinfer.method"
"""Every vector this tool writes carries it; a control vector without it is someone else's file."""


@dataclass
class SafetyVector:
    """Directions per 0-based block index (each float32, length n_embd) and how they were made.

    ``gamma``, ``layers`` and ``positions`` are the *recommended* settings (chosen by a sweep and recorded
    here); callers may override each one.
    """

    directions: dict[int, np.ndarray]
    model_hint: str = ""
    method: str = "imported"
    gamma: float = 1.0
    layers: tuple[int, ...] = ()
    positions: str = "generation"
    source_model: str = ""
    demos_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise VectorError("a safety vector needs at least one direction")
        dirs: dict[int, np.ndarray] = {}
        n = None
        for layer, arr in sorted(self.directions.items()):
            a = np.asarray(arr, dtype=np.float32).reshape(-1)
            if int(layer) < 1:
                raise VectorError(f"direction.{layer}: block 0 cannot be steered (layers start at 1)")
            if n is not None and a.shape[0] != n:
                raise VectorError(f"direction.{layer} has length {a.shape[0]}, others have {n}")
            if not np.all(np.isfinite(a)):
                raise VectorError(f"direction.{layer} contains NaN or infinite values")
            n = a.shape[0]
            dirs[int(layer)] = a
        self.directions = dirs
        if not self.layers:
            self.layers = tuple(dirs)
        self.layers = tuple(int(x) for x in self.layers)
        missing = [x for x in self.layers if x not in dirs]
        if missing:
            raise VectorError(f"recommended layers {missing} have no direction in the vector")
        try:
            check_positions(self.positions)
            check_gamma(self.gamma)
        except SettingError as e:
            raise VectorError(f"vector settings: {e}") from None

    @property
    def n_embd(self) -> int:
        return next(iter(self.directions.values())).shape[0]

    # arithmetic, as in repeng: v1 + v2, -v, v * 2
    def __mul__(self, k: float) -> SafetyVector:
        return replace(self, directions={i: a * np.float32(k) for i, a in self.directions.items()})

    __rmul__ = __mul__

    def __neg__(self) -> SafetyVector:
        return self * -1.0

    def __add__(self, other: SafetyVector) -> SafetyVector:
        if other.n_embd != self.n_embd:
            raise VectorError(f"cannot add vectors of n_embd {self.n_embd} and {other.n_embd}")
        dirs = {i: a.copy() for i, a in self.directions.items()}
        for i, a in other.directions.items():
            dirs[i] = dirs[i] + a if i in dirs else a.copy()
        return replace(self, directions=dirs, layers=tuple(sorted(set(self.layers) | set(other.layers))))

    def select(self, layers: tuple[int, ...]) -> SafetyVector:
        """Only the given layers (each must exist)."""
        missing = [x for x in layers if x not in self.directions]
        if missing:
            raise VectorError(f"layer(s) {missing} are not in this vector (it has {sorted(self.directions)})")
        return replace(self, directions={i: self.directions[i] for i in layers}, layers=tuple(layers))

    def recommend(self, *, model_hint: str | None = None, gamma: float | None = None, positions: str | None = None,
                  sgds: dict | None = None, **meta: Any) -> SafetyVector:
        """A copy with new recommended settings (and provenance ``meta``), checked like a loaded file."""
        new_meta = dict(self.meta) | meta
        if sgds:
            new_meta["sgds"] = dict(self.meta.get("sgds") or {}) | sgds
        return replace(self, model_hint=self.model_hint if model_hint is None else model_hint,
                       gamma=self.gamma if gamma is None else gamma,
                       positions=self.positions if positions is None else positions, meta=new_meta)

    def buffer(self, n_layer: int, gamma: float, layers: tuple[int, ...] | None = None) -> np.ndarray:
        """The flat (n_layer - 1) * n_embd float32 buffer ``llama_set_adapter_cvec`` expects.

        Row i holds block i + 1 (block 0 cannot be steered). Always the full size: a shorter buffer would
        leave stale values in the higher layers.
        """
        use = self.layers if layers is None else layers
        buf = np.zeros((n_layer - 1, self.n_embd), dtype=np.float32)
        for i in use:
            if i not in self.directions:
                raise VectorError(f"layer {i} is not in this vector (it has {sorted(self.directions)})")
            if not 1 <= i <= n_layer - 1:
                raise VectorError(f"layer {i} is out of range for a model with {n_layer} layers (1..{n_layer - 1})")
            buf[i - 1] = self.directions[i] * np.float32(gamma)
        return buf.reshape(-1)

    def save(self, path: str | Path) -> Path:
        """Write a llama.cpp control-vector GGUF with our provenance keys, atomically (:func:`files.replace`: a
        failure leaves any previous file at ``path`` as it was). Check the target first with
        ``files.check_target(path, VECTOR_FILE, ...)``: this writes wherever it is told."""
        import gguf

        def write(tmp: Path) -> None:
            w = gguf.GGUFWriter(str(tmp), ARCH)
            w.add_string("controlvector.model_hint", self.model_hint)
            w.add_uint32("controlvector.layer_count", len(self.directions))
            w.add_string(PROVENANCE_KEY, self.method)
            w.add_float32("safeinfer.recommended_gamma", float(self.gamma))
            w.add_array("safeinfer.recommended_layers", [int(x) for x in self.layers])
            w.add_string("safeinfer.positions", self.positions)
            w.add_string("safeinfer.source_model", self.source_model)
            w.add_uint32("safeinfer.n_embd", self.n_embd)
            w.add_string("safeinfer.demos_sha256", self.demos_sha256)
            w.add_string("safeinfer.meta_json", json.dumps(self.meta, sort_keys=True))
            for i, a in sorted(self.directions.items()):
                w.add_tensor(f"direction.{i}", np.ascontiguousarray(a, dtype=np.float32))
            try:
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()

        def read_back(tmp: Path) -> None:
            back = _load_gguf(tmp)
            if sorted(back.directions) != sorted(self.directions) or not all(
                    np.array_equal(back.directions[i], a) for i, a in self.directions.items()):
                raise VectorError("the directions differ")

        return files.replace(path, write, check=read_back)

    @classmethod
    def load(cls, path: str | Path) -> SafetyVector:
        """Read a control-vector GGUF (ours, llama.cpp's or repeng's), a ``.npz`` or a ``.npy``."""
        path = Path(path)
        if not path.is_file():
            raise VectorError(f"vector file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _load_npz(path)
        if suffix == ".npy":
            return _load_npy(path)
        return _load_gguf(path)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (what ``vectors inspect`` prints)."""
        return {
            "model_hint": self.model_hint,
            "method": self.method,
            "n_embd": self.n_embd,
            "layers_in_file": sorted(self.directions),
            "recommended_layers": list(self.layers),
            "recommended_gamma": self.gamma,
            "positions": self.positions,
            "source_model": self.source_model,
            "demos_sha256": self.demos_sha256,
            "norms": {str(i): round(float(np.linalg.norm(a)), 6) for i, a in sorted(self.directions.items())},
            "meta": {k: v for k, v in self.meta.items() if k != "gate"},
            "gate": _gate_summary(self.meta.get("gate")),
        }


def foreign_vector(path: Path) -> str | None:
    """Why the file at ``path`` is not a vector this tool wrote (a model GGUF, another tool's control vector, not
    a GGUF at all), or None when it is one (so a command may replace it)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if magic != b"GGUF":
        return "it is not a GGUF file"
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a damaged GGUF: still not ours to overwrite
        return f"it is not a readable GGUF file ({type(e).__name__})"
    arch = _field_value(reader, "general.architecture")
    if arch != ARCH:
        return f"it is a model GGUF (general.architecture {arch!r})"
    if reader.fields.get(PROVENANCE_KEY) is None:
        return "it is a control vector without safeinfer provenance (another tool's)"
    return None


VECTOR_FILE = files.Kind("safety vector", foreign_vector)
"""What the commands that write a vector may overwrite: a vector of ours (``files.check_target``)."""


def _gate_summary(gate: Any) -> dict | None:
    """A recorded harm gate without its vectors: block, method, per-frame threshold and dev figures."""
    if not isinstance(gate, dict):
        return None
    frames = gate.get("frames") if isinstance(gate.get("frames"), dict) else {}
    return {"block": gate.get("block"), "tail": gate.get("tail", 0), "method": gate.get("method"),
            **{k: gate[k] for k in ("blocks", "tails", "final", "pool") if k in gate},
            "provenance": gate.get("provenance"),
            "frames": {k: {"threshold": f.get("threshold"), "dev": f.get("dev")} for k, f in frames.items()
                       if isinstance(f, dict)}}


def _field_value(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # very old gguf versions have no contents()
        return None


def _load_gguf(path: Path) -> SafetyVector:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct.error / OSError on foreign files
        raise VectorError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field_value(reader, "general.architecture")
    if arch != ARCH:
        raise VectorError(f"{path} is not a control vector (general.architecture is {arch!r}, expected {ARCH!r})")
    dirs: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        m = _DIRECTION_RE.match(t.name)
        if not m:
            continue
        data = np.asarray(t.data)
        if data.ndim != 1 and not (data.ndim == 2 and 1 in data.shape):
            raise VectorError(f"{path}: tensor {t.name} is not 1-D (shape {tuple(data.shape)})")
        dirs[int(m.group(1))] = data.astype(np.float32).reshape(-1)
    if not dirs:
        raise VectorError(f"{path} holds no direction.N tensors")
    meta_json = _field_value(reader, "safeinfer.meta_json")
    gamma = _field_value(reader, "safeinfer.recommended_gamma")
    layers = _field_value(reader, "safeinfer.recommended_layers")
    method = _field_value(reader, PROVENANCE_KEY)
    return SafetyVector(
        directions=dirs,
        model_hint=_field_value(reader, "controlvector.model_hint") or "",
        method=method or "imported",
        gamma=float(gamma) if gamma is not None else 1.0,
        layers=tuple(int(x) for x in layers) if layers else (),
        positions=_field_value(reader, "safeinfer.positions") or "generation",
        source_model=_field_value(reader, "safeinfer.source_model") or "",
        demos_sha256=_field_value(reader, "safeinfer.demos_sha256") or "",
        meta=json.loads(meta_json) if meta_json else {},
    )


def _load_npz(path: Path) -> SafetyVector:
    """``.npz`` with one array per layer, named ``N`` or ``direction.N`` or ``layer_N``."""
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise VectorError(f"{path} is not a readable .npz file ({e})") from None
    dirs = {}
    for name in npz.files:
        m = re.search(r"(\d+)$", name)
        if not m:
            raise VectorError(f"{path}: array {name!r} does not end in a layer number")
        dirs[int(m.group(1))] = npz[name]
    if not dirs:
        raise VectorError(f"{path}: the archive holds no arrays")
    return SafetyVector(directions=dirs, method="imported")


def _load_npy(path: Path) -> SafetyVector:
    """``.npy`` of shape (n_layer, n_embd): row i is block i (row 0, block 0, must be zero and is dropped)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        raise VectorError(f"{path} is not a readable .npy file ({e})") from None
    if arr.ndim != 2:
        raise VectorError(f"{path}: expected a 2-D array (n_layer, n_embd), got shape {arr.shape}")
    if arr.size == 0:
        raise VectorError(f"{path}: the array is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number):
        raise VectorError(f"{path}: expected numbers, got dtype {arr.dtype}")
    if np.any(arr[0] != 0):
        raise VectorError(f"{path}: row 0 (block 0) is non-zero, but block 0 cannot be steered")
    dirs = {i: arr[i] for i in range(1, arr.shape[0]) if np.any(arr[i] != 0)}
    if not dirs:
        raise VectorError(f"{path}: every row is zero")
    return SafetyVector(directions=dirs, method="imported")
