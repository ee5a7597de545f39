"""y = x W^T (+ b) as one autograd Function with a hand-written backward (issue 12).

Legend: N rows (all leading dimensions of x flattened), I input features, O output features.

Autograd's graph of `F.linear` dispatches t + mm forward and, in backward, the matmul's three
transposes, two GEMMs and the weight transpose's own transpose (6 ops). The Function runs the
same GEMMs, so the numbers are the same bit for bit, with one transpose in backward:
    forward    y_NO = x_NI @ W_OI^T                   (mm; W^T a view made once, `transposed`)
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


def reuse_view(owner, slot: str, sources: list[torch.Tensor | None], build):
    """`build()`, a view (or tuple of views, or None) of the tensors `sources`, made once and
    kept on `owner` under `slot` while every source keeps its storage, dtype, shape and strides
    (issue 12: a parameter's transposed view, or q/k/v side by side in the optimizer's flat
    buffer, is not made again for every micro-batch). Only views belong here: they read the
    sources' current values; a copy would go stale."""
    key = tuple(None if t is None else (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t in sources)
    hit = getattr(owner, slot, None)
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():
            hit = (key, build())
        setattr(owner, slot, hit)
    return hit[1]


def stacked_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """`tensors` stacked along dim 0 as one view, when they lie back to back in one storage
    (contiguous, same trailing shape); else None. Kept on the first tensor (`reuse_view`)."""
    first, end = tensors[0], tensors[0].data_ptr()
    for t in tensors:
        if t.data_ptr() != end or not t.is_contiguous() or t.shape[1:] != first.shape[1:]:
            return None
        end += t.numel() * t.element_size()
    if len(tensors) == 1:
        return first
    if any(t.grad_fn is not None for t in tensors):
        return None
    shape = (sum(t.shape[0] for t in tensors),) + tuple(first.shape[1:])
    return reuse_view(first, "_stacked_view", tensors, lambda: first.detach().as_strided(shape, first.stride()))


def transposed(weight_OI: torch.Tensor) -> torch.Tensor:
    """weight^T (the last two dimensions swapped) as a view made once (`reuse_view`) for a
    parameter; made each call otherwise."""
    if weight_OI.grad_fn is not None:
        return weight_OI.transpose(-2, -1)
    return reuse_view(weight_OI, "_transposed_view", [weight_OI], lambda: weight_OI.detach().transpose(-2, -1))


def accumulation_target(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The gradient of `params` stacked along dim 0, as one tensor a backward may add into
    (module docstring), or None where autograd must accumulate as usual."""
    grads = [p.grad for p in params]
    if any(g is None or g is not getattr(p, "main_grad", None) for g, p in zip(grads, params)):
        return None
    if len(grads) == 1:
        return grads[0]
    return stacked_view(grads)


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
            return torch.mm(x_NI, transposed(weight_OI))
        return torch.addmm(bias_O, x_NI, transposed(weight_OI))

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
