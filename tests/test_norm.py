"""RMSNorm's fused path against its op-by-op form."""

import pytest
import torch

from moekit.nn.norm import RMSNorm, rms_norm_composite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_fused_equals_composite(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = (3 * torch.randn(2, 7, 48, dtype=dtype)).requires_grad_(True)
    g = torch.randn(2, 7, 48, dtype=dtype)
    results = []
    for fn in (norm, lambda t: rms_norm_composite(t, norm.weight, norm.eps)):
        x.grad = norm.weight.grad = None
        out = fn(x)
        out.backward(g)
        results.append((out.detach(), x.grad, norm.weight.grad))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_rmsnorm_low_precision_keeps_the_cast_before_the_weight():
    norm = RMSNorm(16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(5, 16).bfloat16()
    out = norm(x)
    assert out.dtype == torch.float32  # bf16 normalised, then times the fp32 weight
    torch.testing.assert_close(out, norm.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)
                                                                         + norm.eps)).bfloat16())
