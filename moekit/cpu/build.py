"""Builds and loads moekit's C++ extension (``csrc/``), on first use, with PyTorch's extension builder
(a C++ compiler and ninja; cached per source and torch version, see :func:`build_root`).

Nothing imports this module until an expert backend or GEMM that needs the extension is chosen
(:mod:`moekit.moe.backends.chooser`): importing moekit or running a dense model builds nothing.

If the build fails (no compiler, no ninja) :func:`load` returns None after one warning, and every path
runs in pure PyTorch; ``MOEKIT_NATIVE=0`` (:mod:`moekit.cpu.options`) skips the build. The extension
calls two private libtorch symbols (see ``csrc/symbols.cpp``); a torch that does not export one is
named in a warning, once, and the pure-PyTorch path takes over for what it served.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from moekit.cpu import options

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))

# What takes over when a private symbol is missing (by the name csrc/symbols.cpp gives it, up to "(").
FALLBACKS = {
    "at::native::mkldnn_matmul": "fp32 products run on torch.mm (the BLAS) instead of oneDNN",
    "Sleef_expf16_u10": "the C++ loop's gated SiLU runs on ATen's kernels instead of its fused one",
}


def build_root() -> Path:
    """Where the compiled extension is kept: under PyTorch's JIT-extension directory
    (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), per torch and Python version."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(root) / "moekit" / f"torch-{torch.__version__}-{sys.implementation.cache_tag}"


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flags() -> tuple[list[str], list[str]]:
    """Compile and link flags. Without OpenMP (Apple clang) ``at::parallel_for`` runs the groups one
    after the other: still correct, without the split's gain. ``loop_profile`` builds (and loads) a
    library of its own that times the loop's kinds of work (``benchmarks/loop_profile.py``)."""
    profile = ["-DMOEKIT_LOOP_PROFILE"] if options.get().loop_profile else []
    if sys.platform == "win32":
        return ["/O2", "/openmp", *profile], []
    if sys.platform == "darwin":
        return ["-O3", *profile], []
    return ["-O3", "-fopenmp", *profile], ["-fopenmp"]


def library_name() -> str:
    """The sources, the flags and the torch build it is compiled against, hashed into the name."""
    key = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    key.update(repr((_flags(), torch.__version__, torch.version.git_version,
                     torch._C._GLIBCXX_USE_CXX11_ABI)).encode())
    return "moekit_cpu_" + key.hexdigest()[:12]


def _compile(name: str, root: Path) -> object:
    """Builds in a private directory, then publishes the library with one atomic rename: a build that
    is interrupted (Ctrl-C, kill) leaves no lock or half-written file for the next process to wait on
    or load, and processes building at once each publish a whole file."""
    from torch.utils import cpp_extension

    print(f"moekit: compiling the C++ extension into {root} (once, ~1 min)", file=sys.stderr)
    cflags, ldflags = _flags()
    # The builder runs `ninja` from PATH: the one pip put next to this interpreter comes first.
    scripts, path = sysconfig.get_path("scripts"), os.environ.get("PATH")
    if scripts:
        os.environ["PATH"] = os.pathsep.join(filter(None, [scripts, path]))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=f".build-{name}-", ignore_cleanup_errors=True) as tmp:
            module = cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], build_directory=tmp,
                                        extra_cflags=cflags, extra_ldflags=ldflags, extra_include_paths=[str(CSRC)],
                                        verbose=False)
            built = Path(module.__file__)
            staged = root / f".{name}.{os.getpid()}.partial"
            try:
                shutil.copyfile(built, staged)
                os.replace(staged, root / built.name)
            except OSError as exc:  # read-only or full disk, a loaded library on Windows: this process still has it
                warnings.warn(f"moekit: could not keep the compiled C++ extension in {root} ({exc}); the next "
                              f"process compiles it again", RuntimeWarning, stacklevel=4)
                staged.unlink(missing_ok=True)
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path
    return module


def _build() -> tuple[object | None, str | None]:
    """(the module, None) or (None, why not); a failed build is recorded next to the library."""
    try:
        root, name = build_root(), library_name()
        failed = root / f"{name}.failed"
        if failed.exists():  # an earlier process could not build it: do not pay for the attempt again
            raise RuntimeError(f"{failed.read_text().strip()} (recorded in {failed}; delete it to try again)")
        for built in sorted(root.glob(name + ".*")):  # built before, by this or another process
            if built.suffix in (".so", ".pyd"):
                try:
                    return _import(name, built), None
                except ImportError as exc:  # unreadable: build it again over it
                    warnings.warn(f"moekit: could not load {built} ({exc}); rebuilding it", RuntimeWarning,
                                  stacklevel=3)
        try:
            return _compile(name, root), None
        except Exception as exc:
            try:
                root.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(exc).__name__}: {_first_line(exc)}\n")
            except OSError:
                pass
            raise
    except Exception as exc:  # no compiler, no ninja, a failed compile: the pure-PyTorch paths still work
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
        warnings.warn(f"moekit: the C++ extension ({CSRC}) did not build ({reason}); experts run the Python "
                      f"loop, slower on CPU. MOEKIT_NATIVE=0 skips the build.", RuntimeWarning, stacklevel=3)
        return None, reason


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _prepare(module) -> None:
    """Applies the options the extension takes at load, then names each private symbol it misses."""
    opts = options.get()
    for name in opts.hidden_symbols:
        if not module.hide_symbol(name):
            known = ", ".join(n for n, _ in module.private_symbols())
            raise ValueError(f"MOEKIT_HIDE_SYMBOLS: {name!r} is not a symbol the C++ extension uses; known: {known}")
    if opts.block_cache_mb is not None:
        module.set_cache_limit(opts.block_cache_mb << 20)
    for name, usable in module.private_symbols():
        if not usable:
            short = name.split("(", 1)[0]
            warnings.warn(f"moekit: this torch ({torch.__version__}) does not export {name}, a private libtorch "
                          f"symbol moekit's C++ extension uses (a newer PyTorch may have renamed it or changed its "
                          f"signature); {FALLBACKS.get(short, 'the pure-PyTorch path runs instead')}",
                          RuntimeWarning, stacklevel=4)


_loaded: tuple[object | None, str | None] | None = None  # (module, why not), once per process
_load_lock = threading.Lock()  # threads asking at once wait for one build


def _state() -> tuple[object | None, str | None]:
    # NOTE: a plain global, not functools.cache or @torch.compiler.disable: Dynamo reads a global
    # without tracing into the build, and the decorator would import torch._dynamo with moekit
    # (+1.4 s, +70 MB for every `import moekit`).
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                module, reason = _build()
                if module is not None:
                    _prepare(module)
                _loaded = module, reason
    return _loaded


def load():
    """The compiled module, or None when it is turned off or cannot be built (see :func:`unavailable_reason`)."""
    if not options.get().native:
        return None
    return _state()[0]


def unavailable_reason() -> str | None:
    if not options.get().native:
        return "turned off by MOEKIT_NATIVE=0"
    return _state()[1]


def loaded():
    """The compiled module when it is already loaded (and not turned off), else None: builds nothing."""
    if _loaded is None or not options.get().native:
        return None
    return _loaded[0]
