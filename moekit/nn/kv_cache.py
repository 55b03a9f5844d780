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
