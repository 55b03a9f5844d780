"""Routed experts: weights stacked per expert, run on contiguous slices of the dispatch plan.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations
(gate and up fused, gate first) else F, N assignments.

Three fast paths, all checked against :mod:`moekit.moe.reference` by the tests:

* ``native`` (CPU, the default there): the ``loop`` below in C++ (:mod:`moekit.moe.native`), small
  experts' work split over the intra-op threads by expert groups and by token ranges; the tests
  compare it with the Python loop.
* ``loop`` (CPU, and any dtype): one fused autograd function. For each expert it gathers its tokens,
  runs its GEMMs on its slice, and scatters the weighted result back; the backward writes each
  expert's weight gradient straight into its slice of one preallocated [E, ...] gradient.
  NOTE: indexing a stacked parameter (``w[e]``) under autograd would instead make every expert's
  backward materialise a full-size [E, ...] gradient (E× the memory traffic).
  It saves the [N, H] pre-activation and the [N, F] activation, no [N, D] tensor: the routing
  weight's gradient is <a·W_out^T, dL/dy> = <dL/da, a>, and gathered inputs are re-gathered in
  backward instead of stored.
* ``grouped_mm`` (CUDA bf16): ``torch.nn.functional.grouped_mm`` over the sorted rows with
  offsets, no host synchronisation, and a gather-based deterministic combine for token choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.moe import native
from moekit.moe.dispatch import DispatchPlan
from moekit.moe.rows import bucketed_rows, pad_rows, spill
from moekit.nn import gemm
from moekit.nn.mlp import activation_fn


def _slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


# Elementwise activation kernels with explicit outputs: (forward into `out`, backward into `out`).
# NOTE: everything below runs per expert slice into preallocated buffers. Fresh [N, F]
# temporaries are large enough for the allocator to map and unmap them every call, and the page
# faults cost more than the arithmetic on a CPU.
_aten = torch.ops.aten
_ACT_KERNELS = {
    "silu": (lambda h, out: _aten.silu.out(h, out=out),
             lambda g, h, out: _aten.silu_backward.grad_input(g, h, grad_input=out)),
    "gelu": (lambda h, out: _aten.gelu.out(h, approximate="none", out=out),
             lambda g, h, out: _aten.gelu_backward.grad_input(g, h, approximate="none", grad_input=out)),
    "relu": (lambda h, out: torch.clamp_min(h, 0, out=out),
             lambda g, h, out: _aten.threshold_backward.grad_input(g, h, 0, grad_input=out)),
}
_ACT_OF = {"swiglu": ("silu", True), "geglu": ("gelu", True), "gelu": ("gelu", False), "relu": ("relu", False)}


def _act_forward(act_name: str, h_nH: torch.Tensor, a_nF: torch.Tensor) -> None:
    kernel, gated = _ACT_OF[act_name]
    fwd, _ = _ACT_KERNELS[kernel]
    if gated:
        F_ = a_nF.shape[1]
        fwd(h_nH[:, :F_], a_nF)
        a_nF.mul_(h_nH[:, F_:])
    else:
        fwd(h_nH, a_nF)


def _act_backward(act_name: str, h_nH: torch.Tensor, grad_a_nF: torch.Tensor, grad_h_nH: torch.Tensor,
                  scratch_nF: torch.Tensor) -> torch.Tensor:
    """dL/dh from dL/da into ``grad_h_nH``; for gated a = act(gate) · up (``scratch_nF``: a temporary)."""
    kernel, gated = _ACT_OF[act_name]
    fwd, bwd = _ACT_KERNELS[kernel]
    if not gated:
        bwd(grad_a_nF, h_nH, grad_h_nH)
        return grad_h_nH
    F_ = grad_a_nF.shape[1]
    gate, up = h_nH[:, :F_], h_nH[:, F_:]
    bwd(torch.mul(grad_a_nF, up, out=scratch_nF), gate, grad_h_nH[:, :F_])
    fwd(gate, grad_h_nH[:, F_:])
    grad_h_nH[:, F_:].mul_(grad_a_nF)
    return grad_h_nH


def _workspace(x_TD: torch.Tensor, counts: list[int], rows, widths: list[int]) -> list[torch.Tensor]:
    """One [rows of the largest slice, width] buffer per width."""
    m = max((rows(n) for n in counts), default=0)
    return [x_TD.new_empty(m, w) for w in widths]


class _LoopExperts(torch.autograd.Function):
    """out[t] = Σ_{assignments a of t} w_a · down_e(act(in_e(x_t)))  — see the module docstring.

    With ``bucket`` each expert's GEMMs run on ``bucketed_rows(n)`` rows instead of its n: oneDNN,
    which runs CPU bf16/fp16 GEMMs, builds a kernel per new shape (~0.5 ms here, 6x the GEMM itself at
    E64-E128 sizes), and routing gives new row counts every step; bucketing bounds the shapes.
    The extra rows are the next experts' (past the end: token 0 gathered again); their outputs are
    never scattered, and in backward their cotangent rows are zeroed so they add nothing to the
    gradients. Experts run in order, so each writes its own rows after the previous one's spill-over.
    """

    @staticmethod
    def forward(ctx, x_TD, token_ids_N, weights_N, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, counts, act_name,
                bucket):
        kept = sum(counts)
        rows = bucketed_rows if bucket else int
        pad = spill(counts, rows)
        tok_n, w_n = token_ids_N[:kept], weights_N[:kept].to(x_TD.dtype)
        # Bucketed gathers past the last slice read token 0; its rows are never scattered.
        tok_pad = pad_rows(tok_n, pad)
        h_NH = x_TD.new_empty(kept + pad, w_in_EHD.shape[1])
        a_NF = x_TD.new_empty(kept + pad, w_out_EDF.shape[2])
        out_TD = x_TD.new_zeros(x_TD.shape)
        # Per-expert temporaries live in buffers of the largest slice, allocated once per call:
        # fresh ones per expert cost page faults whenever the allocator hands their pages back.
        x_buf, y_buf = _workspace(x_TD, counts, rows, [x_TD.shape[1]] * 2)
        for e, s, t in _slices(counts):
            u = s + rows(t - s)
            # 1. Gather the expert's tokens and run its first projection on the contiguous slice.
            x_e = torch.index_select(x_TD, 0, tok_pad[s:u], out=x_buf[: u - s])
            if b_in_EH is None:
                torch.mm(x_e, w_in_EHD[e].t(), out=h_NH[s:u])
            else:
                torch.addmm(b_in_EH[e], x_e, w_in_EHD[e].t(), out=h_NH[s:u])
            # 2. Activation, then the down projection of the unweighted activation.
            _act_forward(act_name, h_NH[s:u], a_NF[s:u])
            y_e = torch.mm(a_NF[s:u], w_out_EDF[e].t(), out=y_buf[: u - s])[: t - s]
            # 3. Weight and scatter back. A token appears at most once per expert and experts are
            #    visited in order, so the sum is deterministic.
            y_e.mul_(w_n[s:t, None])
            if b_out_ED is not None:
                y_e.addr_(w_n[s:t], b_out_ED[e])
            out_TD.index_add_(0, tok_n[s:t], y_e)
        ctx.save_for_backward(x_TD, tok_pad, w_n, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, h_NH, a_NF)
        ctx.counts, ctx.act_name, ctx.num_assignments = counts, act_name, weights_N.shape[0]
        ctx.weights_dtype, ctx.rows = weights_N.dtype, rows
        return out_TD

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_TD):
        x_TD, tok_pad, w_n, w_in_EHD, w_out_EDF, b_in_EH, b_out_ED, h_NH, a_NF = ctx.saved_tensors
        g_TD = grad_out_TD.contiguous()
        need_x = ctx.needs_input_grad[0]
        grad_x_TD = torch.zeros_like(x_TD) if need_x else None
        # Experts that got no token keep a zero gradient.
        grad_w_in = torch.zeros_like(w_in_EHD)
        grad_w_out = torch.zeros_like(w_out_EDF)
        grad_b_in = torch.zeros_like(b_in_EH) if b_in_EH is not None else None
        grad_b_out = torch.zeros_like(b_out_ED) if b_out_ED is not None else None
        grad_weights_N = w_n.new_zeros(ctx.num_assignments)
        pad = tok_pad.shape[0] - w_n.shape[0]
        w_pad = pad_rows(w_n, pad)
        D, H, F_ = x_TD.shape[1], h_NH.shape[1], a_NF.shape[1]
        g_buf, gw_buf, x_buf, gx_buf, ga_buf, gh_buf, tmp_buf = _workspace(x_TD, ctx.counts, ctx.rows,
                                                                           [D, D, D, D, F_, H, F_])
        for e, s, t in _slices(ctx.counts):
            n, u = t - s, s + ctx.rows(t - s)
            a_e, r = a_NF[s:u], u - s
            # 1. Down projection: y = w · (a W_out^T + b_out). Bucketed rows get a zero cotangent.
            g_e = torch.index_select(g_TD, 0, tok_pad[s:u], out=g_buf[:r])
            if u > n:
                g_e[n:] = 0
            gw_e = torch.mul(g_e, w_pad[s:u, None], out=gw_buf[:r])
            torch.mm(gw_e.t(), a_e, out=grad_w_out[e])
            grad_a_e = torch.mm(g_e, w_out_EDF[e], out=ga_buf[:r])  # dL/da before the routing weight
            # dL/dw = <dL/dy, a W_out^T + b_out> = <grad_a_e, a> + <g, b_out>
            torch.linalg.vecdot(grad_a_e[:n], a_e[:n], out=grad_weights_N[s:t])
            if b_out_ED is not None:
                torch.sum(gw_e, dim=0, out=grad_b_out[e])
                grad_weights_N[s:t] += torch.mv(g_e[:n], b_out_ED[e])
            grad_a_e.mul_(w_pad[s:u, None])
            # 2. Activation.
            grad_h_e = _act_backward(ctx.act_name, h_NH[s:u], grad_a_e, gh_buf[:r], tmp_buf[:r])
            # 3. First projection: weight gradient, and the input gradient scattered back.
            x_e = torch.index_select(x_TD, 0, tok_pad[s:u], out=x_buf[:r])
            torch.mm(grad_h_e.t(), x_e, out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(grad_h_e, dim=0, out=grad_b_in[e])
            if need_x:
                grad_x_TD.index_add_(0, tok_pad[s:t], torch.mm(grad_h_e, w_in_EHD[e], out=gx_buf[:r])[:n])
        return (grad_x_TD, None, grad_weights_N.to(ctx.weights_dtype), grad_w_in, grad_w_out, grad_b_in,
                grad_b_out, None, None, None)


def inverse_permutation(order_N: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i: where each original row went."""
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.shape[0], device=order_N.device)
    return inverse_N


def grouped_mm_aligned(cfg: MoEConfig) -> bool:
    """``grouped_mm`` needs every row stride to be a multiple of 16 bytes: widths divisible by 8."""
    return cfg.d_model % 8 == 0 and cfg.expert_hidden % 8 == 0


def grouped_mm_experts(x_TD: torch.Tensor, plan: DispatchPlan, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor,
                       b_in_EH: torch.Tensor | None, b_out_ED: torch.Tensor | None, act_name: str) -> torch.Tensor:
    """The sync-free path: one grouped GEMM per projection over all N sorted rows.

    Rows past the last offset (dropped assignments) are not computed by ``grouped_mm``; they are
    masked out before the combine. Token choice combines by gathering each token's K rows back and
    summing them (deterministic on CUDA, no atomics); expert choice uses ``index_add_``.
    """
    D, F_ = w_out_EDF.shape[1:]
    if D % 8 or F_ % 8:  # the rule of grouped_mm_aligned, on the tensors at hand
        raise ValueError(f"expert_impl='grouped_mm' needs d_model and expert_hidden divisible by 8 "
                         f"(16-byte strides), got d_model={D}, expert_hidden={F_}; use expert_impl='loop'")
    act = activation_fn(act_name)
    N = plan.num_assignments
    offs_E = plan.offsets_E.to(torch.int32)
    # NOTE: grouped_mm leaves rows past offs[-1] (and their gradients) uninitialised. Every tensor
    # that crosses it is masked with `where`, which drops those rows' values and gradients even if
    # they are inf/NaN (a multiply by zero would not).
    kept_N1 = (torch.arange(N, device=x_TD.device) < offs_E[-1])[:, None]
    x_ND = torch.where(kept_N1, x_TD[plan.token_ids_N], 0.0)
    if b_in_EH is not None or b_out_ED is not None:
        expert_N = torch.searchsorted(offs_E, torch.arange(N, device=x_TD.device, dtype=torch.int32), right=True)
        expert_N = expert_N.clamp(max=w_in_EHD.shape[0] - 1)
    h_NH = F.grouped_mm(x_ND, w_in_EHD.transpose(-2, -1), offs=offs_E)
    if b_in_EH is not None:
        h_NH = h_NH + b_in_EH[expert_N]
    h_NH = torch.where(kept_N1, h_NH, 0.0)
    y_ND = F.grouped_mm(act(h_NH), w_out_EDF.transpose(-2, -1), offs=offs_E)
    if b_out_ED is not None:
        y_ND = y_ND + b_out_ED[expert_N]
    w_N1 = torch.where(kept_N1[:, 0], plan.weights_N, 0.0).to(x_TD.dtype)[:, None]
    y_ND = torch.where(kept_N1, y_ND, 0.0) * w_N1
    if plan.order_N is not None:
        T = plan.num_tokens
        return y_ND[inverse_permutation(plan.order_N)].view(T, N // T, -1).sum(dim=1)
    return x_TD.new_zeros(x_TD.shape).index_add_(0, plan.token_ids_N, y_ND)


def gather_experts(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, b_in_EH: torch.Tensor | None,
                   b_out_ED: torch.Tensor | None, act_name: str) -> torch.Tensor:
    """The decoding path for a handful of tokens under ``torch.compile``: no plan, no host sync.

    Each (token, choice) pair reads its expert's weights in place, out[t] = Σ_k w_tk · W_out[e_tk]
    act(W_in[e_tk] x_t), written as indexed multiply-and-sum reductions. Compiled, the index and the
    product fuse into one reduction that streams the chosen experts' weights once (gpt-fast's MoE
    decoding); eagerly it would copy them, so only the compiled decode step uses it. Tokens pick an
    expert at most once, and every choice is kept: dropless routing only (no capacity).
    """
    T, K = expert_ids_TK.shape
    # Pairs sorted by expert: consecutive reductions over the same expert find its weights in cache.
    order_N = expert_ids_TK.flatten().argsort(stable=True)
    e_N, tok_N = expert_ids_TK.flatten()[order_N], order_N // K
    h_NH = (w_in_EHD[e_N] * x_TD[tok_N][:, None, :]).sum(-1)
    if b_in_EH is not None:
        h_NH = h_NH + b_in_EH[e_N]
    a_NF = activation_fn(act_name)(h_NH)
    y_ND = (w_out_EDF[e_N] * a_NF[:, None, :]).sum(-1)
    if b_out_ED is not None:
        y_ND = y_ND + b_out_ED[e_N]
    y_TKD = y_ND[inverse_permutation(order_N)].view(T, K, -1)  # back to (token, choice) order: a fixed-order sum
    return (y_TKD * weights_TK.to(y_TKD.dtype)[..., None]).sum(1)


class Experts(nn.Module):
    """E routed expert MLPs with stacked weights ``w_in`` [E, H, D] and ``w_out`` [E, D, F]."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D, F_ = cfg.num_experts, cfg.d_model, cfg.expert_hidden
        H = 2 * F_ if cfg.gated else F_
        self.w_in = nn.Parameter(torch.empty(E, H, D))
        self.w_out = nn.Parameter(torch.empty(E, D, F_))
        self.b_in = nn.Parameter(torch.empty(E, H)) if cfg.mlp_bias else None
        self.b_out = nn.Parameter(torch.empty(E, D)) if cfg.mlp_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.cfg.init_std)
        nn.init.normal_(self.w_out, std=self.cfg.init_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def impl_for(self, x_TD: torch.Tensor) -> str:
        if self.cfg.expert_impl != "auto":
            return self.cfg.expert_impl
        # NOTE: bf16 only: fp16 grouped_mm takes a slow fallback in PyTorch
        fast = x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and grouped_mm_aligned(self.cfg)
        if fast:
            return "grouped_mm"
        return "native" if x_TD.device.type == "cpu" and native.load() is not None else "loop"

    def cast(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """The input and (w_in, w_out, b_in, b_out) in the compute dtype: autocast's, else the input's."""
        params = [self.w_in, self.w_out, self.b_in, self.b_out]
        device_type = x_TD.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_TD.dtype
        return x_TD.to(dtype), [p.to(dtype) if p is not None else None for p in params]

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        device_type = x_TD.device.type
        x_TD, params = self.cast(x_TD)
        with torch.autocast(device_type=device_type, enabled=False):
            impl = self.impl_for(x_TD)
            if impl == "grouped_mm":
                return grouped_mm_experts(x_TD, plan, *params, self.cfg.activation)
            counts = plan.counts_E.tolist()  # the one host sync of the loop path: slice bounds
            # NOTE: CPU bf16/fp16 GEMMs run on oneDNN, the C++ loop's fp32 ones too where moekit.nn.gemm
            # chooses it; oneDNN compiles a kernel per new shape (~0.6 ms and ~0.6 MB of RSS each, cached)
            # (the C++ loop's own fp32 kernel, where it runs, has neither: see NativeLoopExperts)
            bucket = x_TD.device.type == "cpu" and (x_TD.dtype in (torch.bfloat16, torch.float16)
                                                     or impl == "native" and gemm.onednn_for(x_TD))
            args = (x_TD.contiguous(), plan.token_ids_N, plan.weights_N, *params, counts, self.cfg.activation, bucket)
            if impl == "native":
                if x_TD.device.type != "cpu":
                    raise ValueError(f"expert_impl='native' runs on the CPU, got a tensor on {x_TD.device}; "
                                     f"use 'auto', 'loop' or 'grouped_mm'")
                return native.NativeLoopExperts.apply(*args, native.thread_groups(params[0], params[1]))
            return _LoopExperts.apply(*args)
