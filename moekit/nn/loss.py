"""Next-token cross-entropy fused with the output projection, a chunk of tokens at a time.

Legend: T tokens, D model width, V vocabulary, C tokens in a chunk.

``F.cross_entropy(F.linear(h, W) · m)`` materialises the [T, V] logits, their log-softmax and, in
backward, their gradient: three [T, V] fp32 tensors (32 MB each at 2048 tokens and a 4096 vocabulary;
4 GB at 8192 tokens and 128k), fresh every step. :func:`linear_cross_entropy` instead walks the
tokens in chunks of C and, for each, computes the logits, the loss and (when a gradient is needed)
the logits' gradient softmax − onehot at once, turning it straight into the chunk's rows of dL/dh and
its share of dL/dW; only [C, V] is ever alive. The backward then only scales the two stored
gradients by the incoming one. The technique of Liger-Kernel's fused linear cross-entropy
(Hsu et al. 2024) and torchtune's chunked output; the loss is the usual mean over non-ignored
targets, L = (1/n) Σ_t [logsumexp(z_t) − z_t[y_t]], with z_t = m · W h_t and dL/dz_t = (softmax(z_t) −
onehot(y_t)) / n.

Under autocast the projections run in the autocast dtype and the softmax in fp32, as the unfused
path does (``F.linear`` autocasts, the logits are cast to fp32 before the loss). The products run on
``torch.mm`` unless the caller hands in another ``mm`` of the same signature (the model passes
:func:`moekit.cpu.gemm.mm` on oneDNN where :mod:`moekit.moe.backends.chooser` says so).
:func:`linear_cross_entropy_reference` is that unfused path; the tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


CHUNK_BYTES = 8 * 2**20  # fp32 logits per chunk: big enough GEMMs, small enough to stay in reused memory
# Each chunk also reads and writes all of dL/dW ([V, D] fp32): with C rows that is C/4 FLOP per byte
# of it, which needs C in the hundreds to stay compute-bound.
MIN_CHUNK_TOKENS = 256


def torch_mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None,
             accumulate: bool = False) -> torch.Tensor:
    """``a @ b``, into ``out`` (added to it with ``accumulate``; cast once when its dtype differs)."""
    if out is None:
        return a_MK @ b_KN
    if out.dtype != a_MK.dtype:  # e.g. a bf16 product into an fp32 gradient
        return out.add_(a_MK @ b_KN) if accumulate else out.copy_(a_MK @ b_KN)
    return out.addmm_(a_MK, b_KN) if accumulate else torch.mm(a_MK, b_KN, out=out)


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: ~8 MiB of fp32 logits, at least 256 rows (a 128k vocabulary: 256 rows, 128 MiB,
    against 4 GiB for the whole [8192, 128k])."""
    return max(MIN_CHUNK_TOKENS, CHUNK_BYTES // (4 * vocab_size))


def cross_entropy(logits_TV: torch.Tensor, targets_T: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy`` (mean) on logits cast up to at least fp32."""
    return F.cross_entropy(logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32)), targets_T,
                           ignore_index=ignore_index)


def linear_cross_entropy_reference(h_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor,
                                   ignore_index: int = -100, multiplier: float = 1.0) -> torch.Tensor:
    """The unfused loss: the full [T, V] logits, then :func:`cross_entropy`."""
    logits_TV = F.linear(h_TD, w_VD)
    if multiplier != 1.0:
        logits_TV = logits_TV * multiplier
    return cross_entropy(logits_TV, targets_T, ignore_index)


def _compute_dtype(h_TD: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would run in: autocast's, except for fp64 (which autocast leaves alone)."""
    device = h_TD.device.type
    if torch.is_autocast_enabled(device) and h_TD.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return h_TD.dtype


def _chunk_logits(h_CD: torch.Tensor, w_VD: torch.Tensor, multiplier: float, mm) -> torch.Tensor:
    """[C, V] logits in fp32 (fp64 for fp64 inputs)."""
    logits_CV = mm(h_CD, w_VD.t()).to(torch.promote_types(h_CD.dtype, torch.float32))
    return logits_CV.mul_(multiplier) if multiplier != 1.0 else logits_CV


def _check_targets(targets_T: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """The mask of counted targets; a target outside [0, V) that is not ``ignore_index`` is an error."""
    valid_T = targets_T != ignore_index
    bad_T = valid_T & ((targets_T < 0) | (targets_T >= vocab_size))
    if bool(bad_T.any()):
        raise ValueError(f"targets must lie in [0, vocab_size={vocab_size}) or equal ignore_index={ignore_index}; "
                         f"got {targets_T[bad_T][:5].tolist()}")
    return valid_T


def _chunked_loss(h_TD, w_VD, targets_T, valid_T, multiplier, chunk, dtype, need_h, need_w, mm):
    """(summed loss of the counted targets, dL_sum/dh or None, dL_sum/dW or None), a chunk at a time."""
    T = h_TD.shape[0]
    w_c = w_VD.to(dtype)
    acc = torch.promote_types(dtype, torch.float32)  # softmax, sums and dL/dW accumulate in this
    grad_h_TD = torch.empty_like(h_TD) if need_h else None
    grad_w_VD = torch.zeros(w_VD.shape, dtype=acc, device=w_VD.device) if need_w else None
    loss_sum = torch.zeros((), dtype=acc, device=h_TD.device)
    safe_T = torch.where(valid_T, targets_T, 0)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        h_c, safe_C, valid_C = h_TD[a:b].to(dtype), safe_T[a:b, None], valid_T[a:b]
        # 1. Logits and the chunk's loss. NOTE: log_softmax is one fused pass over each row; logsumexp
        #    runs several with temporaries (~7x slower here on [2048, 4096]).
        logp_CV = torch.log_softmax(_chunk_logits(h_c, w_c, multiplier, mm), dim=-1)
        loss_sum -= torch.where(valid_C, logp_CV.gather(1, safe_C)[:, 0], 0.0).sum()
        if not (need_h or need_w):
            continue
        # 2. dL_sum/dz = softmax - onehot on counted rows (in place), times the multiplier.
        g_CV = logp_CV.exp_()
        g_CV.scatter_add_(1, safe_C, torch.full((b - a, 1), -1.0, dtype=g_CV.dtype, device=g_CV.device))
        g_CV.mul_(valid_C.to(g_CV.dtype).mul_(multiplier)[:, None])
        g_CV = g_CV.to(dtype)
        # 3. Straight into the gradients of h (this chunk's rows) and of W (accumulated).
        if need_h:
            mm(g_CV, w_c, out=grad_h_TD[a:b])
        if need_w:
            if dtype == acc:
                mm(g_CV.t(), h_c, out=grad_w_VD, accumulate=True)
            else:  # a bf16 / fp16 [V, D] product per chunk, summed in fp32
                grad_w_VD += g_CV.t() @ h_c
    return loss_sum, grad_h_TD, grad_w_VD


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in one pass over the chunks; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, h_TD, w_VD, targets_T, valid_T, multiplier, chunk, dtype, mm):
        loss_sum, grad_h_TD, grad_w_VD = _chunked_loss(h_TD, w_VD, targets_T, valid_T, multiplier, chunk, dtype,
                                                       *ctx.needs_input_grad[:2], mm)
        count = valid_T.sum()
        ctx.save_for_backward(grad_h_TD, grad_w_VD, count)
        ctx.w_dtype = w_VD.dtype
        return loss_sum / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h_TD, grad_w_VD, count = ctx.saved_tensors
        # No counted target: the loss is NaN (0/0) but its gradients are zero, as F.cross_entropy's.
        scale = grad_loss / count.clamp_min(1)
        grad_h = grad_h_TD * scale.to(grad_h_TD.dtype) if grad_h_TD is not None else None
        grad_w = (grad_w_VD * scale).to(ctx.w_dtype) if grad_w_VD is not None else None
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(h_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor, ignore_index: int = -100,
                         multiplier: float = 1.0, chunk: int | None = None, mm=torch_mm) -> torch.Tensor:
    """Mean cross-entropy of the logits ``multiplier · h W^T`` against ``targets_T``, never holding
    more than ``chunk`` tokens' logits (default :func:`chunk_tokens`). Equal to
    :func:`linear_cross_entropy_reference` up to rounding, gradients included; NaN when every target
    is ``ignore_index``, with zero gradients (as ``F.cross_entropy``). ``mm``: the products (the
    signature of :func:`torch_mm`)."""
    if h_TD.dim() != 2 or w_VD.dim() != 2 or h_TD.shape[1] != w_VD.shape[1]:
        raise ValueError(f"linear_cross_entropy: h must be [T, D] and w [V, D], got {tuple(h_TD.shape)} and "
                         f"{tuple(w_VD.shape)}")
    if targets_T.shape != h_TD.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be [T={h_TD.shape[0]}], got {tuple(targets_T.shape)}")
    if chunk is None:
        chunk = chunk_tokens(w_VD.shape[0])
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    valid_T = _check_targets(targets_T, w_VD.shape[0], ignore_index)
    dtype = _compute_dtype(h_TD)
    with torch.autocast(h_TD.device.type, enabled=False):
        if torch.is_grad_enabled() and (h_TD.requires_grad or w_VD.requires_grad):
            return _LinearCrossEntropy.apply(h_TD, w_VD, targets_T, valid_T, multiplier, chunk, dtype, mm)
        # No gradient wanted (evaluation): the loss alone.
        return _chunked_loss(h_TD, w_VD, targets_T, valid_T, multiplier, chunk, dtype, False, False,
                             mm)[0] / valid_T.sum()
