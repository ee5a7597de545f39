"""The fused dense parts (issue 12) against the unfused formulas they replace, and their op
counts: RMSNorm and RoPE as autograd Functions with hand-written backwards, attention with one
q/k/v GEMM, one rope op and SDPA's own GQA, the router's losses as dot products."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cost_model.presets import preset_model
from cost_model.specs import Mapping
from executor.attention import Attention, apply_rope, rope_tables
from executor.norm import RMSNorm
from executor.parallel_dims import ParallelDims
from executor.router import Router, RouterConfig


class _CountOps(TorchDispatchMode):
    """Counts every op that reaches the dispatcher (views and ops inside Functions included)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.num_ops += 1
        return func(*args, **(kwargs or {}))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unfused_rms_norm(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _unfused_rope(x, positions, head_dim, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_unfused_formula(dtype):
    norm = RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight_D.copy_(torch.rand(64, generator=_gen(0)) + 0.5)
    x = torch.randn(3, 10, 64, generator=_gen(1)).to(dtype).requires_grad_()
    g = torch.randn(3, 10, 64, generator=_gen(2)).to(dtype)
    ref = _unfused_rms_norm(x, norm.weight_D, 1e-5)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, norm.weight_D), g)
    out = norm(x)
    dx, dw = torch.autograd.grad(out, (x, norm.weight_D), g)
    # the mean of squares from one norm kernel: equal up to rounding (bf16: the output's)
    torch.testing.assert_close(out, ref, **({"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {}))
    # fp32: rounding of a different summation order; bf16: one bf16 rounding (2^-8)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 4e-3, "atol": 4e-3}
    torch.testing.assert_close(dx, ref_dx, **tol)
    torch.testing.assert_close(dw, ref_dw, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_pairwise_rotation(dtype):
    """bf16 bit for bit; fp32 within a rounding: the rotation's multiply-add is one `addcmul`,
    whose CPU kernel may fuse it (one rounding where the formula has two)."""
    pos = torch.arange(5, 37)
    x0 = torch.randn(2, 32, 6, 16, generator=_gen(5)).to(dtype).transpose(1, 2)  # [B, H, S, Dh] view
    g = torch.randn(2, 6, 32, 16, generator=_gen(6)).to(dtype)
    x = x0.clone().requires_grad_()
    ref = _unfused_rope(x, pos, 16)
    (ref_dx,) = torch.autograd.grad(ref, x, g)
    x = x0.clone().requires_grad_()
    out = apply_rope(x, *rope_tables(pos, 16))
    (dx,) = torch.autograd.grad(out, x, g)
    if dtype == torch.bfloat16:
        assert torch.equal(out, ref) and torch.equal(dx, ref_dx)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-6, atol=1e-6)


def _unfused_attention(attn: Attention, x_BSD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The attention before issue 12: three linears, two rope calls, repeat_interleave GQA."""
    B, S, _ = x_BSD.shape
    q = attn.wq(x_BSD).view(B, S, attn.Hl, attn.Dh)
    k = attn.wk(x_BSD).view(B, S, attn.Gl, attn.Dh)
    if attn.q_norm is not None:
        q = _unfused_rms_norm(q, attn.q_norm.weight_D, attn.q_norm.eps)
        k = _unfused_rms_norm(k, attn.k_norm.weight_D, attn.k_norm.eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = attn.wv(x_BSD).view(B, S, attn.Gl, attn.Dh).transpose(1, 2)
    q, k = _unfused_rope(q, positions, attn.Dh), _unfused_rope(k, positions, attn.Dh)
    k = k.repeat_interleave(attn.Hl // attn.Gl, dim=1)
    v = v.repeat_interleave(attn.Hl // attn.Gl, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn.wo(o.transpose(1, 2).reshape(B, S, attn.Hl * attn.Dh))


@pytest.mark.parametrize("options", [{}, {"add_qkv_bias": True, "qk_layernorm": True}])
def test_attention_equals_the_unfused_attention(options):
    spec = preset_model("tiny-moe").model_copy(update=options)
    torch.manual_seed(7)
    attn = Attention(spec, ParallelDims.single(Mapping(micro_batch_size=1)))
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=_gen(p.numel())) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    pos = torch.arange(24)
    x0 = torch.randn(2, 24, spec.hidden_size, generator=_gen(8))
    g = torch.randn(2, 24, spec.hidden_size, generator=_gen(9))
    params = list(attn.parameters())
    x = x0.clone().requires_grad_()
    ref = _unfused_attention(attn, x, pos)
    ref_grads = torch.autograd.grad(ref, [x, *params], g)
    x = x0.clone().requires_grad_()
    out = attn(x, rope_tables(pos, spec.head_dim), None)
    grads = torch.autograd.grad(out, [x, *params], g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _unfused_router_loss(logits_TE, indices_TK, E, K, aux_coeff, z_coeff):
    """Switch load-balancing + z loss as the router computed them before issue 12."""
    tokens_E = torch.bincount(indices_TK.reshape(-1), minlength=E).float()
    T = logits_TE.shape[0]
    aux = aux_coeff * E / (T * T * K) * (tokens_E * torch.softmax(logits_TE, -1).sum(0)).sum()
    return aux + z_coeff * torch.logsumexp(logits_TE, -1).square().sum() / T


def test_router_losses_equal_the_unfused_formulas():
    torch.manual_seed(11)
    router = Router(32, 8, 2, RouterConfig(aux_loss_coeff=1e-2, z_loss_coeff=1e-3))
    with torch.no_grad():
        router.weight_ED.copy_(torch.randn(8, 32, generator=_gen(12)))
    x = torch.randn(40, 32, generator=_gen(13), requires_grad=True)
    out = router(x, ParallelDims.single(), None)
    logits = F.linear(x, router.weight_ED)
    ref = _unfused_router_loss(logits, out.indices_TK, 8, 2, 1e-2, 1e-3)
    torch.testing.assert_close(out.aux_loss, ref, rtol=1e-6, atol=0)
    (dx,) = torch.autograd.grad(out.aux_loss, x)
    (ref_dx,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-9)
    assert torch.equal(out.probs_TK, torch.softmax(logits.gather(1, out.indices_TK), -1))


def _ops(fn) -> int:
    fn()  # warm-up: parameter .grad exists, as in every micro-batch after the first
    mode = _CountOps()
    with mode:
        fn()
    return mode.num_ops


def test_dense_parts_stay_few_ops():
    """Forward + backward op counts (ops/step is issue 12's target); before the fusion:
    RMSNorm 29, attention 142, router 82 (benchmarks/step_anatomy.py --components); with
    the linear layers, the CPU attention and the router's probabilities and losses as
    Functions with their own backward: attention 66 -> 54, router 54 -> 36."""
    spec = preset_model("tiny-moe")
    dims = ParallelDims.single(Mapping(micro_batch_size=1))
    attn, norm = Attention(spec, dims), RMSNorm(spec.hidden_size)
    router = Router(spec.hidden_size, spec.num_experts, spec.topk, RouterConfig())
    torch.nn.init.normal_(router.weight_ED, std=0.02)
    rope = rope_tables(torch.arange(64), spec.head_dim)
    x_BSD = torch.randn(1, 64, spec.hidden_size, generator=_gen(14), requires_grad=True)
    x_TD = x_BSD.detach().view(64, -1).requires_grad_()

    def route():
        r = router(x_TD, dims, None)
        (r.probs_TK.sum() + r.aux_loss).backward()

    assert _ops(lambda: norm(x_TD).sum().backward()) <= 17  # rows as training passes them without tp
    assert _ops(lambda: norm(x_BSD).sum().backward()) <= 19
    assert _ops(lambda: attn(x_BSD, rope, None).sum().backward()) <= 54
    assert _ops(route) <= 36
