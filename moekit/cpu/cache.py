"""The C++ loop's cache of freed step buffers (``csrc/block_cache.cpp``).

Its step buffers of 32 MiB or more (h, the expert weight gradients) come from a cache of freed
blocks: glibc maps allocations that large fresh from the kernel, and faulting their pages in cost
more than writing them, every step. The bound is 2048 MiB unless ``MOEKIT_BLOCK_CACHE_MB``
(:mod:`moekit.cpu.options`) or :func:`set_cache_limit_mb` says otherwise. None of these builds the
extension where it is not loaded yet, except those that set a bound.
"""

from __future__ import annotations

from moekit.cpu import build


def empty_cache() -> int:
    """Frees the blocks kept for reuse and returns their bytes. Blocks still held by tensors are not
    touched. Builds nothing."""
    module = build.loaded()
    return module.release_cache() if module is not None else 0


def cached_bytes() -> int:
    """Bytes of freed blocks kept for the next step (0 before the extension is loaded)."""
    module = build.loaded()
    return module.cache_bytes() if module is not None else 0


def cache_limit_mb() -> int:
    """The most MiB of freed blocks kept; 0 when the extension cannot be built."""
    module = build.load()
    return module.cache_limit() >> 20 if module is not None else 0


def _mib(name: str, mib: int) -> int:
    if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0:
        raise ValueError(f"{name}: a whole number of MiB >= 0, got {mib!r}")
    return mib << 20


def set_cache_limit_mb(mib: int) -> None:
    """Bounds the MiB of freed blocks kept (0: none), freeing the oldest above the new bound."""
    limit = _mib("set_cache_limit_mb", mib)
    module = build.load()
    if module is not None:
        module.set_cache_limit(limit)


def cache_min_mb() -> int:
    """The smallest block (MiB) the cache keeps: by default 32, glibc's largest mmap threshold (smaller
    buffers come from its heap without page faults); 0 when the extension cannot be built."""
    module = build.load()
    return module.cache_min_bytes() >> 20 if module is not None else 0


def set_cache_min_mb(mib: int) -> None:
    """The smallest block (MiB) the cache keeps; smaller buffers come from torch's allocator."""
    smallest = _mib("set_cache_min_mb", mib)
    module = build.load()
    if module is not None:
        module.set_cache_min_bytes(smallest)
