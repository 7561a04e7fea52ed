"""safeinfer_local: SafeInfer decoding-time safety alignment for local GGUF models through llama.cpp."""

from .core.vectors import SafetyVector
from .errors import SafeInferError, UsageError

__version__ = "0.1.0"
__all__ = ["SafeInfer", "SafetyVector", "SafeInferError", "UsageError", "__version__"]


def __getattr__(name: str):
    # the engine loads llama.cpp's shared library: import it only when the API is actually used
    if name == "SafeInfer":
        from .api import SafeInfer

        return SafeInfer
    raise AttributeError(name)
