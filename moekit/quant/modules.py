"""Quantized modules: :class:`QuantizedExperts` (run by the expert backend ``quantized``) and
:class:`QuantizedLinear`, their weights in registered buffers so ``state_dict`` / ``load_state_dict`` work.

Legend: E experts, D model width, F expert hidden width, H = 2F for gated activations else F,
N output features, K input features, G group size, Kg = K / G.

A quantized weight stack ``name`` (E matrices [N, K]; a linear is a stack of one) is held as

* int8: ``{name}_q`` int8 [E, N, K] and ``{name}_scale`` bf16 [E, N];
* int4: ``{name}_q`` uint8 [E, N, K/2] and ``{name}_sz`` bf16 [E, Kg, N, 2] (scale, zero).

In memory an int4 ``{name}_q`` is in the CPU kernel's packing (an ISA-dependent nibble order); the
state dict holds plain nibbles (:func:`moekit.quant.ops.pack_nibbles`), converted on save and load, so
a checkpoint does not depend on the machine that wrote it.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.moe.backends.quantized import NAME as BACKEND, QuantizedExpertWeights, inference_only
from moekit.moe.backends.registry import get as get_backend
from moekit.moe.dispatch import DispatchPlan
from moekit.moe.experts import Experts
from moekit.quant import ops
from moekit.quant.config import QuantConfig


class QuantStack:
    """E quantized [N, K] matrices held in ``owner``'s buffers under ``name`` (see the module docstring).
    Reads the buffers on every call, so ``owner.to(...)`` and ``load_state_dict`` are seen."""

    def __init__(self, owner: nn.Module, name: str, qcfg: QuantConfig, N: int, K: int):
        self.owner, self.name, self.qcfg, self.N, self.K = owner, name, qcfg, N, K

    @staticmethod
    def register(owner: nn.Module, name: str, qcfg: QuantConfig, E: int, N: int, K: int,
                 device: torch.device | str | None = None) -> "QuantStack":
        """Registers empty buffers for E [N, K] matrices on ``owner`` (``device``: e.g. ``meta``)."""
        if qcfg.format == "int8":
            owner.register_buffer(f"{name}_q", torch.empty(E, N, K, dtype=torch.int8, device=device))
            owner.register_buffer(f"{name}_scale", torch.empty(E, N, dtype=ops.SCALE_DTYPE, device=device))
        else:
            ops.check_int4_shape(N, K, qcfg.group_size, what=f"{type(owner).__name__}.{name} [{N}, {K}]")
            G = qcfg.group_size
            owner.register_buffer(f"{name}_q", torch.empty(E, N, K // 2, dtype=torch.uint8, device=device))
            owner.register_buffer(f"{name}_sz", torch.empty(E, K // G, N, 2, dtype=ops.SCALE_DTYPE, device=device))
        return QuantStack(owner, name, qcfg, N, K)

    @property
    def q(self) -> torch.Tensor:
        return getattr(self.owner, f"{self.name}_q")

    def fill(self, e: int, w_NK: torch.Tensor) -> None:
        """Quantizes ``w_NK`` into matrix ``e``."""
        if tuple(w_NK.shape) != (self.N, self.K):
            raise ValueError(f"{self.name}[{e}]: expected a [{self.N}, {self.K}] weight, got {tuple(w_NK.shape)}")
        if self.qcfg.format == "int8":
            r = ops.quantize_int8(w_NK)
            self.q[e].copy_(r.q_NK)
            getattr(self.owner, f"{self.name}_scale")[e].copy_(r.scale_N)
        else:
            r4 = ops.quantize_int4(w_NK, self.qcfg.group_size, self.qcfg.symmetric)
            self.q[e].copy_(ops.to_cpu_int4(r4.q_NK))
            getattr(self.owner, f"{self.name}_sz")[e].copy_(r4.scale_zero_KgN2)

    def matmul_dtype(self, x: torch.Tensor) -> torch.dtype:
        return ops.matmul_dtype(x, self.qcfg.act_dtype)

    def mm(self, e: int, x_MK: torch.Tensor) -> torch.Tensor:
        """x @ W_e^T on PyTorch's weight-only CPU kernels; ``x`` in :meth:`matmul_dtype`."""
        if self.qcfg.format == "int8":
            return ops.int8_mm(x_MK, self.q[e], getattr(self.owner, f"{self.name}_scale")[e])
        return ops.int4_mm(x_MK, self.q[e], getattr(self.owner, f"{self.name}_sz")[e], self.qcfg.group_size)

    def dequantize(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Matrix ``e`` as a float [N, K] tensor (the reference's weights)."""
        if self.qcfg.format == "int8":
            return ops.dequantize_int8(self.q[e], getattr(self.owner, f"{self.name}_scale")[e], dtype)
        q_NK = ops.from_cpu_int4(self.q[e], self.N, self.K)
        return ops.dequantize_int4(q_NK, getattr(self.owner, f"{self.name}_sz")[e], self.qcfg.group_size, dtype)

    def dequantize_all(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.stack([self.dequantize(e, dtype) for e in range(self.q.shape[0])])

    # int4: plain nibbles in the state dict, the kernel's packing in memory
    def to_portable(self, packed_ENK2: torch.Tensor) -> torch.Tensor:
        return torch.stack([ops.pack_nibbles(ops.from_cpu_int4(p, self.N, self.K)) for p in packed_ENK2])

    def from_portable(self, plain_ENK2: torch.Tensor) -> torch.Tensor:
        return torch.stack([ops.to_cpu_int4(ops.unpack_nibbles(p)) for p in plain_ENK2])


class _QuantStateDict:
    """The int4 state-dict conversion of a module's :class:`QuantStack` s (``self._stacks``)."""

    _stacks: dict[str, QuantStack]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, stack in self._stacks.items():
            key = f"{prefix}{name}_q"
            if stack.qcfg.format == "int4" and key in destination and not destination[key].is_meta:
                destination[key] = stack.to_portable(destination[key].detach())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, stack in self._stacks.items():
            key = f"{prefix}{name}_q"
            if stack.qcfg.format == "int4" and key in state_dict:
                value = state_dict[key]
                want = (stack.q.shape[0], stack.N, stack.K // 2)
                if tuple(value.shape) != want or value.dtype != torch.uint8:
                    error_msgs.append(f"{key}: expected uint8 {list(want)} (int4, two values a byte), got "
                                      f"{value.dtype} {list(value.shape)}")
                    continue
                state_dict[key] = stack.from_portable(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class QuantizedExperts(_QuantStateDict, Experts):
    """:class:`moekit.moe.experts.Experts` whose stacked weights are int8 / int4 (see :class:`QuantConfig`),
    always run by the expert backend ``quantized`` (inference only; :func:`moekit.moe.backends.use` does
    not change it). ``w_in`` / ``w_out`` read as the dequantized fp32 stacks (read-only: the reference
    and the analysis tools use them)."""

    def __init__(self, cfg: MoEConfig, qcfg: QuantConfig, device: torch.device | str | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate the float weights
        self.cfg, self.qcfg = cfg, qcfg
        self.backend = BACKEND
        self.decoding = False
        E, D, F_ = cfg.num_experts, cfg.d_model, cfg.expert_hidden
        H = 2 * F_ if cfg.gated else F_
        self._stacks = {"w_in": QuantStack.register(self, "w_in", qcfg, E, H, D, device),
                        "w_out": QuantStack.register(self, "w_out", qcfg, E, D, F_, device)}
        self.b_in = nn.Parameter(torch.zeros(E, H, device=device), requires_grad=False) if cfg.mlp_bias else None
        self.b_out = nn.Parameter(torch.zeros(E, D, device=device), requires_grad=False) if cfg.mlp_bias else None

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, qcfg: QuantConfig) -> "QuantizedExperts":
        """``experts`` quantized one expert at a time (the float stacks are only read)."""
        q = cls(experts.cfg, qcfg)
        for e in range(experts.cfg.num_experts):
            q._stacks["w_in"].fill(e, experts.w_in[e])
            q._stacks["w_out"].fill(e, experts.w_out[e])
        for name in ("b_in", "b_out"):
            if getattr(experts, name) is not None:
                getattr(q, name).copy_(getattr(experts, name))
        return q

    def reset_parameters(self) -> None:
        raise RuntimeError("QuantizedExperts cannot be re-initialised: quantize a freshly initialised Experts instead")

    @property
    def w_in(self) -> torch.Tensor:  # type: ignore[override]
        return self._stacks["w_in"].dequantize_all()

    @property
    def w_out(self) -> torch.Tensor:  # type: ignore[override]
        return self._stacks["w_out"].dequantize_all()

    def backend_for(self, x_TD: torch.Tensor, decode_step: bool = False) -> str:
        return BACKEND

    def cast(self, x_TD: torch.Tensor):
        raise RuntimeError(f"quantized experts have no float weights to cast; they run on expert backend {BACKEND!r}")

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        backend = get_backend(BACKEND)
        backend.check(self.cfg, x_TD)
        weights = QuantizedExpertWeights(self._stacks["w_in"], self._stacks["w_out"], self.b_in, self.b_out)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return backend.run(x_TD, plan, weights, self.cfg.activation)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"experts={c.num_experts}, d_model={c.d_model}, hidden={c.expert_hidden}, {self.qcfg.describe()}"


class QuantizedLinear(_QuantStateDict, nn.Module):
    """``nn.Linear`` with an int8 / int4 weight (inference only); ``weight`` reads as the dequantized
    fp32 matrix."""

    def __init__(self, in_features: int, out_features: int, bias: bool, qcfg: QuantConfig,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.qcfg = in_features, out_features, qcfg
        self._stacks = {"weight": QuantStack.register(self, "weight", qcfg, 1, out_features, in_features, device)}
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, qcfg: QuantConfig) -> "QuantizedLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, qcfg)
        q._stacks["weight"].fill(0, linear.weight)
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
        return q

    @staticmethod
    def fits(linear: nn.Linear, qcfg: QuantConfig) -> bool:
        """Whether ``linear``'s shape takes ``qcfg`` (int4: whole groups, rows a multiple of 16)."""
        if qcfg.format == "int8":
            return True
        try:
            ops.check_int4_shape(linear.out_features, linear.in_features, qcfg.group_size)
        except ValueError:
            return False
        return True

    @property
    def weight(self) -> torch.Tensor:
        return self._stacks["weight"].dequantize(0)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        stack = self._stacks["weight"]
        x_MK = x.reshape(-1, self.in_features)
        y = stack.mm(0, x_MK.to(stack.matmul_dtype(x_MK))).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    @torch.compiler.disable  # eager inside torch.compile, as the quantized experts (moekit.moe.backends.quantized)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(f"QuantizedLinear runs on the CPU only; got a tensor on {x.device}")
        return inference_only(lambda: self._forward(x), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, {self.qcfg.describe()}"
