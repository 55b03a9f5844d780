"""Which expert backend and which fp32 GEMM win on this machine: measured, per shape class, cached.

What is fastest differs by CPU: on one Intel Xeon (AVX-512, AMX) ``torch.mm`` beat oneDNN for the
expert GEMMs, on one AMD EPYC oneDNN won by 1.5-2.3x (docs/cpu-backend.md). So under ``auto`` the
chooser (:mod:`moekit.moe.backends.chooser`) does not assume: the first time a process meets a shape
class it looks it up in a cache kept per CPU model and torch version, and where the cache has no
entry it times the candidates here, once, and stores their times.

The timing: each candidate runs the expert computation forward and backward on synthetic tokens of
the class (random uniform routing, :data:`PROBE_TOP_K` experts per token; weights and tokens from a
private generator, so the process's random stream is untouched), in interleaved rounds after one
warm-up round each; the median of each wins. The reference candidate (``loop/blas``, plain PyTorch)
counts :data:`PLAIN_MARGIN` faster than measured, so a path of moekit's own is chosen only where it
wins by more than noise: the default is never slower than plain PyTorch by more than what one probe
cannot tell apart.

Shape classes: experts by (dtype, d_model, expert hidden, experts, activation, assignments rounded to
a power of two, threads); dense products by (d_model, the widths timed, threads). The cache:
``<cache dir>/probe/<cpu model>-torch<version>.json`` (:meth:`moekit.cpu.options.CpuOptions.cache_path`),
written atomically; a corrupt file is named in a warning and measured afresh. ``MOEKIT_PROBE=0`` (or
``options.set(probe=False)``) turns the probe off: ``auto`` then follows the chooser's fixed rules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from moekit.cpu import options
from moekit.cpu.machine import cpu_model
from moekit.moe.backends.base import ExpertWeights, LoopGemm
from moekit.moe.backends.registry import get as get_backend
from moekit.moe.dispatch import plan_token_choice

log = logging.getLogger(__name__)

FORMAT = 2  # bumped when what a timing measures changes: older files are measured again
PROBE_TOP_K = 2
MAX_ASSIGNMENTS = 16384  # classes beyond time like this one: the per-expert GEMMs are large by then
DENSE_TOKENS = (256, 1024)  # rows of the dense probe: as many as keep one step near DENSE_STEP_FLOPS
DENSE_STEP_FLOPS = 2e9
PLAIN_MARGIN = 0.02
ROUNDS = 5  # timed rounds, fewer when one round is slow (see TIME_BUDGET_S)
TIME_BUDGET_S = 4.0


class Candidate(NamedTuple):
    """An expert backend and, for fp32, the GEMM its products run on (``onednn`` or ``blas``)."""

    backend: str
    gemm: str | None = None

    @property
    def name(self) -> str:
        return self.backend if self.gemm is None else f"{self.backend}/{self.gemm}"


PLAIN = Candidate("loop", "blas")


class ExpertShape(NamedTuple):
    """The shape class of a layer's expert computation."""

    dtype: str
    d_model: int
    expert_hidden: int
    num_experts: int
    activation: str
    assignments: int  # a power of two
    threads: int

    @property
    def key(self) -> str:
        return (f"experts|{self.dtype}|D{self.d_model}|F{self.expert_hidden}|E{self.num_experts}|{self.activation}"
                f"|N{self.assignments}|t{self.threads}")


class DenseShape(NamedTuple):
    """The shape class of a model's dense fp32 products: [rows, d_model] times each width."""

    d_model: int
    widths: tuple[int, ...]
    threads: int

    @property
    def rows(self) -> int:
        """A power of two within DENSE_TOKENS, about DENSE_STEP_FLOPS a forward and backward."""
        fit = DENSE_STEP_FLOPS / (6 * self.d_model * sum(self.widths))
        return min(DENSE_TOKENS[1], max(DENSE_TOKENS[0], 2 ** int(math.log2(max(1.0, fit)))))

    @property
    def key(self) -> str:
        return f"dense|float32|D{self.d_model}|W{'x'.join(map(str, self.widths))}|T{self.rows}|t{self.threads}"


def assignments_class(n: int) -> int:
    """``n`` rounded to the nearest power of two (in log scale), capped at :data:`MAX_ASSIGNMENTS`."""
    return min(MAX_ASSIGNMENTS, 2 ** max(0, round(math.log2(max(1, n)))))


def expert_shape(dtype: torch.dtype, d_model: int, expert_hidden: int, num_experts: int, activation: str,
                 num_assignments: int) -> ExpertShape:
    return ExpertShape(str(dtype).removeprefix("torch."), d_model, expert_hidden, num_experts, activation,
                       assignments_class(num_assignments), torch.get_num_threads())


# ---- the cache -------------------------------------------------------------------------------------
_memo: dict[str, dict[str, float | None]] = {}
_lock = threading.RLock()
_state = threading.local()


def active() -> bool:
    """Whether this thread is inside a probe (whose runs must not probe again)."""
    return getattr(_state, "active", False)


def cache_file() -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_model() or "unknown-cpu").strip("-")
    return Path(options.get().cache_path()) / "probe" / f"{slug}-torch{torch.__version__}.json"


def _read(path: Path, warn: bool = True) -> dict[str, dict[str, float | None]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        if warn:
            warnings.warn(f"moekit: the probe cache {path} is unreadable ({err}); measuring again", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write(path: Path, key: str, entry: dict[str, float | None]) -> None:
    """Adds ``entry`` to the file (other processes' entries kept), atomically; a failure only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path, warn=False)  # a corrupt file was named when it was first read
        entries[key] = entry
        doc = {"format": FORMAT, "cpu_model": cpu_model(), "torch": torch.__version__, "entries": entries}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        warnings.warn(f"moekit: could not write the probe cache {path} ({err}); the choice holds for this process "
                      f"only", stacklevel=3)


def lookup(key: str) -> dict[str, float | None]:
    """The times (ms, None: failed) known for ``key``: this process's, else the cache file's."""
    with _lock:
        if key not in _memo:
            _memo[key] = dict(_read(cache_file()).get(key, {}))
        return _memo[key]


def forget() -> None:
    """Forgets this process's copy of the cache (tests; a changed cache directory)."""
    with _lock:
        _memo.clear()
        _decided.clear()


def _choose(times: dict[str, float | None], candidates: list[Candidate]) -> Candidate:
    def cost(c: Candidate) -> float:
        t = times.get(c.name)
        if t is None:
            return math.inf
        return t * (1 - PLAIN_MARGIN) if c == PLAIN else t

    return min(candidates, key=cost)


_decided: dict[tuple, Candidate] = {}


def best(shape: "str | ExpertShape | DenseShape", candidates: list[Candidate],
         make_workload: Callable[[], Callable[[Candidate], Callable[[], None]]]) -> Candidate:
    """The fastest of ``candidates`` for a shape class (or its cache key). Those the cache does not know
    are timed with the workload ``make_workload()`` builds (a candidate -> a callable running one step of
    it), called only then: a decided class costs one dictionary lookup per call (every forward and every
    dense product asks), the key string is built only on a miss."""
    decided = _decided.get((shape, tuple(candidates)))
    if decided is not None:
        return decided
    key = shape if isinstance(shape, str) else shape.key
    with _lock:
        times = lookup(key)
        missing = [c for c in candidates if c.name not in times]
        if missing:
            times.update(measure(missing, make_workload()))
            _write(cache_file(), key, times)
            log.info("moekit probe %s: %s", key, {k: v for k, v in times.items()})
        choice = _choose(times, candidates)
        _decided[(shape, tuple(candidates))] = choice
        return choice


def measure(candidates: list[Candidate], workload: Callable[[Candidate], Callable[[], None]]) -> dict[str, float | None]:
    """Median ms of one step of each candidate over interleaved rounds (one warm-up round first); a
    candidate that raises gets None and a warning."""
    _state.active = True
    try:
        steps: dict[Candidate, Callable[[], None]] = {}
        samples: dict[Candidate, list[float]] = {}
        for c in candidates:
            try:
                steps[c] = workload(c)
                steps[c]()  # warm-up: kernels built, buffers mapped
                samples[c] = []
            except (RuntimeError, ValueError) as err:
                warnings.warn(f"moekit probe: candidate {c.name} failed ({err}); it is not chosen", stacklevel=3)
        rounds, started = 0, time.perf_counter()
        while samples and rounds < ROUNDS and (rounds < 2 or time.perf_counter() - started < TIME_BUDGET_S):
            order = list(samples)
            order = order[rounds % len(order):] + order[:rounds % len(order)]
            for c in order:
                t0 = time.perf_counter()
                steps[c]()
                samples[c].append((time.perf_counter() - t0) * 1e3)
            rounds += 1
        return {c.name: (round(statistics.median(samples[c]), 3) if c in samples else None) for c in candidates}
    finally:
        _state.active = False


# ---- the workloads -------------------------------------------------------------------------------
class _Isolated:
    """Gradients on, autocast and inference mode off, new tensors on the CPU: a probe runs inside any
    caller's context (a model is built under ``torch.device("meta")`` when it is loaded, and a probe
    on meta tensors would time nothing)."""

    def __enter__(self):
        self._modes = [torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False),
                       torch.device("cpu")]
        for m in self._modes:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def expert_workload(shape: ExpertShape, how_for: Callable[[Candidate, torch.Tensor, ExpertWeights], LoopGemm]):
    """A candidate -> one forward and backward of the expert computation of ``shape``; ``how_for`` gives
    the candidate's slice-loop settings (the chooser's :func:`~moekit.moe.backends.chooser.loop_gemm`)."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    E, D, F_ = shape.num_experts, shape.d_model, shape.expert_hidden
    k = min(PROBE_TOP_K, E)
    T = max(1, shape.assignments // k)
    gated = shape.activation in ("swiglu", "geglu")
    H = 2 * F_ if gated else F_
    with _Isolated():
        x_TD = torch.randn(T, D, generator=gen).to(dtype).requires_grad_()
        w_in = (torch.randn(E, H, D, generator=gen) * D ** -0.5).to(dtype).requires_grad_()
        w_out = (torch.randn(E, D, F_, generator=gen) * F_ ** -0.5).to(dtype).requires_grad_()
        weights = ExpertWeights(w_in, w_out, None, None)
        expert_ids_TK = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
        plan = plan_token_choice(expert_ids_TK, torch.rand(T, k, generator=gen), E)
        plan.weights_N.requires_grad_()  # a leaf: the routing weights' gradient is part of the work
        grad_TD = torch.randn(T, D, generator=gen).to(dtype)

    def for_candidate(c: Candidate) -> Callable[[], None]:
        backend = get_backend(c.backend)
        with options.override(gemm=c.gemm or options.get().gemm):
            how = how_for(c, x_TD, weights)

        def step() -> None:
            with _Isolated():
                out = backend.run(x_TD, plan, weights, shape.activation, how)
                out.backward(grad_TD)
            for t in (x_TD, w_in, w_out, plan.weights_N):
                t.grad = None

        return step

    return for_candidate


def dense_workload(shape: DenseShape, linear: Callable[..., torch.Tensor]):
    """A candidate (its ``gemm``) -> one forward and backward of [shape.rows, d_model] through a weight
    of each width; ``linear(x, w, onednn=...)`` is :func:`moekit.cpu.gemm.linear`."""
    gen = torch.Generator().manual_seed(0)
    T = shape.rows
    with _Isolated():
        x_TD = torch.randn(T, shape.d_model, generator=gen).requires_grad_()
        ws = [(torch.randn(w, shape.d_model, generator=gen) * shape.d_model ** -0.5).requires_grad_()
              for w in shape.widths]
        grads = [torch.randn(T, w, generator=gen) for w in shape.widths]

    def for_candidate(c: Candidate) -> Callable[[], None]:
        onednn = c.gemm == "onednn"

        def step() -> None:
            with _Isolated():
                for w, g in zip(ws, grads):
                    out = linear(x_TD, w, onednn=onednn) if onednn else F.linear(x_TD, w)
                    out.backward(g)
            for t in (x_TD, *ws):
                t.grad = None

        return step

    return for_candidate
