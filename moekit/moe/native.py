"""Where moekit's C++ extension was reached before :mod:`moekit.cpu`: the names the benchmarks and
older code use, kept as aliases. New code imports :mod:`moekit.cpu.build`, :mod:`moekit.cpu.cache` and
:mod:`moekit.cpu.topk`; importing this module loads nothing."""

from moekit.cpu.build import build_root, library_name, load, unavailable_reason
from moekit.cpu.cache import (cache_limit_mb, cache_min_mb, cached_bytes, empty_cache, set_cache_limit_mb,
                              set_cache_min_mb)
from moekit.cpu.topk import topk_indices

__all__ = ["build_root", "cache_limit_mb", "cache_min_mb", "cached_bytes", "empty_cache", "library_name", "load",
           "set_cache_limit_mb", "set_cache_min_mb", "topk_indices", "unavailable_reason"]
