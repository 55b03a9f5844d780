"""Sparse upcycling: ``moekit upcycle``.

    moekit upcycle --from runs/dense --experts 8 --top-k 2 --out runs/upcycled
    moekit train --init-from runs/upcycled --preset small --set moe.expert_hidden=1024 --out runs/moe-up

Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(ICLR 2023): each dense FFN chosen to become an MoE layer is replaced by E experts that all start as
copies of it, with a freshly initialised router; everything else (embeddings, attention, norms, the
output head, the FFNs that stay dense) is copied unchanged, and training continues from there.

Legend: E experts, D model width, F FFN hidden width, H = 2F for gated activations (gate rows first,
as in :class:`moekit.nn.mlp.MLP` and :class:`moekit.moe.experts.Experts`) else F.

The dense ``in_proj`` [H, D] and ``down_proj`` [D, F] become every expert's slice of the stacked
``w_in`` [E, H, D] and ``w_out`` [E, D, F]: the two layouts are the same, so no transposition. With
renormalised top-k weights (they sum to 1) and identical experts, each token's output is
Σ_k w_k·FFN(x) = FFN(x): the upcycled model computes the dense model's function (up to float
rounding) until training moves the experts apart. ``noise_std`` perturbs every expert independently
(multiplicative: W·(1 + σ·ε); additive: W + σ·rms(W)·ε, ε ~ N(0, 1)) so that the experts differ from
the first step; the router is N(0, router_init_std²) (the model's ``init_std`` by default). NOTE: a
zero router ties every expert, so top-k picks the same K experts for every token and only the
balancing loss can move the router (and with identical experts the task loss gives it no gradient).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moekit import checkpoint as ckpt_io
from moekit.config import MoEConfig, ModelConfig
from moekit.insight.common import prepare_out_dir, write_marker
from moekit.model import MoETransformer, count_parameters
from moekit.validate import bad, check_choice, check_float, check_int

NOISE_KINDS = ("multiplicative", "additive")
# The balancing of moekit's own MoE presets (tiny, small): the standard load-balancing loss and the
# ST-MoE router z-loss. Override with moe_overrides / --set moe.FIELD=VALUE.
DEFAULT_MOE_FIELDS = {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3}
# Fields the dense FFN decides; an override of them is refused.
_FIXED_FIELDS = ("d_model", "expert_hidden", "num_experts", "top_k", "activation", "mlp_bias", "num_shared_experts",
                 "shared_expert_hidden", "shared_expert_gate", "dense_hidden")


@dataclass(frozen=True)
class UpcycleConfig:
    """How to upcycle; validated at construction."""

    num_experts: int
    top_k: int
    noise_std: float = 0.0
    noise_kind: str = "multiplicative"
    seed: int = 0  # router initialisation and noise
    router_init_std: float | None = None  # None: the model's init_std; 0: a zero router (see the NOTE above)
    moe_every: int = 1  # which dense FFNs become MoE layers (ModelConfig.moe_every / first_k_dense)
    first_k_dense: int = 0
    moe_overrides: dict | None = None  # other MoEConfig fields of the new layers (router, balancing, capacity)

    def __post_init__(self) -> None:
        owner = "UpcycleConfig"
        for name, minimum in (("num_experts", 2), ("top_k", 1), ("moe_every", 1), ("first_k_dense", 0)):
            check_int(owner, name, getattr(self, name), minimum)
        if self.top_k > self.num_experts:
            raise bad(owner, "top_k", self.top_k, f"expected 1 <= top_k <= num_experts={self.num_experts}")
        check_float(owner, "noise_std", self.noise_std)
        check_choice(owner, "noise_kind", self.noise_kind, NOISE_KINDS)
        if self.router_init_std is not None:
            check_float(owner, "router_init_std", self.router_init_std, note="None: the model's init_std")
        fixed = sorted(set(self.moe_overrides or {}) & set(_FIXED_FIELDS))
        if fixed:
            raise bad(owner, "moe_overrides", self.moe_overrides, f"{fixed} follow from the dense FFN and the expert "
                      f"count; allowed are the other MoEConfig fields (router, balancing, capacity, ...)")


@dataclass
class UpcycleResult:
    checkpoint: Path
    model_config: ModelConfig
    max_abs_logit_diff: float  # upcycled vs dense logits on a fixed random batch
    exact_at_init: bool  # whether the routing rule makes the initial output the dense output
    total_params: int
    active_params: int

    def to_dict(self) -> dict:
        return {"checkpoint": str(self.checkpoint), "num_experts": self.model_config.moe.num_experts,
                "top_k": self.model_config.moe.top_k, "moe_layers": [i for i in range(self.model_config.n_layers)
                                                                      if self.model_config.is_moe_layer(i)],
                "max_abs_logit_diff": self.max_abs_logit_diff, "exact_at_init": self.exact_at_init,
                "total_params": self.total_params, "active_params": self.active_params}


def upcycled_config(dense_cfg: ModelConfig, cfg: UpcycleConfig) -> ModelConfig:
    """The MoE model config: the dense one with ``moe`` set (experts of the dense FFN's width)."""
    if dense_cfg.moe is not None:
        raise ValueError(f"the model is already an MoE (moe.num_experts={dense_cfg.moe.num_experts}); upcycling "
                         f"starts from a dense model (ModelConfig.moe=None)")
    if dense_cfg.parallel_residual_mlp:
        raise ValueError("ModelConfig.parallel_residual_mlp=True is not a dense model upcycling applies to")
    fields = {**DEFAULT_MOE_FIELDS, "init_std": dense_cfg.init_std, **(cfg.moe_overrides or {})}
    moe = MoEConfig(d_model=dense_cfg.d_model, expert_hidden=dense_cfg.ffn_hidden, num_experts=cfg.num_experts,
                    top_k=cfg.top_k, activation=dense_cfg.activation, **fields)
    return dense_cfg.replace(moe=moe, moe_every=cfg.moe_every, first_k_dense=cfg.first_k_dense)


def exact_at_init(moe: MoEConfig) -> bool:
    """True when identical experts make the layer's output the dense FFN's output: the chosen weights
    sum to 1 (renormalised top-k, noisy top-k's softmax over the chosen, soft gating), no scaling, no
    capacity drops."""
    sums_to_one = (moe.router in ("softmax_topk", "sigmoid") and moe.normalize_weights and moe.normalize_p == 1) \
        or moe.router in ("noisy_topk", "soft")
    ecf = moe.capacity_factor if moe.eval_capacity_factor == "same" else moe.eval_capacity_factor
    return sums_to_one and moe.routed_scaling_factor == 1.0 and ecf is None


def _copies(w: torch.Tensor, E: int, cfg: UpcycleConfig, gen: torch.Generator) -> torch.Tensor:
    """[E, *w.shape]: E copies of ``w``, each perturbed independently when ``noise_std`` > 0."""
    w_E = w.detach().unsqueeze(0).repeat(E, *([1] * w.dim()))
    if cfg.noise_std > 0:
        eps = torch.randn(w_E.shape, generator=gen, dtype=torch.float64).to(w.dtype)
        if cfg.noise_kind == "multiplicative":
            w_E = w_E * (1 + cfg.noise_std * eps)
        else:
            w_E = w_E + cfg.noise_std * w.detach().pow(2).mean().sqrt() * eps
    return w_E


@torch.no_grad()
def upcycle_model(dense: MoETransformer, cfg: UpcycleConfig) -> MoETransformer:
    """The upcycled model (see the module docstring); ``dense`` is left unchanged."""
    new_cfg = upcycled_config(dense.cfg, cfg)
    E = cfg.num_experts
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's RNG
        model = MoETransformer(new_cfg).to(next(dense.parameters()).dtype)
    dense_sd = dense.state_dict()
    target = model.state_dict()
    new_sd: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    router_std = new_cfg.init_std if cfg.router_init_std is None else cfg.router_init_std
    for i in range(new_cfg.n_layers):
        if not new_cfg.is_moe_layer(i):
            continue
        p = f"layers.{i}.ffn."
        w_in_HD, w_out_DF = dense_sd[p + "in_proj.weight"], dense_sd[p + "down_proj.weight"]
        consumed |= {p + "in_proj.weight", p + "down_proj.weight"}
        new_sd[p + "experts.w_in"] = _copies(w_in_HD, E, cfg, gen)  # [E, H, D]
        new_sd[p + "experts.w_out"] = _copies(w_out_DF, E, cfg, gen)  # [E, D, F]
        weight_ED = torch.randn(E, new_cfg.d_model, generator=gen, dtype=torch.float64) * router_std
        new_sd[p + "router.weight_ED"] = weight_ED.to(target[p + "router.weight_ED"].dtype)
        for name in ("router.expert_bias", "router.load_since_update", "router.noise_weight_ED"):
            if p + name in target:  # balancing state and the noisy gate's noise weights start at zero
                new_sd[p + name] = torch.zeros_like(target[p + name])
    for key, value in dense_sd.items():
        if key not in consumed:
            new_sd[key] = value
    missing, unexpected = sorted(set(target) - set(new_sd)), sorted(set(new_sd) - set(target))
    if missing or unexpected:  # a model feature this function does not know how to upcycle
        raise ValueError(f"upcycling cannot fill the MoE model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(new_sd, strict=True)
    return model.eval()


@torch.no_grad()
def probe_difference(a: MoETransformer, b: MoETransformer, seed: int = 0) -> float:
    """max |logits_a - logits_b| on a fixed random batch (2 x 64 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.cfg.vocab_size, (2, min(64, a.cfg.max_seq_len)), generator=gen)
    return float((a.eval()(ids).logits - b.eval()(ids).logits).abs().max())


def upcycle(src: str | Path, out: str | Path, cfg: UpcycleConfig, overwrite: bool = False) -> UpcycleResult:
    """``moekit upcycle``: loads the dense checkpoint (or the newest of a run), writes the upcycled
    model as a moekit checkpoint in ``out`` (with the source's tokenizer and training options)."""
    dense, tokenizer, config = ckpt_io.load_model(Path(src))
    upcycled_config(dense.cfg, cfg)  # a wrong request fails before anything is written
    model = upcycle_model(dense, cfg)
    diff = probe_difference(dense, model)
    out = prepare_out_dir(Path(out), overwrite, "upcycle")
    path = ckpt_io.save_checkpoint(out, 0, model, model.cfg, tokenizer, config.get("train"))
    count = count_parameters(model.cfg)
    result = UpcycleResult(path, model.cfg, diff, exact_at_init(model.cfg.moe), count.total, count.active)
    write_marker(out, "upcycle", source=str(ckpt_io.resolve(Path(src))), config=asdict(cfg), **result.to_dict())
    return result
