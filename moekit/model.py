"""The decoder-only language model: dense or MoE FFN layer by layer.

Legend: B batch, S sequence, D model width, V vocabulary.

Usage::

    model = MoETransformer(ModelConfig.from_name("tiny"))
    out = model(input_ids_BS, targets=targets_BS)     # out.loss includes the aux losses
    out.loss.backward()                               # (no logits: the loss is fused with the head)
    logits_BSV = model(input_ids_BS).logits
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.config import MoEConfig, ModelConfig
from moekit.cpu import gemm as cpu_gemm
from moekit.moe.backends import chooser
from moekit.moe.layer import MoELayer, RoutingStats
from moekit.nn.attention import build_attention
from moekit.nn.initialize import init_weights
from moekit.nn.kv_cache import KVCache
from moekit.nn.loss import cross_entropy, linear_cross_entropy, torch_mm
from moekit.nn.mlp import MLP
from moekit.nn.norm import build_norm
from moekit.nn.rope import rope_cos_sin, scaled_frequencies


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V]; None when targets are given without return_logits
    aux_loss: torch.Tensor  # () sum of every MoE layer's weighted aux losses
    loss: torch.Tensor | None = None  # () cross-entropy + aux_loss, when targets are given
    ce_loss: torch.Tensor | None = None  # () cross-entropy alone
    routing: dict[int, RoutingStats] = field(default_factory=dict)  # layer index -> stats
    aux_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, summed over layers


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is an :class:`MoELayer` or a dense :class:`MLP`."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg = cfg
        self.index = index
        self.is_moe = cfg.is_moe_layer(index)
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.attn = build_attention(cfg)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe)
        else:
            self.ffn = MLP(cfg.d_model, cfg.ffn_hidden, cfg.activation)
        if cfg.sandwich_norm:
            self.post_attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
            self.post_ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        if cfg.parallel_residual_mlp and self.is_moe:
            self.residual_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
            self.residual_mlp = MLP(cfg.d_model, cfg.ffn_hidden, cfg.activation)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, mask=None,
                token_mask: torch.Tensor | None = None):
        """``mask``: the attention mask; ``token_mask`` [B, S] (bool, True = real token): the MoE layer
        routes the real tokens only, so padding takes no expert capacity (see :meth:`MoELayer.forward`)."""
        cfg = self.cfg
        r = cfg.residual_multiplier  # µP (Granite): branch outputs scaled before they join the stream
        h = self.attn(self.attn_norm(x_BSD), cos, sin, cache, mask)
        if cfg.sandwich_norm:
            h = self.post_attn_norm(h)
        if r != 1.0:
            h = h * r
        if cfg.parallel_residual_mlp and self.is_moe:
            # Arctic: the MoE reads the block input, the residual MLP the post-attention stream.
            attended = x_BSD + h
            res = self.ffn(self.ffn_norm(x_BSD), token_mask)
            mlp = self.residual_mlp(self.residual_norm(attended))
            return (attended + (mlp + res.output) * r if r != 1.0 else attended + mlp + res.output), res
        x_BSD = x_BSD + h
        ffn_in = self.ffn_norm(x_BSD)
        res = self.ffn(ffn_in, token_mask) if self.is_moe else None
        y = res.output if res is not None else self.ffn(ffn_in)
        if cfg.sandwich_norm:
            y = self.post_ffn_norm(y)
        return x_BSD + (y * r if r != 1.0 else y), res


def padded_positions(valid_BT: torch.Tensor) -> torch.Tensor:
    """Rotary positions of a left-padded batch: counted from each row's first real token."""
    return (valid_BT.long().cumsum(dim=-1) - 1).clamp(min=0)


def padded_causal_mask(q_pos_S: torch.Tensor, k_pos_L: torch.Tensor, valid_BL: torch.Tensor) -> torch.Tensor:
    """[B, S, L] True where query position q may attend key position k: causal, never onto padding;
    a padding query attends to itself only, so its (unused) row stays finite."""
    causal_SL = k_pos_L[None, :] <= q_pos_S[:, None]
    return (causal_SL[None] & valid_BL[:, None, :]) | (k_pos_L[None, :] == q_pos_S[:, None])[None]


class MoETransformer(nn.Module):
    """Token embedding, ``n_layers`` :class:`Block` s, final norm and LM head (optionally tied)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"MoETransformer expects a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.init_weights()
        # Dense fp32 CPU products (attention, dense FFNs, the head, the loss) on oneDNN where the chooser
        # says so; a dense model is left plain (and loads no native code) unless gemm='onednn' is asked for.
        self.accelerated = chooser.accelerates_dense(cfg)
        if self.accelerated:
            self._dense_shape = chooser.dense_shape(cfg)
            cpu_gemm.accelerate(self, self._onednn)

    def init_weights(self) -> None:
        """All initialisation: :func:`moekit.nn.initialize.init_weights` (GPT-2's scheme) with the config's
        ``init_std``, the output projections into the residual stream at init_std / sqrt(2 · n_layers),
        and the routers' gates at the MoE config's own ``init_std``."""
        cfg = self.cfg
        init_weights(self, cfg.init_std, out_std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
                     router_std=cfg.moe.init_std if cfg.moe is not None else None)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables for the given positions, in fp32 (fp64 for an fp64 model)."""
        cfg = self.cfg
        rot = cfg.rope_dims
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        inv_freq, attention = scaled_frequencies(rot, cfg.rope_theta, cfg.rope_scaling, positions.device, table_dtype)
        cos, sin = rope_cos_sin(positions, inv_freq)
        return (cos, sin) if attention == 1.0 else (cos * attention, sin * attention)

    def _positions(self, B, S, start, cached, attention_mask, dtype, device):
        """RoPE tables and the attention mask (None: plain causal) for positions start .. start+S-1."""
        end = start + S
        if attention_mask is None:
            cos, sin = self.rope(torch.arange(start, end, device=device), dtype)
            if not cached or start == 0:
                return cos, sin, None
            q_pos, k_pos = torch.arange(start, end, device=device)[:, None], torch.arange(end, device=device)[None]
            return cos, sin, (k_pos <= q_pos)[None, None]
        if attention_mask.shape != (B, end):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({B}, {end}): "
                             f"batch x (cached positions + new tokens)")
        valid = attention_mask.to(device=device, dtype=torch.bool)
        cos, sin = self.rope(padded_positions(valid)[:, start:], dtype)
        allowed = padded_causal_mask(torch.arange(start, end, device=device), torch.arange(end, device=device), valid)
        return cos[:, None], sin[:, None], allowed[:, None]

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [blk.ffn for blk in self.layers if blk.is_moe]

    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size}); got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        return x * self.cfg.embedding_multiplier if self.cfg.embedding_multiplier != 1.0 else x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection (times Grok-1's output multiplier)."""
        h = self.norm(x)
        logits = cpu_gemm.linear(h, self.output_weight(), onednn=self._onednn(h))
        if self.cfg.lm_head_bias:
            logits = logits + self.lm_head.bias
        return logits * self.cfg.logit_multiplier if self.cfg.logit_multiplier != 1.0 else logits

    def _onednn(self, t: torch.Tensor) -> bool:
        return self.accelerated and chooser.dense_onednn(self._dense_shape, t)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, ignore_index: int = -100,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                return_logits: bool = False) -> ModelOutput:
        """Logits of ``input_ids`` [B, S]; with ``targets`` the loss instead (mean next-token
        cross-entropy over targets other than ``ignore_index``, computed a chunk of tokens at a time
        without the [B, S, V] logits, see :func:`moekit.nn.loss.linear_cross_entropy`); with
        ``return_logits`` too the logits as well, and the loss from them.

        Decoding: ``cache`` holds the keys and values of the positions before these ones (its ``pos``
        advances by S); ``attention_mask`` [B, pos + S] marks real tokens (1) and left padding (0):
        padded rows get positions counted from their first real token and never attend to padding,
        and the MoE layers route no padding (it takes no capacity and counts in no aux loss or
        statistic), so padding never changes a real token's result.
        """
        cfg = self.cfg
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor of shape [batch, seq], got "
                             f"{input_ids.dtype} {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + S > cfg.max_seq_len:
            raise ValueError(f"sequence length {start + S} exceeds ModelConfig.max_seq_len={cfg.max_seq_len}")
        self.check_token_ids(input_ids)

        x = self.embed_tokens(input_ids)
        cos, sin, mask = self._positions(B, S, start, cache is not None, attention_mask, x.dtype, input_ids.device)
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        # the new tokens' padding is routed to no expert (it would take capacity from real tokens)
        token_mask = attention_mask[:, start:].to(device=input_ids.device, dtype=torch.bool) \
            if attention_mask is not None else None
        aux = x.new_zeros((), dtype=torch.float32)
        routing: dict[int, RoutingStats] = {}
        terms: dict[str, torch.Tensor] = {}
        for blk, layer_cache in zip(self.layers, layer_caches):
            x, res = blk(x, cos, sin, layer_cache, mask, token_mask)
            if res is not None:
                aux = aux + res.aux_loss
                routing[blk.index] = res.stats
                for k, v in res.aux_terms.items():
                    terms[k] = terms.get(k, 0) + v
        if cache is not None:
            cache.pos += S
        if targets is None or return_logits or cfg.lm_head_bias:  # the fused loss below has no head bias
            logits = self.head(x)
            out = ModelOutput(logits, aux, routing=routing, aux_terms=terms)
            if targets is not None:
                out.ce_loss = cross_entropy(logits.view(B * S, -1), targets.reshape(B * S), ignore_index)
        else:  # the loss without the [B, S, V] logits (see moekit.nn.loss)
            out = ModelOutput(None, aux, routing=routing, aux_terms=terms)
            h = self.norm(x).reshape(B * S, -1)
            mm = functools.partial(cpu_gemm.mm, onednn=True) if self._onednn(h) else torch_mm
            out.ce_loss = linear_cross_entropy(h, self.output_weight(), targets.reshape(B * S), ignore_index,
                                               cfg.logit_multiplier, mm=mm)
        if targets is not None:
            out.loss = out.ce_loss + aux
        return out


@dataclass
class ParamCount:
    total: int
    active: int  # parameters a token uses: all but the routed experts it is not sent to
    embedding: int  # input embedding (+ untied output head)
    experts: int  # routed-expert parameters

    def to_dict(self) -> dict[str, int]:
        return dict(total=self.total, active=self.active, embedding=self.embedding, experts=self.experts)


def _expert_params(moe: MoEConfig) -> int:
    """Parameters of one routed expert."""
    h_in = (2 if moe.gated else 1) * moe.expert_hidden
    n = moe.d_model * h_in + moe.expert_hidden * moe.d_model
    if moe.mlp_bias:
        n += h_in + moe.d_model
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 · (active non-embedding parameters + the
    output head) + 12 · layers · seq_len · attention width (Chinchilla / PaLM appendix B accounting;
    the causal mask's halving is ignored, as there)."""
    c = count_parameters(cfg)
    head = cfg.vocab_size * cfg.d_model
    non_embedding = c.active - c.embedding
    attn_width = cfg.n_heads * cfg.qk_head_dim
    return 6.0 * (non_embedding + head) + 12.0 * cfg.n_layers * seq_len * attn_width


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Total and active parameters, built on the meta device (no memory, even for 671B).

    Active = total - (E - K) · (one routed expert) per MoE layer: a token runs K routed experts and
    everything else (attention, shared and dense FFNs, routers, norms, embeddings and head).
    """
    with torch.device("meta"):
        model = MoETransformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel() + (model.lm_head.weight.numel() if model.lm_head is not None else 0)
    n_moe = len(model.moe_layers)
    experts, inactive = 0, 0
    if n_moe:
        per = _expert_params(cfg.moe)
        experts = n_moe * cfg.moe.num_experts * per
        inactive = n_moe * (cfg.moe.num_experts - cfg.moe.top_k) * per
    return ParamCount(total, total - inactive, embedding, experts)
