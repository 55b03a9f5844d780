"""The options of moekit's acceleration, typed and validated in one object.

Each field has an environment variable that overrides its default, read once, when the options are
first asked for (:func:`get`); :func:`set` and :func:`override` change them in this process (tests, the
benchmarks' ``--gemm``) without touching the environment. :func:`as_env` gives the variables that
hand the current options to a child process.

==========================  ========================  ====================================================
field                       variable                  meaning
==========================  ========================  ====================================================
``native``                  ``MOEKIT_NATIVE``         ``0``: never build or load the C++ extension; every
                                                      path is pure PyTorch
``gemm``                    ``MOEKIT_GEMM``           fp32 CPU GEMM: ``auto``, ``onednn`` or ``blas``
                                                      (see :mod:`moekit.moe.backends.chooser`)
``own_gemm``                ``MOEKIT_OWN_GEMM``       ``0``: the C++ loop's own fp32 kernel never runs
``expert_backend``          ``MOEKIT_EXPERT_BACKEND`` the expert backend of layers that ask for none:
                                                      ``auto``, ``native``, ``loop`` or ``grouped_mm``
``block_cache_mb``          ``MOEKIT_BLOCK_CACHE_MB`` the most MiB of freed step buffers the C++ loop
                                                      keeps (default 2048; 0: none)
``loop_profile``            ``MOEKIT_LOOP_PROFILE``   ``1``: build the C++ loop with its profiling timers
``hidden_symbols``          ``MOEKIT_HIDE_SYMBOLS``   comma-separated private libtorch symbols to treat as
                                                      missing (tests of the fallback)
``probe``                   ``MOEKIT_PROBE``          ``0``: ``auto`` follows fixed rules instead of timing
                                                      the candidates on this machine
                                                      (:mod:`moekit.moe.backends.probe`)
``cache_dir``               ``MOEKIT_CACHE``          where per-machine measurements are kept, under
                                                      ``probe/`` (default ``~/.cache/moekit``, shared with
                                                      the tokenized corpora's cache)
==========================  ========================  ====================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import Iterator

GEMM_BACKENDS = ("auto", "onednn", "blas")
EXPERT_BACKENDS = ("auto", "native", "loop", "grouped_mm")

ENV = {"native": "MOEKIT_NATIVE", "gemm": "MOEKIT_GEMM", "own_gemm": "MOEKIT_OWN_GEMM",
       "expert_backend": "MOEKIT_EXPERT_BACKEND", "block_cache_mb": "MOEKIT_BLOCK_CACHE_MB",
       "loop_profile": "MOEKIT_LOOP_PROFILE", "hidden_symbols": "MOEKIT_HIDE_SYMBOLS", "probe": "MOEKIT_PROBE",
       "cache_dir": "MOEKIT_CACHE"}
FLAGS = ("native", "own_gemm", "loop_profile", "probe")


@dataclass(frozen=True)
class CpuOptions:
    native: bool = True
    gemm: str = "auto"
    own_gemm: bool = True
    expert_backend: str = "auto"
    block_cache_mb: int | None = None  # None: the extension's default (2048)
    loop_profile: bool = False
    hidden_symbols: tuple[str, ...] = ()
    probe: bool = True
    cache_dir: str | None = None  # None: ~/.cache/moekit

    def __post_init__(self) -> None:
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CpuOptions.{name}={getattr(self, name)!r} is invalid: expected True or False")
        if self.gemm not in GEMM_BACKENDS:
            raise ValueError(f"CpuOptions.gemm={self.gemm!r} is invalid: expected one of {', '.join(GEMM_BACKENDS)}")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ValueError(f"CpuOptions.expert_backend={self.expert_backend!r} is invalid: expected one of "
                             f"{', '.join(EXPERT_BACKENDS)}")
        mb = self.block_cache_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or not 0 <= mb < 2**40):
            raise ValueError(f"CpuOptions.block_cache_mb={mb!r} is invalid: expected a whole number of MiB >= 0, "
                             f"or None")
        if not isinstance(self.hidden_symbols, tuple) or not all(isinstance(s, str) for s in self.hidden_symbols):
            raise ValueError(f"CpuOptions.hidden_symbols={self.hidden_symbols!r} is invalid: expected a tuple of "
                             f"symbol names")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError(f"CpuOptions.cache_dir={self.cache_dir!r} is invalid: expected a directory path, or None")

    def cache_path(self) -> str:
        """The directory per-machine measurements are kept in."""
        if self.cache_dir is not None:
            return self.cache_dir
        return os.path.join(os.path.expanduser("~"), ".cache", "moekit")


def _flag(name: str, raw: str) -> bool:
    if raw in ("1", "0"):
        return raw == "1"
    raise ValueError(f"{name}={raw!r}: expected 0 or 1")


def from_env(environ: os._Environ | dict[str, str] | None = None) -> CpuOptions:
    """The defaults with every ``MOEKIT_*`` variable of ``environ`` (default ``os.environ``) applied;
    a bad value raises ValueError naming the variable."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for field, var in ENV.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        if field in FLAGS:
            values[field] = _flag(var, raw)
        elif field == "block_cache_mb":
            if not raw.isdigit():
                raise ValueError(f"{var}={raw!r}: expected a whole number of MiB >= 0")
            values[field] = int(raw)
        elif field == "hidden_symbols":
            values[field] = tuple(s.strip() for s in raw.split(",") if s.strip())
        else:
            values[field] = raw
    try:
        return CpuOptions(**values)
    except ValueError as err:  # name the variable the value came from
        field = str(err).split("=", 1)[0].removeprefix("CpuOptions.")
        raise ValueError(f"{ENV.get(field, field)}: {err}") from None


_current: CpuOptions | None = None
_lock = threading.Lock()


def get() -> CpuOptions:
    """The options of this process: the environment's, read on the first call, as :func:`set` left them."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = from_env()
    return _current


def set(**changes) -> CpuOptions:  # noqa: A001 (the module's verb: moekit.cpu.options.set(gemm="blas"))
    """Replaces the named fields for the rest of this process; returns the previous options."""
    global _current
    previous = get()
    _current = dataclasses.replace(previous, **changes)
    return previous


@contextlib.contextmanager
def override(**changes) -> Iterator[CpuOptions]:
    """The named fields changed inside the block, restored after it."""
    global _current
    previous = set(**changes)
    try:
        yield _current
    finally:
        _current = previous


def reset() -> None:
    """Forgets every :func:`set`: the next :func:`get` reads the environment again."""
    global _current
    _current = None


def as_env(options: CpuOptions | None = None) -> dict[str, str]:
    """The ``MOEKIT_*`` variables that give a child process ``options`` (default: the current ones)."""
    o = get() if options is None else options
    env = {ENV["native"]: "1" if o.native else "0", ENV["gemm"]: o.gemm, ENV["own_gemm"]: "1" if o.own_gemm else "0",
           ENV["expert_backend"]: o.expert_backend, ENV["loop_profile"]: "1" if o.loop_profile else "0",
           ENV["hidden_symbols"]: ",".join(o.hidden_symbols), ENV["probe"]: "1" if o.probe else "0"}
    if o.block_cache_mb is not None:
        env[ENV["block_cache_mb"]] = str(o.block_cache_mb)
    if o.cache_dir is not None:
        env[ENV["cache_dir"]] = o.cache_dir
    return env
