"""Text generation: one prefill over the (left-padded) prompts, then one token at a time from a
preallocated KV cache.

    moekit generate --model runs/small --prompt "def fib(n):" --max-new-tokens 64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from moekit.model import MoETransformer, padded_causal_mask, padded_positions
from moekit.moe.backends import gather_decoding
from moekit.nn.kv_cache import KVCache, StaticKVCache
from moekit.validate import check_float, check_int


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
    """The sampling settings; the errors name the keyword argument (owner "")."""
    check_int("", "max_new_tokens", max_new_tokens, 0)
    check_float("", "temperature", temperature, note="0 = greedy")
    if top_k is not None:
        check_int("", "top_k", top_k, 1)
    if top_p is not None:
        check_float("", "top_p", top_p, 0, 1, above=True)


def _prompt_rows(prompts) -> list[list[int]]:
    """Prompts as lists of ids: a batch (a list of lists, or a [B, L] tensor), or one prompt (a flat
    list of ids as a tokenizer returns it, or a 1-D tensor)."""
    if torch.is_tensor(prompts):
        if prompts.dim() not in (1, 2) or prompts.is_floating_point():
            raise ValueError(f"prompts as a tensor must hold integer ids of shape [L] or [B, L], got "
                             f"{prompts.dtype} {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts are token ids: encode the text with the model's tokenizer first")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) or (torch.is_tensor(t) and t.dim() == 0) for t in prompts):
        prompts = [prompts]  # one prompt
    rows = []
    for p in prompts:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise TypeError(f"prompts must be a list of token-id lists (or one list of ids), got an element "
                            f"{p!r}")
        rows.append([int(t) for t in p])
    return rows


def static_forward(model: MoETransformer, ids_BS: torch.Tensor, positions_BS: torch.Tensor, valid_BL: torch.Tensor,
                   cache: StaticKVCache) -> torch.Tensor:
    """Last-position logits [B, V] of ``ids_BS`` written at the cache's ``slots_S``: fixed shapes
    throughout (the whole cache length is attended under a mask), so the decode step compiles once.

    ``positions_BS`` are the rotary positions (counted from each row's first real token), ``valid_BL``
    marks the cache slots holding real tokens (False for left padding): padding is attended by no
    token and routed to no expert.
    """
    x = model.embed_tokens(ids_BS)
    cos, sin = model.rope(positions_BS, x.dtype)
    allowed_BSL = padded_causal_mask(cache.slots_S, torch.arange(cache.max_len, device=ids_BS.device), valid_BL)
    real_BS = valid_BL[:, cache.slots_S]
    for blk, layer_cache in zip(model.layers, cache.layers):
        x, _ = blk(x, cos[:, None], sin[:, None], layer_cache, allowed_BSL[:, None], real_BS)
    return model.head(x[:, -1])


_compiled_forward = None
_aten = torch.ops.aten


# Products with at most this many rows become reductions in the compiled decode step. A one-off
# trial on the model of `python benchmarks/generate.py` (fp32, 2 cores), with this limit at 16 and
# then with plain inductor, gave decode steps of 2.3/5.3/9.1/15.0 ms at batch 1/2/4/8 decomposed vs
# 3.6/6.8/9.6/12.2 ms with MKL: MKL wins again at 8 rows.
ROW_PRODUCT_MAX_ROWS = 4


def _row_products(a_MK: torch.Tensor, b_KN: torch.Tensor):
    """A product of a few rows as multiply-and-sum, which inductor fuses into one reduction
    streaming the weight near memory bandwidth (MKL's GEMM reads it at about half that:
    ``python benchmarks/decode_gemv.py``)."""
    if a_MK.shape[0] > ROW_PRODUCT_MAX_ROWS or a_MK.device.type != "cpu":  # measured on CPUs only
        return NotImplemented
    acc = torch.promote_types(a_MK.dtype, torch.float32)
    return (a_MK.to(acc)[:, :, None] * b_KN.to(acc)[None]).sum(1).to(a_MK.dtype)


def _decode_decompositions():
    from torch._inductor.decomposition import select_decomp_table

    # NOTE: these replace inductor's own mm/addmm rules (no fallback to them); the decode figures in
    # the README were measured so.
    table = dict(select_decomp_table())

    def addmm(bias, a, b, beta=1, alpha=1):
        out = _row_products(a, b) if beta == 1 and alpha == 1 else NotImplemented
        return out if out is NotImplemented else bias + out

    table[_aten.mm.default], table[_aten.addmm.default] = _row_products, addmm
    return table


def _compiled_static_forward():
    global _compiled_forward
    if _compiled_forward is None:
        from functools import partial

        from torch._inductor.compile_fx import compile_fx

        # dynamic=False: one graph per (model, batch, cache length), every step reuses it
        backend = partial(compile_fx, decompositions=_decode_decompositions())
        _compiled_forward = torch.compile(static_forward, backend=backend, dynamic=False)
    return _compiled_forward


class _EagerDecoder:
    """Growing KV cache, the model's own forward (its causal / padding masks)."""

    def __init__(self, model, input_ids_BL, mask_BT, padded):
        self.model, self.mask, self.padded, self.L = model, mask_BT, padded, input_ids_BL.shape[1]
        self.cache = KVCache(len(model.layers), mask_BT.shape[1])
        self.first = input_ids_BL

    def prefill(self):
        mask = self.mask[:, :self.L] if self.padded else None
        return self.model(self.first, cache=self.cache, attention_mask=mask).logits[:, -1]

    def step(self, nxt_B, step):
        end = self.L + step + 1
        mask = self.mask[:, :end] if self.padded else None
        return self.model(nxt_B[:, None], cache=self.cache, attention_mask=mask).logits[:, -1]


class _CompiledDecoder:
    """Static KV cache; the prefill runs eagerly, each single-token step through one compiled graph."""

    BUCKET = 64  # cache lengths are rounded up to a multiple of this: fewer distinct graphs

    def __init__(self, model, input_ids_BL, mask_BT, padded):
        B, T = mask_BT.shape
        self.model, self.L, self.first = model, input_ids_BL.shape[1], input_ids_BL
        cache_len = -(-T // self.BUCKET) * self.BUCKET
        self.cache = StaticKVCache(len(model.layers), cache_len)
        self.valid_BC = mask_BT.new_zeros(B, cache_len)
        self.valid_BC[:, :T] = mask_BT
        self.positions_BC = padded_positions(self.valid_BC)
        self.slot_1 = torch.zeros(1, dtype=torch.long, device=mask_BT.device)
        self.pos_B1 = torch.zeros(B, 1, dtype=torch.long, device=mask_BT.device)
        self.forward = _compiled_static_forward()
        self.decoding = gather_decoding(model)  # (finds the MoE layers once, entered every step)

    def prefill(self):
        self.cache.slots_S = torch.arange(self.L, device=self.first.device)
        logits = static_forward(self.model, self.first, self.positions_BC[:, :self.L], self.valid_BC, self.cache)
        self.cache.slots_S = self.slot_1  # every step writes one slot, refilled in place
        return logits

    def step(self, nxt_B, step):
        col = self.L + step
        self.slot_1.fill_(col)
        self.pos_B1.copy_(self.positions_BC[:, col:col + 1])
        with self.decoding:
            return self.forward(self.model, nxt_B[:, None], self.pos_B1, self.valid_BC, self.cache)


@torch.no_grad()
def generate(model: MoETransformer, prompts: Sequence[Sequence[int]] | torch.Tensor, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_tokens: Sequence[int] = (), on_token: Callable[[list[int]], None] | None = None,
             compile: bool = False) -> GenerateResult:
    """Continues each prompt by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are left-padded into one batch; padding never influences the
    result (it is attended by no token and routed to no expert). NOTE: with a capacity factor or
    expert-choice routing a token's routing depends on the other tokens of its forward pass (the
    capacity is per batch): prompts batched together can then continue differently than alone, and
    cached decoding (the prompt at once, then one token per row and step) differs from recomputing
    the whole sequence each step. ``on_token`` receives each step's new token per row (for streaming).

    ``compile=True`` runs each decode step through ``torch.compile`` with a static KV cache (the
    experts of dropless token-choice layers then read their weights in place, see
    :func:`moekit.moe.backends.gather.gather_experts`): in fp32 on a 2-core CPU 2.0-2.9x the eager tokens/s
    at batch 1-8 once compiled (bf16 at batch 8 gains nothing), at a one-off
    compile of several seconds per (model, batch size, cache length) in a process; past dynamo's
    recompile limit (8 graphs) further shapes decode eagerly, correct but slower. It needs the C++
    compiler inductor uses on a CPU.
    """
    _check(max_new_tokens, temperature, top_k, top_p)
    rows = _prompt_rows(prompts)
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
    model.check_token_ids(input_ids)  # the compiled path skips the model's own check
    padded = any(len(r) != L for r in rows)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    out_tokens: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return GenerateResult(out_tokens, finished.tolist())
    was_training = model.training
    model.eval()
    try:
        decoder = (_CompiledDecoder if compile else _EagerDecoder)(model, input_ids, mask, padded)
        # 1. Prefill: the whole prompt at once.
        logits = decoder.prefill()
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
            logits = decoder.step(nxt, step)
    finally:
        model.train(was_training)
    return GenerateResult(out_tokens, finished.tolist())
