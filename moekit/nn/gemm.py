"""Where the fp32 GEMM backend was chosen before :mod:`moekit.cpu` and :mod:`moekit.moe.backends.chooser`:
the names the benchmarks use, kept as aliases. Nothing in moekit imports this module; :mod:`moekit.nn`
itself is plain PyTorch.

New code: ``moekit.cpu.options.set(gemm=...)`` / ``override(gemm=...)`` to choose (``MOEKIT_GEMM``
overrides the default), :func:`moekit.moe.backends.chooser.gemm_backend` for the one in use,
:mod:`moekit.cpu.gemm` for the products. :func:`choose` and :func:`use_backend` also export
``MOEKIT_GEMM``, which the benchmarks' child processes read.
"""

from __future__ import annotations

import contextlib
import os

import torch

from moekit.cpu import gemm as _gemm
from moekit.cpu import options
from moekit.cpu.gemm import _Linear  # noqa: F401  (tests and benchmarks reach it here)
from moekit.cpu.options import GEMM_BACKENDS as BACKENDS
from moekit.moe.backends import chooser


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: must be one of {', '.join(BACKENDS)}")
    return name


def requested() -> str:
    """The backend asked for (``MOEKIT_GEMM``, else ``auto``, as :func:`choose` left it)."""
    return options.get().gemm


def backend() -> str:
    """The backend fp32 CPU products run on now (:func:`moekit.moe.backends.chooser.gemm_backend`)."""
    return chooser.gemm_backend()


def choose(name: str | None) -> None:
    """Makes ``name`` (None: leave it) the backend of this process and of those it starts."""
    if name is not None:
        options.set(gemm=_checked(name, "gemm backend"))
        os.environ["MOEKIT_GEMM"] = name


@contextlib.contextmanager
def use_backend(name: str):
    """Runs the block with ``name`` as the backend; processes started inside it inherit the choice."""
    _checked(name, "gemm backend")
    previous_env = os.environ.get("MOEKIT_GEMM")
    try:
        with options.override(gemm=name):
            os.environ["MOEKIT_GEMM"] = name
            yield
    finally:
        if previous_env is None:
            os.environ.pop("MOEKIT_GEMM", None)
        else:
            os.environ["MOEKIT_GEMM"] = previous_env


def add_argument(parser) -> None:
    """The benchmarks' ``--gemm`` option (see :func:`choose`)."""
    parser.add_argument("--gemm", choices=BACKENDS,
                        help="fp32 CPU GEMM of moekit's side (default: $MOEKIT_GEMM, else auto); transformers' "
                             "sides always run torch.mm")


def onednn_for(t: torch.Tensor) -> bool:
    return chooser.onednn_for(t)


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None, accumulate: bool = False,
       onednn: bool | None = None) -> torch.Tensor:
    """:func:`moekit.cpu.gemm.mm`, on oneDNN where the chooser says so (``onednn`` None)."""
    return _gemm.mm(a_MK, b_KN, out, accumulate, chooser.onednn_for(a_MK) if onednn is None else onednn)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _gemm.linear(x, weight, bias, onednn=chooser.onednn_for(x))


class Linear(_gemm.Linear):
    """:class:`moekit.cpu.gemm.Linear` asking the chooser."""

    onednn_for = staticmethod(chooser.onednn_for)
