"""The expert backends by name, each imported on first use."""

from __future__ import annotations

from moekit.cpu.options import EXPERT_BACKENDS
from moekit.moe.backends.base import ExpertBackend

# every backend by name ("auto" is a request, not a backend); "quantized": asked for by quantized experts only
NAMES = (*EXPERT_BACKENDS[1:], "gather", "quantized")
_backends: dict[str, ExpertBackend] = {}


def get(name: str) -> ExpertBackend:
    """The backend called ``name``; imported on first use (``native`` imports the C++ build module)."""
    backend = _backends.get(name)
    if backend is None:
        if name == "loop":
            from moekit.moe.backends.loop import LoopBackend as cls
        elif name == "native":
            from moekit.moe.backends.native import NativeBackend as cls
        elif name == "grouped_mm":
            from moekit.moe.backends.grouped_mm import GroupedMMBackend as cls
        elif name == "gather":
            from moekit.moe.backends.gather import GatherBackend as cls
        elif name == "quantized":
            from moekit.moe.backends.quantized import QuantizedBackend as cls
        else:
            raise ValueError(f"expert backend {name!r} is unknown; allowed: {', '.join(NAMES)}")
        backend = _backends.setdefault(name, cls())
    return backend
