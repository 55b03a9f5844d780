"""Text generation: one prefill over the (left-padded) prompts, then one token at a time from a
preallocated KV cache.

    moekit generate --model runs/small --prompt "def fib(n):" --max-new-tokens 64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from moekit.model import MoETransformer
from moekit.nn.kv_cache import KVCache


@dataclass
class GenerateResult:
    tokens: list[list[int]]  # generated ids per prompt (stop token included when hit)
    finished: list[bool]  # True where a stop token ended the row


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to the top-k tokens and to the
    smallest set whose probability reaches top-p (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an int >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k!r} is invalid: expected an int >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: expected 0 < top_p <= 1")


@torch.no_grad()
def generate(model: MoETransformer, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Sequence[int] = (), on_token: Callable[[list[int]], None] | None = None) -> GenerateResult:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are left-padded into one batch; padding never influences the
    result. ``on_token`` receives each step's new token per row (for streaming).
    """
    _check(max_new_tokens, temperature, top_k, top_p)
    rows = [list(map(int, p)) for p in (prompts.tolist() if torch.is_tensor(prompts) else prompts)]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    B, L = len(rows), max(len(r) for r in rows)
    total = L + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({L} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the model's "
                         f"max_seq_len={model.cfg.max_seq_len}")
    device = model.embed.weight.device
    input_ids = torch.zeros(B, L, dtype=torch.long, device=device)
    mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    for b, r in enumerate(rows):
        input_ids[b, L - len(r):] = torch.tensor(r, device=device)
        mask[b, L - len(r):] = True
    mask[:, L:] = True
    padded = any(len(r) != L for r in rows)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    cache = KVCache(len(model.layers), total)
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    # 1. Prefill: the whole prompt at once.
    logits = model(input_ids, cache=cache, attention_mask=mask[:, :L] if padded else None).logits[:, -1]
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, generator)
        for b in range(B):
            if not finished[b]:
                out_tokens[b].append(int(nxt[b]))
        if on_token is not None:
            on_token([int(t) if not f else -1 for t, f in zip(nxt, finished)])
        if len(stop):
            finished |= torch.isin(nxt, stop)
            if bool(finished.all()):
                break
        if step + 1 == max_new_tokens:
            break
        # 2. Decode: one token per row, attending to the cache.
        end = L + step + 1
        logits = model(nxt[:, None], cache=cache, attention_mask=mask[:, :end] if padded else None).logits[:, -1]
    model.train(was_training)
    return GenerateResult(out_tokens, finished.tolist())
