"""RMSNorm, the one normalisation of the executor's models (layers, final, q/k, MLA latents).

One autograd Function with a hand-written backward (issue 12: fewer, bigger ops): 5 ops
forward and 6 backward (rows [N, D]) where autograd's graph of the same formula dispatches
about 25. The forward is transformers' order (normalise in fp32, cast back, then scale) with
the mean of squares from one norm kernel (equal to the unfused formula up to rounding); the
backward is the exact derivative, equal to autograd's up to float rounding. `rms_norm_forward` and
`rms_norm_backward` are the two halves, also called by the fused CPU attention block
(attention.py), whose backward adds the residual stream's gradient in the norm's last op.

Legend: N rows (all leading dimensions), D normalised features.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import reuse_view


def rms_norm_forward(x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float | torch.Tensor):
    """(y, xhat, rstd): y = (x * rstd).to(x.dtype) * w, xhat_ND = x * rstd (fp32),
    rstd_N1 = 1 / sqrt(mean(x^2) + eps) in fp32. 6 ops; 5 with `eps` a 0-d fp32 tensor:
    mean(x^2) + eps as eps + |x|^2 / D, one norm kernel and one multiply-add (the same value
    up to rounding)."""
    xf_ND = x_ND.float()
    if isinstance(eps, torch.Tensor):
        norm_N1 = torch.linalg.vector_norm(xf_ND, dim=-1, keepdim=True)
        rstd_N1 = torch.addcmul(eps, norm_N1, norm_N1, value=1.0 / x_ND.shape[-1]).rsqrt_()
    else:
        rstd_N1 = xf_ND.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    xhat_ND = xf_ND * rstd_N1  # fp32
    return xhat_ND.to(x_ND.dtype) * weight_D, xhat_ND, rstd_N1


def rms_norm_backward(g_ND: torch.Tensor, xhat_ND: torch.Tensor, rstd_N1: torch.Tensor,
                      weight_D: torch.Tensor, need_x: bool = True, need_w: bool = True,
                      residual_ND: torch.Tensor | None = None):
    """(dx, dw) of `rms_norm_forward` for the upstream gradient g (None where not needed):
        dw = sum_N g * xhat
        dx = rstd * (g*w - xhat * mean_D(g*w * xhat))  (+ residual_ND, the gradient the
                                                        input gets from elsewhere: one op)
    In fp32, sum_D(g*w * xhat) is (g*xhat) @ w, one GEMV of the product dw sums (w viewed as a
    column once): 6 ops for both with 2-D rows, 7 otherwise."""
    grad_w = grad_x = None
    gx_ND = None
    if need_w or g_ND.dtype == torch.float32:
        gx_ND = g_ND * xhat_ND.to(g_ND.dtype)
    if need_w:
        grad_w = gx_ND.sum(tuple(range(g_ND.dim() - 1)))
    if need_x:
        gw_ND = (g_ND * weight_D).float()
        if gx_ND is not None and weight_D.dtype == torch.float32:
            # sum_D g*w*xhat as a GEMV of g*xhat (which dw needs anyway) with w: one op for two
            # (2-D rows: one mm; more dimensions: matmul folds them into the same mm)
            w_D1 = reuse_view(weight_D, "_column_view", [weight_D], lambda: weight_D.detach()[:, None])
            dot_N1 = torch.mm(gx_ND, w_D1) if g_ND.dim() == 2 else torch.matmul(gx_ND, w_D1)
            inner_ND = torch.addcmul(gw_ND, xhat_ND, dot_N1, value=-1.0 / weight_D.shape[0])
        else:
            dot_N1 = (gw_ND * xhat_ND).mean(-1, keepdim=True)
            inner_ND = torch.addcmul(gw_ND, xhat_ND, dot_N1, value=-1.0)
        if residual_ND is None:
            grad_x = inner_ND.mul_(rstd_N1).to(g_ND.dtype)
        else:
            grad_x = torch.addcmul(residual_ND.float(), inner_ND, rstd_N1).to(g_ND.dtype)
    return grad_x, grad_w


class _RMSNormFunction(torch.autograd.Function):
    """y = (x / rms(x)).to(dtype) * w, rms over the last dimension in fp32 (formulas:
    `rms_norm_backward`)."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
        y_ND, xhat_ND, rstd_N1 = rms_norm_forward(x_ND, weight_D, eps)
        ctx.save_for_backward(xhat_ND, rstd_N1, weight_D)
        return y_ND

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        xhat_ND, rstd_N1, weight_D = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(g_ND, xhat_ND, rstd_N1, weight_D, ctx.needs_input_grad[0],
                                           ctx.needs_input_grad[1])
        return grad_x, grad_w, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in fp32 (transformers' order:
    normalise in fp32, cast back, then scale)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight_D = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # eps as a device scalar made once (rms_norm_forward's multiply-add takes it); not state
        self.register_buffer("eps_t", torch.tensor(eps, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight_D, self.eps_t)
