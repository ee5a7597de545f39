"""RMSNorm, the one normalisation of the executor's models (layers, final, q/k, MLA latents).

One autograd Function with a hand-written backward (issue 12: fewer, bigger ops): 6 ops
forward and 7 backward where autograd's graph of the same formula dispatches about 25. The
forward is the same arithmetic in the same order as transformers' (normalise in fp32, cast
back, then scale), so its output is bit-identical to the unfused formula; the backward is
the exact derivative, equal to autograd's up to float rounding.

Legend: N rows (all leading dimensions), D normalised features.
"""

from __future__ import annotations

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """y = (x / rms(x)).to(dtype) * w, rms over the last dimension in fp32.

    With xhat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) and g the upstream gradient:
        dw = sum_N g * xhat
        dx = rstd * (g*w - xhat * mean_D(g*w * xhat))
    """

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
        xf_ND = x_ND.float()
        rstd_N1 = xf_ND.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
        xhat_ND = xf_ND * rstd_N1  # fp32
        ctx.save_for_backward(xhat_ND, rstd_N1, weight_D)
        return xhat_ND.to(x_ND.dtype) * weight_D

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        xhat_ND, rstd_N1, weight_D = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g_ND * xhat_ND.to(g_ND.dtype)).sum(tuple(range(g_ND.dim() - 1)))
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw_ND = (g_ND * weight_D).float()
            dot_N1 = (gw_ND * xhat_ND).mean(-1, keepdim=True)
            grad_x = torch.addcmul(gw_ND, xhat_ND, dot_N1, value=-1.0).mul_(rstd_N1).to(g_ND.dtype)
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in fp32 (transformers' order:
    normalise in fp32, cast back, then scale)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight_D = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight_D, self.eps)
