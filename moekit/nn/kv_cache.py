"""A preallocated key/value cache for incremental decoding.

Legend: B batch, G key/value heads, L cache length, Dk/Dv key/value head dims.
"""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's keys and values, allocated on first use at the cache's full length."""

    def __init__(self, cache: "KVCache"):
        self.cache = cache
        self.k_BGLD: torch.Tensor | None = None
        self.v_BGLD: torch.Tensor | None = None

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new positions at the cache's current offset; returns every key and value so far."""
        B, G, S, _ = k_new.shape
        start, L = self.cache.pos, self.cache.max_len
        if start + S > L:
            raise ValueError(f"the KV cache holds {L} positions; writing {S} at {start} overflows it")
        if self.k_BGLD is None:
            self.k_BGLD = k_new.new_empty(B, G, L, k_new.shape[-1])
            self.v_BGLD = v_new.new_empty(B, v_new.shape[1], L, v_new.shape[-1])
        self.k_BGLD[:, :, start:start + S] = k_new
        self.v_BGLD[:, :, start:start + S] = v_new
        return self.k_BGLD[:, :, :start + S], self.v_BGLD[:, :, :start + S]


class KVCache:
    """Per-layer caches; the model advances ``pos`` after each forward (every layer writes once)."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self.layers = [LayerKV(self) for _ in range(n_layers)]


class StaticLayerKV:
    """One layer's keys and values at fixed shape: every forward writes at the cache's ``slots`` and
    returns all ``max_len`` positions (the attention mask hides the ones not written yet)."""

    def __init__(self, cache: "StaticKVCache"):
        self.cache = cache
        self.k_BGLD: torch.Tensor | None = None
        self.v_BGLD: torch.Tensor | None = None

    def update(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_BGLD is None:  # the first (eager) forward allocates; compiled steps only write
            B, L = k_new.shape[0], self.cache.max_len
            self.k_BGLD = k_new.new_zeros(B, k_new.shape[1], L, k_new.shape[-1])
            self.v_BGLD = v_new.new_zeros(B, v_new.shape[1], L, v_new.shape[-1])
        self.k_BGLD.index_copy_(2, self.cache.slots_S, k_new)
        self.v_BGLD.index_copy_(2, self.cache.slots_S, v_new)
        return self.k_BGLD, self.v_BGLD


class StaticKVCache:
    """Per-layer fixed-shape caches for a compiled decode step (gpt-fast's static cache).

    ``slots_S`` (int64 [S]) names the cache positions the next forward writes; a decode step keeps
    one [1] tensor and refills it in place, so the compiled graph sees the same shapes every step.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.slots_S: torch.Tensor | None = None
        self.layers = [StaticLayerKV(self) for _ in range(n_layers)]
