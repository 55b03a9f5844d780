"""Expert backends: the ways a layer's routed experts can run, behind one small interface
(:class:`~moekit.moe.backends.base.ExpertBackend`), chosen in one place
(:mod:`moekit.moe.backends.chooser`).

=============  ==============================================================================
``loop``       the reference loop in Python (:mod:`.loop`): any device and dtype
``native``     the same loop in C++ (:mod:`.native`, :mod:`moekit.cpu.loop`): the CPU default
``grouped_mm`` ``torch.nn.functional.grouped_mm`` (:mod:`.grouped_mm`): the CUDA bf16 default
``gather``     the compiled decode step's (:mod:`.gather`), inside :func:`gather_decoding` only
=============  ==============================================================================

Forcing one: ``use(model, "loop")`` (every MoE layer of ``model``; ``"auto"`` undoes it), or for the
whole process ``MOEKIT_EXPERT_BACKEND=loop`` / ``moekit.cpu.options.set(expert_backend="loop")``,
which a layer's own choice overrides. The choice is a property of the run, not of the model: it is
in no config or checkpoint. The tests compare every backend with :mod:`moekit.moe.reference`.
"""

from __future__ import annotations

from torch import nn

from moekit.cpu.options import EXPERT_BACKENDS
from moekit.moe.backends.base import ExpertBackend, ExpertWeights
from moekit.moe.backends.registry import NAMES, get


def _experts_of(module: nn.Module) -> list:
    from moekit.moe.experts import Experts

    return [m for m in module.modules() if isinstance(m, Experts)]


def use(module: nn.Module, name: str) -> int:
    """Makes every :class:`~moekit.moe.experts.Experts` in ``module`` (a model, a layer) ask for backend
    ``name`` (``auto``: the chooser's pick again); returns how many. An unknown name raises ValueError."""
    if name not in EXPERT_BACKENDS:
        raise ValueError(f"expert backend {name!r} is unknown; allowed: {', '.join(EXPERT_BACKENDS)}")
    experts = _experts_of(module)
    if not experts:
        raise ValueError(f"{type(module).__name__} has no MoE experts to run on backend {name!r}")
    for m in experts:
        m.backend = name
    return len(experts)


class gather_decoding:  # noqa: N801 (a context manager, as torch.no_grad)
    """Inside, compiled no-grad forwards of ``module``'s dropless token-choice MoE layers over at most
    :data:`~moekit.moe.backends.chooser.GATHER_MAX_TOKENS` tokens run the ``gather`` backend
    (moekit.generate's compiled decode step); everywhere else the usual backend runs. Finds the layers
    once: one object may be entered again for every step."""

    def __init__(self, module: nn.Module):
        self._experts = _experts_of(module)
        self._previous: list[bool] = []

    # NOTE: `decoding` is a plain attribute; writing the instance dict skips nn.Module.__setattr__'s
    # bookkeeping (~2 µs a module, every decode step)
    def __enter__(self) -> None:
        self._previous = [m.decoding for m in self._experts]
        for m in self._experts:
            m.__dict__["decoding"] = True

    def __exit__(self, *exc) -> None:
        for m, was in zip(self._experts, self._previous):
            m.__dict__["decoding"] = was


__all__ = ["ExpertBackend", "ExpertWeights", "NAMES", "gather_decoding", "get", "use"]
