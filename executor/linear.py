"""y = x W^T (+ b) as one autograd Function with a hand-written backward (issue 12).

Legend: N rows (all leading dimensions of x flattened), I input features, O output features.

Autograd's graph of `F.linear` dispatches t + mm forward and, in backward, the matmul's three
transposes, two GEMMs and the weight transpose's own transpose (6 ops). The Function runs the
same GEMMs, so the numbers are the same bit for bit, with one transpose in backward:
    forward    y_NO = x_NI @ W_OI^T                   (t, mm)
    backward   dx_NI = g_NO @ W_OI                     (mm)
               dW_OI = g_NO^T @ x_NI                   (t, mm)
               db_O = sum_N g_NO                       (sum)
Inputs with more than two dimensions are viewed as [N, I] and the output viewed back (one view
each way). Under autocast the plain `F.linear` runs instead (autocast does not see inside a
custom Function), so bf16 autocast runs exactly as before.

Gradient-accumulation fusion (Megatron's `gradient_accumulation_fusion`): when a weight's
.grad is its fp32 view of the distributed optimizer's flat gradient buffer (optimizer.py), the
backward adds g^T x into it with one `addmm_` and hands autograd no weight gradient, so no
separate GEMM output and no AccumulateGrad op per micro-batch. `accumulation_target` says
when: for weights used side by side (attention's q, k and v) the views must also be adjacent
in the buffer. Only `.backward()` may run through it (a `torch.autograd.grad` over such a
weight would not see its gradient); the trainer's step does exactly that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_target(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The gradient of `params` stacked along dim 0, as one tensor a backward may add into
    (module docstring), or None where autograd must accumulate as usual."""
    grads = [p.grad for p in params]
    if any(g is None or g is not getattr(p, "main_grad", None) for g, p in zip(grads, params)):
        return None
    if len(grads) == 1:
        return grads[0]
    first, end = grads[0], grads[0].data_ptr()
    for g in grads:
        if g.data_ptr() != end or not g.is_contiguous() or g.shape[1:] != first.shape[1:]:
            return None
        end += g.numel() * g.element_size()
    return first.as_strided((sum(g.shape[0] for g in grads),) + tuple(first.shape[1:]), first.stride())


def add_weight_grad(target: torch.Tensor | None, g_NO: torch.Tensor, x_NI: torch.Tensor) -> torch.Tensor | None:
    """dW = g^T x: added into `target` when there is one (returns None), else returned."""
    if target is None:
        return torch.mm(g_NO.t(), x_NI)
    target.addmm_(g_NO.t(), x_NI)
    return None


class _LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, weight_OI: torch.Tensor, bias_O: torch.Tensor | None,
                wgrad_OI: torch.Tensor | None):
        ctx.save_for_backward(x_NI, weight_OI)
        ctx.wgrad_OI = wgrad_OI
        ctx.has_bias = bias_O is not None
        if bias_O is None:
            return torch.mm(x_NI, weight_OI.t())
        return torch.addmm(bias_O, x_NI, weight_OI.t())

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):
        x_NI, weight_OI = ctx.saved_tensors
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = torch.mm(g_NO, weight_OI)
        if ctx.needs_input_grad[1]:
            g_w = add_weight_grad(ctx.wgrad_OI, g_NO, x_NI)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = g_NO.sum(0)
        return g_x, g_w, g_b, None


def linear(x: torch.Tensor, weight_OI: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) over the last dimension of x (module docstring)."""
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight_OI, bias_O)
    wgrad_OI = accumulation_target([weight_OI]) if weight_OI.is_leaf else None
    if x.dim() == 2:
        return _LinearFunction.apply(x, weight_OI, bias_O, wgrad_OI)
    out_NO = _LinearFunction.apply(x.reshape(-1, x.shape[-1]), weight_OI, bias_O, wgrad_OI)
    return out_NO.view(*x.shape[:-1], weight_OI.shape[0])
