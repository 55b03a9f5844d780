"""Validated dataclass configs.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` whose message names
the field, the value and what is allowed, so a typo fails at construction rather than mid-run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from moekit.nn.activations import ACTIVATIONS, is_gated  # ACTIVATIONS: the allowed names, kept importable here
from moekit.validate import bad, check_choice, check_float, check_int

ROUTERS = ("softmax_topk", "switch", "noisy_topk", "sigmoid", "expert_choice", "soft", "top_p", "sparsemixer", "relu")
TOKEN_CHOICE_ROUTERS = ("softmax_topk", "switch", "noisy_topk", "sigmoid", "top_p", "sparsemixer", "relu")
NULL_EXPERT_OUTPUTS = ("zero", "identity")
DROP_POLICIES = ("position", "score")
SOFTMAX_ORDERS = ("before", "after")
GROUP_SCORES = ("max", "top2_sum")
LB_CONVENTIONS = ("standard", "hf_compat")
MOE, MODEL = "MoEConfig", "ModelConfig"  # the owners their errors name (moekit.validate)


def _check_known_fields(cls: type, data: dict[str, Any]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a mapping of fields, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} got unknown field(s) {unknown}; known fields: {sorted(known)}")


# ---- field types: checked at construction, parsed from text (``--set FIELD=VALUE``) -------------
@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_members(hint: Any) -> tuple:
    """``int | None`` -> (int, NoneType); a plain type -> (type,)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _item_type(kind: Any) -> Any:
    """``tuple[int, ...]`` -> int; None for any other type."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _matches(value: Any, kind: type) -> bool:
    if _item_type(kind) is not None:
        return isinstance(value, tuple) and all(_matches(v, _item_type(kind)) for v in value)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # an int is a float's value too (capacity_factor=2)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(hint: Any) -> str:
    names = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string", dict: "a mapping",
             type(None): "None"}
    def name(kind: Any) -> str:
        if _item_type(kind) is not None:  # a tuple field is written as a JSON array
            return f"a list of {names[_item_type(kind)].removeprefix('an ').removeprefix('a ')}s"
        return names.get(kind, kind.__name__)
    return " or ".join(name(k) for k in _type_members(hint))


def tuples_from_lists(obj: Any) -> None:
    """A list given for a ``tuple[...]`` field (JSON has no tuples) becomes a tuple, so a config read
    back from JSON equals the one written."""
    for name, hint in _field_hints(type(obj)).items():
        value = getattr(obj, name)
        if isinstance(value, list) and any(_item_type(k) is not None for k in _type_members(hint)):
            object.__setattr__(obj, name, tuple(value))


def check_field_types(obj: Any) -> None:
    """Every field of a config dataclass holds a value of its declared type, or ValueError names it.

    The class of bug this stops: ``mlp_bias="False"`` (a string, hence truthy) reaching a model."""
    owner = type(obj).__name__
    for name, hint in _field_hints(type(obj)).items():
        value = getattr(obj, name)
        if not any(_matches(value, kind) for kind in _type_members(hint)):
            raise bad(owner, name, value, f"expected {_type_name(hint)}")


_NONE_WORDS = ("none", "null")
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


def parse_field(cls: type, name: str, raw: str) -> Any:
    """The text ``raw`` as a value of field ``name`` of config class ``cls``, by its declared type.

    None / null (any case) for an optional field; true/false/yes/no/on/off/1/0 for a bool; an int;
    a number (``1e-3``, ``inf`` and ``nan`` too: the config's own validation judges them); a JSON
    object for a mapping or a nested config; a JSON array for a tuple field, returned as a list (as
    JSON reads it back from a saved run: the config makes it a tuple); anything else of a string
    field as it is (JSON quotes stripped). Text that fits none of the field's types raises
    ValueError naming the field."""
    hints = _field_hints(cls)
    if name not in hints:
        raise ValueError(f"{cls.__name__} has no field {name!r}; known fields: {sorted(hints)}")
    members = _type_members(hints[name])
    text = raw.strip()
    if text.lower() in _NONE_WORDS and type(None) in members:
        return None
    for kind in members:
        if kind is bool and text.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[text.lower()]
        if kind is int and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if kind is float:
            try:
                return float(text)
            except ValueError:
                pass
        if kind is dict or dataclasses.is_dataclass(kind):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                if dataclasses.is_dataclass(kind):  # its fields' names now; their values when it is built
                    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(kind)})
                    if unknown:
                        raise ValueError(f"{cls.__name__}.{name}: {kind.__name__} has no field(s) {unknown}; "
                                         f"known: {sorted(f.name for f in dataclasses.fields(kind))}")
                return value
        if _item_type(kind) is not None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, list) and _matches(tuple(value), kind):
                return value
    if str in members:
        if len(text) >= 2 and text[0] == text[-1] == '"':
            return json.loads(text)
        return raw
    raise ValueError(f"{cls.__name__}.{name}={raw!r} is invalid: expected {_type_name(hints[name])}"
                     + (" or a JSON object of its fields" if any(dataclasses.is_dataclass(k) for k in members) else ""))


@dataclass(frozen=True)
class MoEConfig:
    """Configuration of one sparse Mixture-of-Experts FFN layer (:class:`moekit.MoELayer`).

    Sizes
        d_model: token width D.  num_experts: routed experts E.  top_k: experts per token K
        (for ``expert_choice``: the mean number of experts per token, which sets the capacity).
        expert_hidden: hidden width F of each routed expert.

    Router (``router``)
        ``softmax_topk``  softmax scores, top-k (Shazeer 2017, GShard, Mixtral).
        ``switch``        top-1, weight = router probability, multiplicative jitter (Fedus et al. 2021).
        ``noisy_topk``    Shazeer et al. 2017 noisy top-k gating, learned noise scale (softplus).
        ``sigmoid``       DeepSeek-V3 sigmoid scores with a selection-only bias.
        ``expert_choice`` each expert picks its top-C tokens (Zhou et al. 2022).
        ``soft``          dense soft gating, every expert weighted by the softmax (Jacobs et al. 1991);
                          requires ``top_k == num_experts``.
        ``sparsemixer``   PhiMoE's SparseMixer at inference: K rounds of the best remaining logit, each weighted
                          by a softmax over the logits within 2·``sparsemixer_eps`` of it (relative); no
                          renormalisation (``normalize_weights=False``).
        ``top_p``         threshold routing (Huang et al. 2024): the most probable experts until their
                          probabilities sum to ``top_p_threshold``, at most ``top_k`` of them.
        ``relu``          ReMoE (Wang et al., ICLR 2025): gates ReLU(x·W_r), every expert with a positive gate;
                          an L1 penalty on the gates, its coefficient adapted toward the sparsity 1 - top_k/E
                          (``relu_l1_init``, ``relu_l1_growth``).
        normalize_weights: renormalise the chosen weights to sum to 1 (Mixtral, Qwen3-MoE, DeepSeek-V3)
            or not (OLMoE, Qwen2-MoE, DeepSeek-V2). normalize_p: the renormalisation divides by the
            p-norm of the chosen weights, ||w||_p = (Σ w_i^p)^(1/p); 1 (the sum) everywhere but DBRX,
            whose ``moe_normalize_expert_weights`` may be any p > 0.
        softmax_order: ``"before"`` the top-k selection (softmax over all E, then pick) or ``"after"``
            (softmax over the K chosen logits). NOTE: "after" equals "before" followed by
            renormalisation, so it requires ``normalize_weights=True``.
        routed_scaling_factor: multiplies the chosen weights (DeepSeek-V2 16, V3 2.5).
        router_jitter: Switch multiplicative jitter eps on the router input, training only.
        sparsemixer_eps: the mask threshold of ``sparsemixer`` (PhiMoE's router_jitter_noise, 0.01).
        n_group, topk_group: group-limited routing (DeepSeek-V2/V3): experts form ``n_group`` groups,
            only the best ``topk_group`` groups may be chosen. group_score: ``"max"`` (V2) or
            ``"top2_sum"`` (V3); defaults to top2_sum for ``sigmoid`` and max otherwise.

    Balancing (every coefficient 0 = off)
        aux_loss_coef: load-balancing loss E·Σ f_i P_i; lb_convention ``"standard"`` (f divided by K,
            perfect balance = 1) or ``"hf_compat"`` (transformers' Mixtral value, balance = K).
        z_loss_coef: ST-MoE router z-loss.  seq_aux_loss_coef: DeepSeek-V3 sequence-wise loss.
        bias_update_rate: gamma of the DeepSeek-V3 aux-loss-free bias update (token-choice routers).
        router_entropy_coef: the dynamic loss of Huang et al. 2024, mean_t of the entropy of the router
            distribution (it makes the router decisive, so ``top_p`` picks fewer experts).

    Capacity
        capacity_factor: None = dropless; a number gives each expert ceil(cf·T·K/E) slots in training.
        eval_capacity_factor: ``"same"`` (default), None (dropless in eval) or a number.
        drop_policy: which assignments win an overflowing expert: ``"position"`` (earlier tokens,
            Switch) or ``"score"`` (higher router probability, V-MoE batch-priority routing).

    Experts
        activation: ``swiglu`` (default), ``geglu``, ``gelu``, ``relu``.  mlp_bias: biases in experts.
        num_shared_experts, shared_expert_hidden: experts every token uses (DeepSeekMoE); their hidden
            width defaults to ``expert_hidden``. shared_expert_gate: scale them by sigmoid(x·w)
            (Qwen2-MoE).  dense_hidden: a dense FFN in parallel with the MoE (Arctic), 0 = none.
        num_null_experts: m zero-computation experts routed like the others (AdaMoE, Zeng et al. 2024;
            LongCat-Flash): the router scores E + m experts, the balance losses count all of them, and an
            assignment to one costs no FLOPs and no dispatch. null_expert: what one returns, ``"zero"``
            (AdaMoE) or ``"identity"`` (the token itself, weighted: LongCat-Flash).
        How the experts run (the expert backend) is a run-time choice, not part of the config:
        :mod:`moekit.moe.backends`. Saved configs that still carry ``expert_impl`` load (it is dropped).
    """

    d_model: int
    expert_hidden: int
    num_experts: int = 8
    top_k: int = 2
    router: str = "softmax_topk"
    normalize_weights: bool = True
    normalize_p: float = 1.0
    softmax_order: str = "before"
    routed_scaling_factor: float = 1.0
    router_jitter: float = 0.0
    sparsemixer_eps: float = 0.01
    n_group: int = 1
    topk_group: int = 1
    group_score: str | None = None
    aux_loss_coef: float = 0.0
    lb_convention: str = "standard"
    z_loss_coef: float = 0.0
    seq_aux_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None
    eval_capacity_factor: float | str | None = "same"
    drop_policy: str = "position"
    activation: str = "swiglu"
    mlp_bias: bool = False
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    shared_expert_gate: bool = False
    dense_hidden: int = 0
    init_std: float = 0.02
    top_p_threshold: float = 0.4
    router_entropy_coef: float = 0.0
    num_null_experts: int = 0
    null_expert: str = "zero"
    relu_l1_init: float = 1e-8
    relu_l1_growth: float = 1.2

    def __post_init__(self) -> None:
        check_field_types(self)
        check_int(MOE, "d_model", self.d_model, 1)
        check_int(MOE, "num_experts", self.num_experts, 1)
        check_int(MOE, "expert_hidden", self.expert_hidden, 1)
        check_choice(MOE, "router", self.router, ROUTERS)
        check_int(MOE, "top_k", self.top_k, 1)
        if self.top_k > self.num_experts:
            raise bad(MOE, "top_k", self.top_k, f"expected 1 <= top_k <= num_experts={self.num_experts}")
        if self.router == "switch" and self.top_k != 1:
            raise bad(MOE, "top_k", self.top_k, "router='switch' routes each token to exactly 1 expert")
        if self.router == "soft" and self.top_k != self.num_experts:
            raise bad(MOE, "top_k", self.top_k,
                      f"router='soft' weights every expert: top_k must equal num_experts={self.num_experts}")
        check_choice(MOE, "softmax_order", self.softmax_order, SOFTMAX_ORDERS)
        if self.softmax_order == "after" and self.router != "softmax_topk":
            raise bad(MOE, "softmax_order", self.softmax_order, "'after' applies to router='softmax_topk' only")
        if self.router == "noisy_topk" and not self.normalize_weights:
            raise bad(MOE, "normalize_weights", False, "noisy top-k takes a softmax over the chosen logits, which "
                      "always sums to 1 (Shazeer et al. 2017)")
        if self.router_jitter and self.router != "switch":
            raise bad(MOE, "router_jitter", self.router_jitter, "jitter applies to router='switch' only")
        if not self.normalize_p > 0:  # NaN fails too
            raise bad(MOE, "normalize_p", self.normalize_p, "expected a number > 0 (1 = divide by the sum)")
        if self.normalize_p != 1 and not (self.normalize_weights and self.softmax_order == "before"
                                          and self.router in ("softmax_topk", "sigmoid")):
            raise bad(MOE, "normalize_p", self.normalize_p, "a p-norm other than 1 applies only to renormalised "
                      "softmax top-k or sigmoid weights (normalize_weights=True, softmax_order='before')")
        if self.softmax_order == "after" and not self.normalize_weights:
            raise bad(MOE, "softmax_order", self.softmax_order,
                      "a softmax over the chosen logits always sums to 1; use normalize_weights=True "
                      "or softmax_order='before'")
        check_float(MOE, "routed_scaling_factor", self.routed_scaling_factor, above=True)
        check_float(MOE, "router_jitter", self.router_jitter)
        if self.router_jitter >= 1:
            raise bad(MOE, "router_jitter", self.router_jitter, "expected 0 <= router_jitter < 1")
        check_float(MOE, "sparsemixer_eps", self.sparsemixer_eps, note="the relative gap a sparsemixer mask allows")
        if self.router == "sparsemixer":
            for name, off in (("normalize_weights", False), ("n_group", 1), ("bias_update_rate", 0.0)):
                if getattr(self, name) != off:
                    raise bad(MOE, name, getattr(self, name), f"router='sparsemixer' weights and selects by its masked "
                              f"softmax alone; {name} must be {off!r} with it")
        check_int(MOE, "n_group", self.n_group, 1)
        if self.num_experts % self.n_group:
            raise bad(MOE, "n_group", self.n_group, f"must divide num_experts={self.num_experts}")
        check_int(MOE, "topk_group", self.topk_group, 1)
        if self.topk_group > self.n_group:
            raise bad(MOE, "topk_group", self.topk_group, f"expected 1 <= topk_group <= n_group={self.n_group}")
        if self.n_group > 1:
            if self.router not in TOKEN_CHOICE_ROUTERS:
                raise bad(MOE, "n_group", self.n_group, f"group-limited routing needs a token-choice router "
                          f"({', '.join(TOKEN_CHOICE_ROUTERS)}), not router={self.router!r}")
            if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
                raise bad(MOE, "topk_group", self.topk_group,
                          f"the kept groups hold {self.topk_group * (self.num_experts // self.n_group)} "
                          f"experts, fewer than top_k={self.top_k}")
        if self.group_score is None:
            object.__setattr__(self, "group_score", "top2_sum" if self.router == "sigmoid" else "max")
        check_choice(MOE, "group_score", self.group_score, GROUP_SCORES)
        if self.group_score == "top2_sum" and self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise bad(MOE, "group_score", self.group_score, "top2_sum needs at least 2 experts per group")
        for name in ("aux_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate"):
            check_float(MOE, name, getattr(self, name))
        check_choice(MOE, "lb_convention", self.lb_convention, LB_CONVENTIONS)
        if self.router == "expert_choice":
            for name in ("aux_loss_coef", "seq_aux_loss_coef"):
                if getattr(self, name) > 0:
                    raise bad(MOE, name, getattr(self, name),
                              "router='expert_choice' is balanced by construction; the balance loss must be 0")
        if self.bias_update_rate > 0 and self.router not in TOKEN_CHOICE_ROUTERS:
            raise bad(MOE, "bias_update_rate", self.bias_update_rate,
                      f"the selection bias needs a token-choice router ({', '.join(TOKEN_CHOICE_ROUTERS)})")
        if self.capacity_factor is not None:
            check_float(MOE, "capacity_factor", self.capacity_factor, above=True)
        elif self.router == "expert_choice":
            raise bad(MOE, "capacity_factor", None, "router='expert_choice' needs a capacity: a number > 0")
        ecf = self.eval_capacity_factor
        if ecf is None:
            if self.router == "expert_choice":
                raise bad(MOE, "eval_capacity_factor", None, "router='expert_choice' needs a capacity in eval too")
        elif ecf != "same":
            if isinstance(ecf, str):
                raise bad(MOE, "eval_capacity_factor", ecf, "expected 'same', None (dropless) or a number > 0")
            check_float(MOE, "eval_capacity_factor", ecf, above=True)
        check_choice(MOE, "drop_policy", self.drop_policy, DROP_POLICIES)
        check_choice(MOE, "activation", self.activation, ACTIVATIONS)
        check_int(MOE, "num_shared_experts", self.num_shared_experts, 0)
        if self.shared_expert_hidden is not None:
            check_int(MOE, "shared_expert_hidden", self.shared_expert_hidden, 1)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise bad(MOE, "shared_expert_gate", True, "a shared-expert gate needs num_shared_experts >= 1")
        check_int(MOE, "dense_hidden", self.dense_hidden, 0)
        check_float(MOE, "init_std", self.init_std, above=True)
        self._check_routing_options()

    def _check_routing_options(self) -> None:
        """The fields of threshold routing, the entropy loss and the null experts."""
        check_float(MOE, "top_p_threshold", self.top_p_threshold, 0, 1, above=True,
                    note="the probability mass a token's experts must reach")
        check_float(MOE, "router_entropy_coef", self.router_entropy_coef, note="0 = off")
        check_int(MOE, "num_null_experts", self.num_null_experts, 0)
        check_choice(MOE, "null_expert", self.null_expert, NULL_EXPERT_OUTPUTS)
        check_float(MOE, "relu_l1_init", self.relu_l1_init, above=True, note="ReMoE's first L1 coefficient")
        check_float(MOE, "relu_l1_growth", self.relu_l1_growth, 1, above=True,
                    note="the L1 coefficient's factor per step, ReMoE's alpha")
        if self.router == "relu":
            for name, off in (("n_group", 1), ("bias_update_rate", 0.0), ("seq_aux_loss_coef", 0.0),
                              ("num_null_experts", 0)):
                if getattr(self, name) != off:
                    raise bad(MOE, name, getattr(self, name), f"router='relu' gates every expert by ReLU(x·W_r); "
                              f"{name} must be {off!r} with it")
        if self.router == "top_p":
            for name, off in (("n_group", 1), ("bias_update_rate", 0.0), ("seq_aux_loss_coef", 0.0)):
                if getattr(self, name) != off:
                    raise bad(MOE, name, getattr(self, name), f"router='top_p' selects by cumulative probability; "
                              f"{name} must be {off!r} with it")
        if self.num_null_experts:
            if self.router not in ("softmax_topk", "sigmoid", "top_p"):
                raise bad(MOE, "num_null_experts", self.num_null_experts,
                          f"null experts need router 'softmax_topk', 'sigmoid' or 'top_p', not {self.router!r}")
            if self.n_group > 1:
                raise bad(MOE, "num_null_experts", self.num_null_experts,
                          "null experts belong to no expert group: use n_group=1 with them")

    # ---- derived -----------------------------------------------------------------------------
    @property
    def is_token_choice(self) -> bool:
        return self.router in TOKEN_CHOICE_ROUTERS

    @property
    def num_routed(self) -> int:
        """Experts the router scores: the E computed ones, then the null ones (ids E .. E+m-1)."""
        return self.num_experts + self.num_null_experts

    @property
    def gated(self) -> bool:
        return is_gated(self.activation)

    @property
    def shared_hidden(self) -> int:
        """Total hidden width of the shared experts (they run as one MLP)."""
        return self.num_shared_experts * (self.shared_expert_hidden or self.expert_hidden)

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Slots per expert: ceil(cf · T · K / (E + m)), at most T; None when dropless. With m null
        experts a balanced router gives each of the E + m experts T·K/(E + m) assignments."""
        cf = self.capacity_factor
        if not training and self.eval_capacity_factor != "same":
            cf = self.eval_capacity_factor
        if cf is None:
            return None
        # exact rational arithmetic: float error would make ceil(1.1 · 100 / 11) = 11
        slots = math.ceil(Fraction(str(cf)) * num_tokens * self.top_k / self.num_routed)
        return min(num_tokens, max(1, slots))

    def fine_grained(self, m: int) -> "MoEConfig":
        """DeepSeekMoE fine-grained segmentation: m× the experts at 1/m the hidden size, m× top-k.

        Keeps total and active parameters (and FLOPs) of the routed experts unchanged.
        """
        check_int(MOE, "fine_grained(m)", m, 1)
        if self.expert_hidden % m:
            raise bad(MOE, "expert_hidden", self.expert_hidden, f"must be divisible by the segmentation m={m}")
        return self.replace(num_experts=self.num_experts * m, top_k=self.top_k * m,
                            expert_hidden=self.expert_hidden // m)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        data = _without_expert_impl(data)
        _check_known_fields(cls, data)
        return cls(**data)


def _without_expert_impl(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without ``expert_impl``, which configs saved before the expert backend became a run-time
    choice carry: a value other than ``auto`` is named in a warning saying how to ask for it now."""
    if "expert_impl" not in data:
        return data
    data = dict(data)
    impl = data.pop("expert_impl")
    if impl != "auto":
        warnings.warn(f"MoEConfig.expert_impl={impl!r} in a saved config is ignored: the expert backend is chosen "
                      f"at run time (moekit.moe.backends.use(model, {impl!r}) or MOEKIT_EXPERT_BACKEND={impl})",
                      UserWarning, stacklevel=3)
    return data


ATTENTIONS = ("gqa", "mla")
NORMS = ("rmsnorm", "layernorm")
QK_NORMS = (None, "head", "full")


def moe_layer_indices(n_layers: int, *, start: int = 0, stop: int | None = None, every: int = 1,
                      dense: Iterable[int] = ()) -> tuple[int, ...]:
    """The MoE layers of a layout rule, for ``ModelConfig.moe_layers``: layer i is MoE when
    ``start <= i < stop`` (None: n_layers), ``(i + 1) % every == 0`` and i is not in ``dense``.

    The open checkpoints' rules in these terms:
        DeepSeek ``first_k_dense_replace=k``                          start=k
        Llama 4 ``interleave_moe_layer_step=n``, GLaM, Switch (n=2)   every=n
        Qwen2/3-MoE ``decoder_sparse_step=n``, ``mlp_only_layers=L``  every=n, dense=L
        ERNIE 4.5 ``moe_layer_start_index=s``, ``moe_layer_end_index=e`` (inclusive),
        ``moe_layer_interval=n``                                      start=s, stop=e + 1 (None for
                                                                      e = -1, the last layer), every=n
    """
    for name, value, minimum in (("n_layers", n_layers, 1), ("start", start, 0), ("every", every, 1)):
        check_int("moe_layer_indices", name, value, minimum)
    if stop is not None:
        check_int("moe_layer_indices", "stop", stop, 0)
    dense = set(dense)
    return tuple(i for i in range(start, n_layers if stop is None else min(stop, n_layers))
                 if (i + 1) % every == 0 and i not in dense)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only language model whose FFNs are MoE or dense layer by layer.

    Attention: ``gqa`` (multi-head / grouped-query, ``n_kv_heads`` dividing ``n_heads``) or ``mla``
    (DeepSeek-V2 Multi-head Latent Attention: queries through a ``q_lora_rank`` bottleneck (0 = none),
    keys and values from a shared ``kv_lora_rank`` latent, ``qk_rope_head_dim`` decoupled rotary dims
    carried by one shared key head).
    FFNs: with ``moe`` set, the layers listed in ``moe_layers`` are MoE, any layout (a JSON list in
    a saved config; :func:`moe_layer_indices` builds it from ranges and strides); with
    ``moe_layers=None`` (the default) layer i is MoE when i >= ``first_k_dense`` and
    (i + 1) % ``moe_every`` == 0 (GLaM and Switch: every other layer; DeepSeek: the first k layers
    dense). Every other layer is a dense FFN of width ``ffn_hidden``. With ``moe=None`` the model is
    a plain dense transformer.
    ``parallel_residual_mlp`` (Arctic): the MoE reads the layer input in parallel with attention and
    a dense residual MLP of width ``ffn_hidden`` reads the post-attention stream; the two are summed.
    ``clip_qkv`` (DBRX): q, k and v projections clamped to [-c, c].
    ``sandwich_norm`` (Grok-1): a norm after attention and after the FFN as well as before.
    ``embedding_multiplier``, ``logit_multiplier`` and ``attn_logit_softcap`` (Grok-1: √d, 1/√3·…,
    30) scale the embeddings, the output logits and cap attention logits with c·tanh(x/c).
    µP (Granite): ``residual_multiplier`` scales each block's attention and FFN output before it joins
    the residual stream; ``attention_multiplier`` is the attention scores' scale (None: 1/√head_dim).
    ``attn_out_bias``: a bias on the attention output projection (Granite, PhiMoE with attention_bias).
    ``norm_bias`` (PhiMoE): LayerNorms with a bias.  ``lm_head_bias`` (PhiMoE): a bias on the untied output head.
    ``qk_norm_after_rope`` (Hunyuan): the per-head q/k RMSNorm (``qk_norm='head'``) applied to the rotated
    q and k instead of before the rotary embedding.
    ``partial_rotary_factor`` (GLM-4.5): only the first int(head_dim · factor) dims of each q and k head
    rotate (:attr:`rope_dims`); 1.0 = all.
    ``rope_scaling``: None, ``{"type": "linear", "factor": s}`` (position interpolation) or
    ``{"type": "yarn", "factor": s, "original_max_seq_len": L, ...}`` (YaRN; optional beta_fast,
    beta_slow, mscale, mscale_all_dim, attention_factor, truncate as in transformers' rope_parameters).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 2048
    attention: str = "gqa"
    qkv_bias: bool = False
    attn_out_bias: bool = False
    qk_norm: str | None = None
    qk_norm_after_rope: bool = False
    clip_qkv: float = 0.0
    # MLA
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # position and norm
    rope_theta: float = 10000.0
    rope_interleave: bool = False
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    # FFN
    ffn_hidden: int = 0
    activation: str = "swiglu"
    moe: MoEConfig | None = None
    moe_every: int = 1
    first_k_dense: int = 0
    moe_layers: tuple[int, ...] | None = None
    parallel_residual_mlp: bool = False
    sandwich_norm: bool = False
    # embeddings and output
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    embedding_multiplier: float = 1.0
    logit_multiplier: float = 1.0
    attn_logit_softcap: float = 0.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    init_std: float = 0.02

    def __post_init__(self) -> None:
        tuples_from_lists(self)
        check_field_types(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check_int(MODEL, name, getattr(self, name), 1)
        check_choice(MODEL, "attention", self.attention, ATTENTIONS)
        check_choice(MODEL, "norm", self.norm, NORMS)
        check_choice(MODEL, "qk_norm", self.qk_norm, QK_NORMS)
        check_choice(MODEL, "activation", self.activation, ACTIVATIONS)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        check_int(MODEL, "n_kv_heads", self.n_kv_heads, 1)
        if self.n_heads % self.n_kv_heads:
            raise bad(MODEL, "n_kv_heads", self.n_kv_heads, f"must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.attention == "gqa" and self.d_model % self.n_heads:
                raise bad(MODEL, "n_heads", self.n_heads, f"must divide d_model={self.d_model} (or set head_dim)")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        check_int(MODEL, "head_dim", self.head_dim, 1)
        if self.attention == "gqa" and self.head_dim % 2:
            raise bad(MODEL, "head_dim", self.head_dim, "rotary embeddings need an even head_dim")
        if self.attention == "mla":
            if self.q_lora_rank < 0:
                raise bad(MODEL, "q_lora_rank", self.q_lora_rank, "expected an int >= 0 (0 = no query compression)")
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                check_int(MODEL, name, getattr(self, name), 1)
            if self.qk_rope_head_dim % 2:
                raise bad(MODEL, "qk_rope_head_dim", self.qk_rope_head_dim, "rotary dims must be even")
            if self.qk_norm is not None:
                raise bad(MODEL, "qk_norm", self.qk_norm, "q/k norms are not defined for attention='mla'")
        if self.qk_norm_after_rope and self.qk_norm != "head":
            raise bad(MODEL, "qk_norm_after_rope", True, f"it moves the per-head q/k norm after the rotary embedding: "
                      f"needs qk_norm='head' (here {self.qk_norm!r})")
        check_float(MODEL, "rope_theta", self.rope_theta, above=True)
        self._check_rope_scaling()
        self._check_partial_rotary()
        check_float(MODEL, "norm_eps", self.norm_eps, above=True)
        check_int(MODEL, "moe_every", self.moe_every, 1)
        check_int(MODEL, "first_k_dense", self.first_k_dense, 0)
        if self.first_k_dense > self.n_layers:
            raise bad(MODEL, "first_k_dense", self.first_k_dense, f"expected <= n_layers={self.n_layers}")
        self._check_moe_layers()
        if self.moe is not None:
            if self.moe.d_model != self.d_model:
                raise bad(MODEL, "moe", f"MoEConfig(d_model={self.moe.d_model})",
                          f"its d_model must equal {self.d_model}")
            if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
                raise bad(MODEL, "first_k_dense", self.first_k_dense, f"with moe_every={self.moe_every} and "
                          f"n_layers={self.n_layers} no layer is left for the MoE")
        needs_dense = self.moe is None or self.parallel_residual_mlp or any(
            not self.is_moe_layer(i) for i in range(self.n_layers))
        if needs_dense:
            check_int(MODEL, "ffn_hidden", self.ffn_hidden, 1)
        if self.parallel_residual_mlp and self.moe is None:
            raise bad(MODEL, "parallel_residual_mlp", True, "needs a moe config")
        for name in ("embedding_multiplier", "logit_multiplier", "residual_multiplier", "init_std"):
            check_float(MODEL, name, getattr(self, name), above=True)
        if self.attention_multiplier is not None:
            check_float(MODEL, "attention_multiplier", self.attention_multiplier, above=True,
                        note="None = 1/sqrt(head_dim)")
            if self.attention == "mla":
                raise bad(MODEL, "attention_multiplier", self.attention_multiplier,
                          "an explicit attention scale is defined for attention='gqa' only (None with 'mla')")
        if self.norm_bias and (self.norm != "layernorm" or self.attention == "mla"):
            raise bad(MODEL, "norm_bias", True, f"norm biases are defined for norm='layernorm' with attention='gqa' "
                      f"(here norm={self.norm!r}, attention={self.attention!r})")
        if self.lm_head_bias and self.tie_embeddings:
            raise bad(MODEL, "lm_head_bias", True, "a tied head is the embedding matrix, with no bias "
                      "(use tie_embeddings=False)")
        if self.attn_out_bias and self.attention == "mla":
            raise bad(MODEL, "attn_out_bias", True, "an output-projection bias is defined for attention='gqa' only")
        check_float(MODEL, "clip_qkv", self.clip_qkv, note="0 = off")
        if self.clip_qkv and self.attention == "mla":
            raise bad(MODEL, "clip_qkv", self.clip_qkv, "clipping q/k/v is defined for attention='gqa' only")
        cap = self.attn_logit_softcap
        # NOTE: a cap that rounds to 0 in fp32 would turn c·tanh(x/c) into 0·nan
        if not (math.isfinite(cap) and (cap == 0 or cap >= 1.2e-38)):
            raise bad(MODEL, "attn_logit_softcap", cap, "expected 0 (off) or a finite number >= 1.2e-38 (fp32's "
                      "smallest normal number)")

    def _check_moe_layers(self) -> None:
        layers = self.moe_layers
        if layers is None:
            return
        if self.moe is None:
            raise bad(MODEL, "moe_layers", layers, "a dense model (moe=None) has no MoE layers; expected None")
        if not layers:
            raise bad(MODEL, "moe_layers", layers, "expected at least one MoE layer (moe=None makes every FFN dense)")
        outside = [i for i in layers if not 0 <= i < self.n_layers]
        if outside:
            raise bad(MODEL, "moe_layers", layers, f"layer indices lie in 0 .. n_layers - 1 = {self.n_layers - 1}; "
                      f"{outside} do not")
        twice = sorted({i for i in layers if layers.count(i) > 1})
        if twice:
            raise bad(MODEL, "moe_layers", layers, f"lists layer(s) {twice} more than once")
        if self.first_k_dense != 0 or self.moe_every != 1:
            raise bad(MODEL, "moe_layers", layers, f"it lists the MoE layers itself, so first_k_dense="
                      f"{self.first_k_dense} and moe_every={self.moe_every} must keep their defaults 0 and 1")
        object.__setattr__(self, "moe_layers", tuple(sorted(layers)))  # a set of layers: one spelling

    def _check_partial_rotary(self) -> None:
        f = self.partial_rotary_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise bad(MODEL, "partial_rotary_factor", f, "expected a number in (0, 1] (1 = every head dim rotates)")
        if f == 1:
            return
        if self.attention == "mla":
            raise bad(MODEL, "partial_rotary_factor", f, "attention='mla' sets its rotary dims with qk_rope_head_dim; "
                      "expected 1.0")
        if self.rope_dims < 2 or self.rope_dims % 2:
            raise bad(MODEL, "partial_rotary_factor", f, f"int(head_dim={self.head_dim} x factor) = {self.rope_dims} "
                      "rotary dims; expected an even number >= 2")

    def _check_rope_scaling(self) -> None:
        from moekit.nn.rope import SCALING_KEYS

        rs = self.rope_scaling
        if rs is None:
            return
        if rs.get("type") not in SCALING_KEYS:
            raise bad(MODEL, "rope_scaling", rs, f"expected None or a dict with type in {sorted(SCALING_KEYS)}")
        allowed = SCALING_KEYS[rs["type"]]
        unknown = sorted(set(rs) - set(allowed) - {"type"})
        if unknown:
            raise bad(MODEL, "rope_scaling", rs, f"unknown keys {unknown}; {rs['type']} takes {sorted(allowed)}")
        missing = [k for k in ("factor", "original_max_seq_len") if k in allowed and k not in rs]
        if missing:
            raise bad(MODEL, "rope_scaling", rs, f"{rs['type']} needs {missing}")
        for key in ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                    "attention_factor"):
            v = rs.get(key)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise bad(MODEL, "rope_scaling", rs, f"{key} must be a number > 0")

    # ---- derived -----------------------------------------------------------------------------
    def is_moe_layer(self, i: int) -> bool:
        if self.moe is None:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        return i >= self.first_k_dense and (i + 1) % self.moe_every == 0

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """The indices of the MoE layers, whichever fields say so."""
        return tuple(i for i in range(self.n_layers) if self.is_moe_layer(i))

    @property
    def rope_dims(self) -> int:
        """The rotary dims of a head: MLA's qk_rope_head_dim, else the first int(head_dim ·
        partial_rotary_factor) dims of each q and k head (the rest pass through unrotated)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON holds them: the nested MoEConfig a dict, tuples lists."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        _check_known_fields(cls, data)
        data = dict(data)
        if isinstance(data.get("moe"), dict):
            data["moe"] = MoEConfig.from_dict(data["moe"])
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named preset (:data:`PRESETS`), optionally with fields overridden."""
        cfg = get_preset(name)
        return cfg.replace(**overrides) if overrides else cfg



def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["moe.top_k=4", "n_layers=6", "moe.mlp_bias=false"]`` -> ``{"moe": {"top_k": 4, "mlp_bias": False},
    "n_layers": 6}``: each value parsed to its field's declared type (:func:`parse_field`); an unknown
    field or a value its type cannot take raises ValueError naming the ``--set`` item."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE (e.g. moe.top_k=4)")
        *parents, leaf = key.split(".")
        if parents not in ([], ["moe"]):
            raise ValueError(f"--set {item!r}: only model fields and moe.<field> can be set")
        cls = MoEConfig if parents else ModelConfig
        try:
            value = parse_field(cls, leaf, raw)
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from None
        if parents:
            moe = out.setdefault("moe", {})
            if not isinstance(moe, dict):
                raise ValueError(f"--set {item!r}: moe is set to {moe!r} by an earlier --set")
            moe[leaf] = value
        elif leaf == "moe" and value is None and out.get("moe"):
            raise ValueError(f"--set {item!r}: an earlier --set gives moe fields {sorted(out['moe'])}")
        elif leaf == "moe" and isinstance(out.get("moe"), dict) and isinstance(value, dict):
            out["moe"].update(value)
        else:
            out[leaf] = value
    return out


def apply_overrides(base: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    """``base`` with ModelConfig fields replaced. ``{"moe": {...}}`` replaces fields of the base's
    MoEConfig (or builds one from them when the base is dense); ``{"moe": None}`` makes every FFN dense
    (and drops the base's ``moe_layers``)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"--set: unknown model field(s) {unknown}; known: {sorted(ModelConfig.__dataclass_fields__)}")
    if "moe" in overrides:
        moe = overrides["moe"]
        if isinstance(moe, dict):
            unknown = sorted(set(moe) - set(MoEConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"--set: unknown MoE field(s) {unknown}; known: "
                                 f"{sorted(MoEConfig.__dataclass_fields__)}")
            if base.moe is not None:
                moe = base.moe.replace(**moe)
            else:
                moe = MoEConfig.from_dict({"d_model": overrides.get("d_model", base.d_model), **moe})
        elif moe is not None and not isinstance(moe, MoEConfig):
            raise bad(MODEL, "moe", moe, "expected None (every FFN dense), a MoEConfig or a mapping of its fields")
        overrides["moe"] = moe
        if moe is None:
            overrides.setdefault("moe_layers", None)
    return base.replace(**overrides)


# ---- named presets (moekit.presets adds their published counts and miniature()) -------------------
@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    source: str
    published_total: str | None = None  # as published, e.g. "46.7B", "1.2T"
    published_active: str | None = None
    note: str = ""


def _moe(d: int, hidden: int, E: int, K: int, **kw) -> MoEConfig:
    return MoEConfig(d_model=d, expert_hidden=hidden, num_experts=E, top_k=K, **kw)


def _presets() -> dict[str, Preset]:
    p: dict[str, Preset] = {}

    # ---- small presets for a CPU (byte-level vocabulary) ----------------------------------------
    tiny_moe = _moe(64, 64, 8, 2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    tiny = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=256, moe=tiny_moe,
                       ffn_hidden=128, tie_embeddings=True)
    p["tiny"] = Preset(tiny, "moekit: trains in seconds, for tests")
    p["tiny-dense"] = Preset(tiny.replace(moe=None), "moekit: tiny's dense twin (FFN width = top_k x expert width)")
    small_moe = _moe(256, 512, 8, 2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    small = ModelConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_seq_len=1024, moe=small_moe,
                        ffn_hidden=1024, tie_embeddings=True)
    p["small"] = Preset(small, "moekit: a few minutes a run on 2 CPU cores")
    p["small-dense"] = Preset(small.replace(moe=None), "moekit: small's dense twin (same active parameters)")

    # ---- the demo pair (moekit demo): same active parameters, tokens and schedule ---------------
    demo_dense = ModelConfig(vocab_size=256, d_model=256, n_layers=4, n_heads=4, max_seq_len=1024, ffn_hidden=1024,
                             tie_embeddings=True)
    p["demo-dense"] = Preset(demo_dense, "moekit demo: dense baseline, SwiGLU FFN 1024")
    # 32 experts of a quarter of the dense width, top-4 (Krajewski et al. 2024's granularity 4): the
    # aux-loss-free bias (DeepSeek-V3) with a light load-balancing loss keeps every expert in use once
    # the router settles (docs/demo.md measures the alternatives)
    p["demo-moe"] = Preset(demo_dense.replace(moe=_moe(
        256, 256, 32, 4, aux_loss_coef=0.003, z_loss_coef=1e-3, bias_update_rate=0.002)),
        "moekit demo: 32 experts of 256, top-4, renormalised; aux-loss-free bias + light balancing loss; "
        "active FFN 1024")

    # ---- the published systems -----------------------------------------------------------------
    switch = ModelConfig(
        vocab_size=32128, d_model=768, n_layers=12, n_heads=12, max_seq_len=512, ffn_hidden=3072,
        activation="relu", tie_embeddings=True, moe_every=2,
        moe=_moe(768, 3072, 8, 1, router="switch", activation="relu", capacity_factor=1.25,
                 eval_capacity_factor=2.0, router_jitter=0.01, aux_loss_coef=0.01, z_loss_coef=1e-3))
    p["switch"] = Preset(switch, "Fedus et al. 2021, Switch-Base-8 routing in a 12-layer decoder-only analogue "
                         "(MoE every other FFN, top-1, capacity 1.25, aux 0.01, z-loss 0.001)")

    glam = ModelConfig(
        vocab_size=256000, d_model=8192, n_layers=64, n_heads=128, head_dim=128, max_seq_len=1024,
        ffn_hidden=32768, activation="geglu", tie_embeddings=True, moe_every=2,
        moe=_moe(8192, 32768, 64, 2, activation="gelu", aux_loss_coef=0.01))
    p["glam"] = Preset(glam, "Du et al. 2022, GLaM 64B/64E (Table 4)", "1.2T", "96.6B",
                       "published 1.2T is rounded (count: 1.16T)")

    mixtral = ModelConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=32768,
        rope_theta=1e6, norm_eps=1e-5, moe=_moe(4096, 14336, 8, 2, aux_loss_coef=0.02))
    p["mixtral-8x7b"] = Preset(mixtral, "Mistral AI, Mixtral-8x7B config.json; Jiang et al. 2024", "46.7B", "12.9B")
    p["mixtral-8x22b"] = Preset(
        mixtral.replace(vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, max_seq_len=65536,
                        moe=_moe(6144, 16384, 8, 2, aux_loss_coef=0.001)),
        "Mistral AI, Mixtral-8x22B-v0.1 config.json", "141B", "39B")

    p["dbrx"] = Preset(ModelConfig(
        vocab_size=100352, d_model=6144, n_layers=40, n_heads=48, n_kv_heads=8, max_seq_len=32768,
        rope_theta=5e5, norm="layernorm", norm_eps=1e-5, clip_qkv=8.0,
        moe=_moe(6144, 10752, 16, 4, aux_loss_coef=0.05)),
        "Databricks, dbrx-base config.json (softmax then L1 renormalisation; clip_qkv 8)", "132B", "36B")

    p["grok-1"] = Preset(ModelConfig(
        vocab_size=131072, d_model=6144, n_layers=64, n_heads=48, n_kv_heads=8, max_seq_len=8192,
        sandwich_norm=True, tie_embeddings=True, embedding_multiplier=math.sqrt(6144),
        logit_multiplier=0.5773502691896257, attn_logit_softcap=30.0,
        moe=_moe(6144, 32768, 8, 2, activation="geglu", normalize_weights=False)),
        "xAI, grok-1 release (model.py): gated GELU experts, softmax over all 8 without renormalisation",
        "314B", None, "xAI publishes 314B total only (\"25% of weights active\")")

    p["arctic"] = Preset(ModelConfig(
        vocab_size=32000, d_model=7168, n_layers=35, n_heads=56, n_kv_heads=8, max_seq_len=4096,
        ffn_hidden=7168, parallel_residual_mlp=True, norm_eps=1e-5,
        moe=_moe(7168, 4864, 128, 2, aux_loss_coef=0.01)),
        "Snowflake, snowflake-arctic-base config.json (dense-MoE hybrid: 10B dense + 128x3.66B MoE)", "480B", "17B")

    p["deepseek-moe-16b"] = Preset(ModelConfig(
        vocab_size=102400, d_model=2048, n_layers=28, n_heads=16, max_seq_len=4096, ffn_hidden=10944,
        first_k_dense=1,
        moe=_moe(2048, 1408, 64, 6, normalize_weights=False, num_shared_experts=2, seq_aux_loss_coef=0.001)),
        "Dai et al. 2024, DeepSeekMoE 16B config.json", "16.4B", "2.8B")

    mla = dict(attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, rope_interleave=True)
    p["deepseek-v2"] = Preset(ModelConfig(
        vocab_size=102400, d_model=5120, n_layers=60, n_heads=128, max_seq_len=163840, ffn_hidden=12288,
        first_k_dense=1, **mla,
        moe=_moe(5120, 1536, 160, 6, normalize_weights=False, n_group=8, topk_group=3, routed_scaling_factor=16.0,
                 num_shared_experts=2, seq_aux_loss_coef=0.003)),
        "DeepSeek-AI 2024, DeepSeek-V2 config.json", "236B", "21B")

    p["deepseek-v3"] = Preset(ModelConfig(
        vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, max_seq_len=163840, ffn_hidden=18432,
        first_k_dense=3, **mla,
        moe=_moe(7168, 2048, 256, 8, router="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5,
                 num_shared_experts=1, bias_update_rate=1e-3, seq_aux_loss_coef=1e-4)),
        "DeepSeek-AI 2024, DeepSeek-V3 config.json (main model, without the MTP module)", "671B", "37B")

    qwen = dict(qkv_bias=True, rope_theta=1e6)
    p["qwen1.5-moe-a2.7b"] = Preset(ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, max_seq_len=8192, **qwen,
        moe=_moe(2048, 1408, 60, 4, normalize_weights=False, num_shared_experts=1, shared_expert_hidden=5632,
                 shared_expert_gate=True, aux_loss_coef=0.001)),
        "Qwen, Qwen1.5-MoE-A2.7B config.json", "14.3B", "2.7B")
    p["qwen2-57b-a14b"] = Preset(ModelConfig(
        vocab_size=151936, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, max_seq_len=32768, **qwen,
        moe=_moe(3584, 2560, 64, 8, normalize_weights=False, num_shared_experts=1, shared_expert_hidden=20480,
                 shared_expert_gate=True, aux_loss_coef=0.001)),
        "Qwen, Qwen2-57B-A14B config.json", "57B", "14B")
    p["qwen3-30b-a3b"] = Preset(ModelConfig(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, max_seq_len=40960,
        rope_theta=1e6, qk_norm="head", moe=_moe(2048, 768, 128, 8, aux_loss_coef=0.001)),
        "Qwen, Qwen3-30B-A3B config.json", "30.5B", "3.3B")
    p["olmoe-1b-7b"] = Preset(ModelConfig(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, max_seq_len=4096, qk_norm="full", norm_eps=1e-5,
        moe=_moe(2048, 1024, 64, 8, normalize_weights=False, aux_loss_coef=0.01, z_loss_coef=1e-3)),
        "Muennighoff et al. 2024, OLMoE-1B-7B-0924 config.json", "6.9B", "1.3B")

    # Granite 3.0 MoE: µP multipliers, softmax over the top-8 logits, tied embeddings
    granite = dict(vocab_size=49155, n_kv_heads=8, max_seq_len=4096, tie_embeddings=True, embedding_multiplier=12.0,
                   logit_multiplier=1 / 6.0, residual_multiplier=0.22, attention_multiplier=0.015625)
    granite_note = "the name's active figure leaves out the embedding ({})"
    p["granite-3.0-3b-a800m"] = Preset(ModelConfig(
        d_model=1536, n_layers=32, n_heads=24, **granite, moe=_moe(1536, 512, 40, 8, softmax_order="after")),
        "IBM, granite-3.0-3b-a800m-base config.json", "3.3B", None, granite_note.format("807M without, 883M with"))
    p["granite-3.0-1b-a400m"] = Preset(ModelConfig(
        d_model=1024, n_layers=24, n_heads=16, **granite, moe=_moe(1024, 512, 32, 8, softmax_order="after")),
        "IBM, granite-3.0-1b-a400m-base config.json", "1.3B", None, granite_note.format("378M without, 429M with"))

    p["phi-3.5-moe"] = Preset(ModelConfig(
        vocab_size=32064, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=131072, norm="layernorm",
        norm_bias=True, norm_eps=1e-5, qkv_bias=True, attn_out_bias=True, lm_head_bias=True,
        moe=_moe(4096, 6400, 16, 2, router="sparsemixer", normalize_weights=False, sparsemixer_eps=0.01)),
        "Microsoft, Phi-3.5-MoE-instruct config.json", "41.9B", "6.6B",
        "its longrope rope scaling (beyond 4096 positions) is not implemented: plain rope here")

    # GLM-4.5: DeepSeek-V3 routing (sigmoid, correction bias, renormalised), half-rotary GQA with qkv bias
    glm = dict(vocab_size=151552, n_heads=96, n_kv_heads=8, head_dim=128, max_seq_len=131072, rope_theta=1e6,
               partial_rotary_factor=0.5, norm_eps=1e-5, qkv_bias=True)
    glm_note = "the published active figure leaves out the embedding and head ({}); 1 MTP layer not counted"
    p["glm-4.5"] = Preset(ModelConfig(
        d_model=5120, n_layers=92, ffn_hidden=12288, first_k_dense=3, qk_norm="head", **glm,
        moe=_moe(5120, 1536, 160, 8, router="sigmoid", num_shared_experts=1, routed_scaling_factor=2.5)),
        "Z.ai, GLM-4.5 config.json", "355B", None, glm_note.format("32.1B without, 33.6B with"))
    p["glm-4.5-air"] = Preset(ModelConfig(
        d_model=4096, n_layers=46, ffn_hidden=10944, first_k_dense=1, **glm,
        moe=_moe(4096, 1408, 128, 8, router="sigmoid", num_shared_experts=1)),
        "Z.ai, GLM-4.5-Air config.json", "106B", None, glm_note.format("12.2B without, 13.4B with"))

    p["dots-llm1"] = Preset(ModelConfig(
        vocab_size=152064, d_model=4096, n_layers=62, n_heads=32, max_seq_len=32768, rope_theta=1e7, norm_eps=1e-5,
        qk_norm="head", ffn_hidden=10944, first_k_dense=1,
        moe=_moe(4096, 1408, 128, 6, router="sigmoid", num_shared_experts=2, routed_scaling_factor=2.5)),
        "rednote-hilab, dots.llm1.base config.json", "142B", "14B")

    p["ernie-4.5-300b-a47b"] = Preset(ModelConfig(
        vocab_size=103424, d_model=8192, n_layers=54, n_heads=64, n_kv_heads=8, max_seq_len=131072, rope_theta=5e5,
        rope_interleave=True, norm_eps=1e-5, ffn_hidden=28672, first_k_dense=3,
        moe=_moe(8192, 3584, 64, 8, aux_loss_coef=0.001, lb_convention="hf_compat")),
        "Baidu, ERNIE-4.5-300B-A47B-PT config.json", "300B", "47B",
        "active 47.9B with the embedding and head, 46.2B without: both within 2% of the name's 47B; MTP layer not "
        "counted")

    p["hunyuan-a13b"] = Preset(ModelConfig(
        vocab_size=128167, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, max_seq_len=32768,
        rope_theta=1e4 * 1000.0 ** (128 / 126), norm_eps=1e-5, tie_embeddings=True, qk_norm="head",
        qk_norm_after_rope=True,
        moe=_moe(4096, 3072, 64, 8, num_shared_experts=1, aux_loss_coef=0.001, lb_convention="hf_compat")),
        "Tencent, Hunyuan-A13B-Pretrain config.json", "80B", "13B",
        "rope NTK alpha 1000 folded into rope_theta = 1e4 * 1000^(128/126), as transformers computes it")
    return p


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].config
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
