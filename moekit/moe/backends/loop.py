"""The reference expert loop in Python (backend ``loop``): any device, any dtype.

Legend: T tokens, D model width, E experts, F expert hidden width, H = 2F for gated activations
(gate and up fused, gate first) else F, N assignments.

One fused autograd function. For each expert it gathers its tokens, runs its GEMMs on its slice, and
scatters the weighted result back; the backward writes each expert's weight gradient straight into
its slice of one preallocated [E, ...] gradient. NOTE: indexing a stacked parameter (``w[e]``) under
autograd would instead make every expert's backward materialise a full-size [E, ...] gradient (E×
the memory traffic). It saves the [N, H] pre-activation and the [N, F] activation, no [N, D] tensor:
the routing weight's gradient is <a·W_out^T, dL/dy> = <dL/da, a>, and gathered inputs are re-gathered
in backward instead of stored.
"""

from __future__ import annotations

import torch

from moekit.cpu.rows import bucketed_rows, pad_rows, spill
from moekit.moe.backends.base import PLAIN_GEMM, ExpertBackend, ExpertWeights, LoopGemm
from moekit.moe.dispatch import DispatchPlan
from moekit.nn.activations import get as get_activation


def _slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


# The registry's elementwise functions (moekit.nn.activations, ``Activation.elementwise``) as kernels
# with explicit outputs: (forward into `out`, backward into `out`).
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


def _act_forward(act_name: str, h_nH: torch.Tensor, a_nF: torch.Tensor) -> None:
    act = get_activation(act_name)
    fwd, _ = _ACT_KERNELS[act.elementwise]
    if act.gated:
        F_ = a_nF.shape[1]
        fwd(h_nH[:, :F_], a_nF)
        a_nF.mul_(h_nH[:, F_:])
    else:
        fwd(h_nH, a_nF)


def _act_backward(act_name: str, h_nH: torch.Tensor, grad_a_nF: torch.Tensor, grad_h_nH: torch.Tensor,
                  scratch_nF: torch.Tensor) -> torch.Tensor:
    """dL/dh from dL/da into ``grad_h_nH``; for gated a = act(gate) · up (``scratch_nF``: a temporary)."""
    act = get_activation(act_name)
    fwd, bwd = _ACT_KERNELS[act.elementwise]
    if not act.gated:
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


class LoopExperts(torch.autograd.Function):
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


class LoopBackend(ExpertBackend):
    name = "loop"

    def run(self, x_TD: torch.Tensor, plan: DispatchPlan, weights: ExpertWeights, activation: str,
            how: LoopGemm = PLAIN_GEMM) -> torch.Tensor:
        counts = plan.counts_E.tolist()  # the one host sync of the loop path: slice bounds
        return LoopExperts.apply(x_TD.contiguous(), plan.token_ids_N, plan.weights_N, *weights, counts, activation,
                                 how.bucket)
