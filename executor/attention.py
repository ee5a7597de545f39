"""GQA self-attention with RoPE, split by heads over tp and by sequence chunks over cp.
(Multi-latent attention, DeepSeek's, is `mla.py`; it shares the RoPE and cp helpers here.)

Legend: B sequences, S this rank's sequence (the cp shard, gathered over tp), Sk keys after the
cp gather (the full sequence), H/G query heads / key-value groups of the model, Hl = H / tp and
Gl = G / tp local heads / groups, Dh head dim, D model dim.

Tensor parallelism: wq, wk, wv are column-parallel (rank r owns query heads [r*Hl, (r+1)*Hl)
and groups [r*Gl, (r+1)*Gl); tp must divide G so every local head's group is local), wo is
row-parallel; the caller gathers x over the sequence before and reduce-scatters after.
Options of the spec: `add_qkv_bias` (biases on wq/wk/wv, split with their rows) and
`qk_layernorm` (an RMSNorm over each head's Dh features of q and k, before RoPE, weights
replicated). RoPE always rotates interleaved pairs (x[2i], x[2i+1]); a checkpoint in the
rotate-half layout is permuted on load (hf_checkpoint.py).

Few ops per step (issue 12): q, k and v come from one GEMM over the three weights side by
side (the parameters stay separate, so checkpoints and tp shards keep their names and
layouts); q and k are rotated together by one autograd op (`apply_rope`) on cos/sin tables
that the model computes once per sequence length; GQA is SDPA's own (`enable_gqa`), no
repeat_interleave copy of K and V.

Context parallelism, load-balanced causal layout: the sequence is cut into 2*cp chunks and cp
rank i holds chunks i and 2*cp-1-i (so every rank has the same causal work). K and V are
ALL-GATHERED over cp (Gl groups, before the GQA repeat) and each rank attends its queries to
the whole sequence under a position mask q_pos >= k_pos; the backward of the all-gather
reduce-scatters dK/dV. We chose the all-gather over a ring: it is one collective in each
direction with no online-softmax merging, exact in fp32, and K/V of one layer fit easily at
the sequence lengths this executor runs; a ring would overlap the transfer with compute and
hold only two K/V blocks at a time, which matters at 100K+ tokens and is left for later.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cost_model.specs import ModelSpec

from .arch import ArchOptions, YarnRope
from .comm import CommCounter, all_gather_v
from .linear import (
    accumulation_target,
    add_weight_grad,
    linear,
    stacked_view,
    transposed,
)
from .norm import RMSNorm, rms_norm_backward, rms_norm_forward
from .parallel_dims import ParallelDims
from .tensor_parallel import mark_tp


def rope_tables(positions_S: torch.Tensor, head_dim: int, base: float = 10000.0,
                yarn: YarnRope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (cos_SDh, sin_SDh), fp32, at the given positions, laid out for the
    interleaved pairs (x[2i], x[2i+1]) that `apply_rope` rotates: cos_SDh[:, 2i] =
    cos_SDh[:, 2i+1] = cos(angle_i) and sin_SDh[:, 2i] = -sin(angle_i), sin_SDh[:, 2i+1] =
    +sin(angle_i). With YaRN: its inverse frequencies, and both tables times its attention
    factor (arch.YarnRope). Computed once per sequence length (the model caches them)."""
    if yarn is None:
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions_S.device, dtype=torch.float32) / head_dim)
    else:
        inv = yarn.inv_freq(head_dim, base).to(positions_S.device)
    angles_SF = positions_S.float()[:, None] * inv[None, :]
    cos_SF, sin_SF = angles_SF.cos(), angles_SF.sin()
    if yarn is not None and yarn.attention_factor != 1.0:
        cos_SF, sin_SF = cos_SF * yarn.attention_factor, sin_SF * yarn.attention_factor
    cos_SDh = cos_SF.repeat_interleave(2, dim=-1)
    sin_SDh = torch.stack([-sin_SF, sin_SF], dim=-1).flatten(-2)
    return cos_SDh, sin_SDh


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x[2i], x[2i+1]) -> (x[2i+1], x[2i]) along the last dimension (one copy)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


class _RopeFunction(torch.autograd.Function):
    """y = x * cos + swap_pairs(x) * sin in fp32, cast back to x's dtype; the tables carry the
    signs (rope_tables), so y[2i] = x[2i] cos - x[2i+1] sin and y[2i+1] = x[2i+1] cos + x[2i] sin,
    bit for bit the pairwise rotation. swap_pairs is its own transpose, hence
    dx = g * cos + swap_pairs(g * sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_SDh, sin_SDh)
        return _rotate(x, cos_SDh, sin_SDh)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return _rotate_grad(g, *ctx.saved_tensors), None, None


def _rotate(x: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """The rotation of `_RopeFunction` (tables from `rope_tables`): x * cos, then the swapped
    pairs times sin added by one `addcmul` (the same two roundings as a mul and an add)."""
    return torch.addcmul(x * cos_SDh, _swap_pairs(x), sin_SDh).to(x.dtype)


def _rotate_grad(g: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """Its transpose: dx = g * cos + swap_pairs(g * sin)."""
    return torch.addcmul(_swap_pairs(g * sin_SDh), g, cos_SDh).to(g.dtype)


def apply_rope(x_BHSDh: torch.Tensor, cos_SDh: torch.Tensor, sin_SDh: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head by the position's angles: one
    autograd op with a hand-written backward (tables from `rope_tables`)."""
    return _RopeFunction.apply(x_BHSDh, cos_SDh, sin_SDh)


def _heads(x_NQ: torch.Tensor, B: int, Dh: int, first: int, num: int) -> torch.Tensor:
    """Heads [first, first + num) of the rows x_NQ (contiguous, N = B*S tokens, Q = heads x
    Dh) as [B, num, S, Dh]: one strided view where a view, a split and a transpose take three."""
    N, Q = x_NQ.shape
    S = N // B
    return x_NQ.as_strided((B, num, S, Dh), (S * Q, Dh, Q, 1), x_NQ.storage_offset() + first * Dh)


def _rows(o_BHSDh: torch.Tensor) -> torch.Tensor:
    """The flash kernel's output [B, H, S, Dh] (memory order [B, S, H, Dh]) as rows [B*S, H*Dh]:
    one view (a transpose and a view otherwise)."""
    B, H, S, Dh = o_BHSDh.shape
    if o_BHSDh.stride() != (S * H * Dh, Dh, H * Dh, 1):
        return o_BHSDh.transpose(1, 2).reshape(B * S, H * Dh)
    return o_BHSDh.as_strided((B * S, H * Dh), (H * Dh, 1))


@dataclass(frozen=True)
class _CpuAttentionArgs:
    """The non-tensor arguments of `_CpuAttention`."""

    num_heads: int  # Hl
    num_groups: int  # Gl
    scale: float | None
    wgrads: tuple  # gradient-accumulation targets (linear.py) of [wq; wk; wv] and wo, or None
    w_DQ: torch.Tensor  # [wq; wk; wv]^T (a view made once where the weights lie side by side)
    wo_QD: torch.Tensor  # wo^T (a view made once)
    norm_eps: tuple | None = None  # the block's two RMSNorms' eps (0-d tensors; with `norms`)


class _CpuAttention(torch.autograd.Function):
    """The whole attention of one layer on CPU (no cp, no q/k norm, no biases) as one op:
        qkv = x W_qkv^T, rope on q and k, causal SDPA (its CPU flash kernel, GQA native),
        out = o W_o^T
    with a hand-written backward that calls the kernels autograd would call (the flash
    kernel's own backward, the same GEMMs, the rotation of `_RopeFunction`), so the numbers are
    those of the op-by-op path. Layouts: the flash kernel returns o and takes/returns
    gradients in [B, S, H, Dh] memory order, so every [B, S, .] <-> [B, H, S, Dh] change is a
    free transpose.
    With the block's two RMSNorm weights (`Attention.block`) it is the layer's whole attention
    half: h = norm1(x), x1 = x + attention(h) (the residual added by the output GEMM, one
    `addmm`), h2 = norm2(x1), returning (x1, h2); its backward adds the residual stream's
    gradient inside the norms' last op (`norm.rms_norm_backward`), where autograd would add
    the two branches' gradients with one more op per residual (issue 12)."""

    @staticmethod
    def forward(ctx, x, w_QD, wo_DQ, norm1_D, norm2_D, cos_SDh, sin_SDh, args: _CpuAttentionArgs):
        S, D = cos_SDh.shape[0], x.shape[-1]
        B = x.shape[0] if x.dim() == 3 else x.shape[0] // S
        Hl, Gl = args.num_heads, args.num_groups
        x_ND = x if x.dim() == 2 else x.reshape(B * S, D)  # x_BSD or the flat x_ND
        block = norm1_D is not None
        h_ND, xhat1_ND, rstd1_N1 = rms_norm_forward(x_ND, norm1_D, args.norm_eps[0]) if block else (x_ND, None, None)
        qkv_NQ = torch.mm(h_ND, args.w_DQ)
        q, k = _rotate(_heads(qkv_NQ, B, cos_SDh.shape[1], 0, Hl + Gl), cos_SDh, sin_SDh).split([Hl, Gl], dim=1)
        v = _heads(qkv_NQ, B, cos_SDh.shape[1], Hl + Gl, Gl)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=args.scale)
        o_NQ = _rows(o)
        ctx.args = args
        if not block:
            ctx.save_for_backward(h_ND, w_QD, wo_DQ, cos_SDh, sin_SDh, q, k, v, o, lse, o_NQ)
            out_ND = torch.mm(o_NQ, args.wo_QD)
            return out_ND if x.dim() == 2 else out_ND.view(B, S, D)
        x1_ND = torch.addmm(x_ND, o_NQ, args.wo_QD)
        h2_ND, xhat2_ND, rstd2_N1 = rms_norm_forward(x1_ND, norm2_D, args.norm_eps[1])
        ctx.save_for_backward(h_ND, w_QD, wo_DQ, cos_SDh, sin_SDh, q, k, v, o, lse, o_NQ,
                              norm1_D, xhat1_ND, rstd1_N1, norm2_D, xhat2_ND, rstd2_N1)
        if x.dim() == 2:
            return x1_ND, h2_ND
        return x1_ND.view(B, S, D), h2_ND.view(B, S, D)

    @staticmethod
    def backward(ctx, g, g_h2=None):
        h_ND, w_QD, wo_DQ, cos_SDh, sin_SDh, q, k, v, o, lse, o_NQ, *norms = ctx.saved_tensors
        args, needs = ctx.args, ctx.needs_input_grad
        B, S, D = q.shape[0], q.shape[2], g.shape[-1]
        g_ND = g if g.dim() == 2 else g.reshape(B * S, D)
        g_norm2 = None
        if norms:  # g_ND: the gradient of x1 from both branches
            norm1_D, xhat1_ND, rstd1_N1, norm2_D, xhat2_ND, rstd2_N1 = norms
            g_h2_ND = g_h2 if g_h2.dim() == 2 else g_h2.reshape(B * S, D)
            g_ND, g_norm2 = rms_norm_backward(g_h2_ND, xhat2_ND, rstd2_N1, norm2_D, need_w=needs[4],
                                              residual_ND=g_ND)
        g_wo = add_weight_grad(args.wgrads[1], g_ND, o_NQ)
        g_o = _heads(torch.mm(g_ND, wo_DQ), B, q.shape[3], 0, q.shape[1])
        g_q, g_k, g_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g_o, q, k, v, o, lse, 0.0, True, scale=args.scale)
        g_qk = _rotate_grad(torch.cat([g_q, g_k], dim=1), cos_SDh, sin_SDh)
        g_qkv_NQ = torch.cat([g_qk.transpose(1, 2), g_v.transpose(1, 2)], dim=2).view(B * S, -1)
        g_w = add_weight_grad(args.wgrads[0], g_qkv_NQ, h_ND)
        g_x = torch.mm(g_qkv_NQ, w_QD)
        g_norm1 = None
        if norms:  # the residual: x's gradient is x1's plus the norm's
            g_x, g_norm1 = rms_norm_backward(g_x, xhat1_ND, rstd1_N1, norm1_D, need_w=needs[3], residual_ND=g_ND)
        return g_x if g.dim() == 2 else g_x.view(B, S, D), g_w, g_wo, g_norm1, g_norm2, None, None, None


def cp_positions(seq_len: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions held by cp rank `cp_rank`: chunks cp_rank and 2*cp-1-cp_rank of 2*cp.

    Example: seq_len 8, cp 2: rank 0 -> [0, 1, 6, 7], rank 1 -> [2, 3, 4, 5].
    """
    if cp == 1:
        return torch.arange(seq_len, device=device)
    if seq_len % (2 * cp):
        raise ValueError(f"2*cp={2 * cp} does not divide seq_length={seq_len}")
    c = seq_len // (2 * cp)
    a, b = cp_rank * c, (2 * cp - 1 - cp_rank) * c
    return torch.cat([torch.arange(a, a + c, device=device), torch.arange(b, b + c, device=device)])


def cp_gather(x_BGSDh: torch.Tensor, cp_group, counter: CommCounter | None) -> torch.Tensor:
    """All-gather [B, G, S, Dh] over cp along the sequence (rank order; the backward
    reduce-scatters the gradient)."""
    S = x_BGSDh.shape[2]
    x_SBGDh = all_gather_v(x_BGSDh.permute(2, 0, 1, 3), [S] * cp_group.size, cp_group, counter, "cp")
    return x_SBGDh.permute(1, 2, 0, 3)


def attention_core(q, k, v, mask_SSk: torch.Tensor | None, scale: float | None = None):
    """Causal SDPA (plain causal without cp; with cp the position mask); `scale` None =
    1 / sqrt(q/k head dim). k and v may hold fewer heads than q (GQA: each k/v head serves
    H / G consecutive query heads), which SDPA expands itself (`enable_gqa`) instead of a
    repeat_interleave copy."""
    gqa = k.shape[1] != q.shape[1]
    if mask_SSk is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SSk, scale=scale, enable_gqa=gqa)


class Attention(nn.Module):
    """GQA self-attention with RoPE (causal); heads split over tp, sequence over cp."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, counter: CommCounter | None = None,
                 selective_recompute: bool = False, arch: ArchOptions | None = None):
        super().__init__()
        arch = arch or ArchOptions()
        H, G, Dh, D = spec.num_attention_heads, spec.query_groups, spec.head_dim, spec.hidden_size
        tp = dims.group("tp")
        if G % tp.size:
            raise ValueError(f"tp={tp.size} does not divide num_query_groups={G}")
        self.Hl, self.Gl, self.Dh = H // tp.size, G // tp.size, Dh
        bias = spec.add_qkv_bias
        self.wq = nn.Linear(D, self.Hl * Dh, bias=bias)
        self.wk = nn.Linear(D, self.Gl * Dh, bias=bias)
        self.wv = nn.Linear(D, self.Gl * Dh, bias=bias)
        self.wo = nn.Linear(self.Hl * Dh, D, bias=False)
        for lin in (self.wq, self.wk, self.wv):
            mark_tp(lin.weight, 0, 1, tp)
            if bias:
                mark_tp(lin.bias, 0, 1, tp)
        mark_tp(self.wo.weight, 1, 1, tp)
        self.q_norm = self.k_norm = None
        if spec.qk_layernorm:
            self.q_norm, self.k_norm = RMSNorm(Dh, arch.qk_norm_eps), RMSNorm(Dh, arch.qk_norm_eps)
        self.cp_group, self.counter = dims.group("cp"), counter
        self.selective_recompute = selective_recompute
        factor = arch.softmax_scale_factor
        self.scale = None if factor == 1.0 else factor / Dh**0.5

    def _fused(self, x_BSD: torch.Tensor) -> bool:
        """Whether the layer runs as one `_CpuAttention` op: on CPU, without cp, q/k norms,
        biases, selective recompute or autocast (those run op by op below)."""
        return (x_BSD.device.type == "cpu" and self.cp_group.size == 1 and self.q_norm is None
                and self.wq.bias is None and not self.selective_recompute
                and not torch.is_autocast_enabled("cpu"))

    def _fused_args(self, norm_eps: tuple | None = None):
        """(w_QD, wo_DQ, args) of `_CpuAttention`. With the weights' gradients accumulated in
        the optimizer's buffer and wq, wk, wv side by side in its flat parameter buffer
        (optimizer.py), w_QD is their view there, made once; else one cat per call."""
        weights = [self.wq.weight, self.wk.weight, self.wv.weight]
        wgrads = (accumulation_target(weights), accumulation_target([self.wo.weight]))
        w_QD = stacked_view(weights) if wgrads[0] is not None else None
        if w_QD is None:
            w_QD = torch.cat(weights)
        return w_QD, self.wo.weight, _CpuAttentionArgs(self.Hl, self.Gl, self.scale, wgrads, transposed(w_QD),
                                                       transposed(self.wo.weight), norm_eps)

    def block(self, x: torch.Tensor, norm1: RMSNorm, norm2: RMSNorm, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half of a pre-norm layer without tp, x -> (x1, norm2(x1)) with
        x1 = x + attention(norm1(x)): one `_CpuAttention` where `_fused`, else op by op."""
        if not self._fused(x):
            x1 = x + self(norm1(x), rope, None)
            return x1, norm2(x1)
        w_QD, wo_DQ, args = self._fused_args((norm1.eps_t, norm2.eps_t))
        return _CpuAttention.apply(x, w_QD, wo_DQ, norm1.weight_D, norm2.weight_D, *rope, args)

    def _core(self, q, k, v, mask_SSk):
        return attention_core(q, k, v, mask_SSk, self.scale)

    def _gather_cp(self, x_BGSDh: torch.Tensor) -> torch.Tensor:
        return cp_gather(x_BGSDh, self.cp_group, self.counter)

    def forward(self, x_BSD: torch.Tensor, rope, mask_SSk: torch.Tensor | None) -> torch.Tensor:
        """Partial (row-parallel) output [B, S, D]; `rope` = (cos, sin) at the local positions,
        `mask_SSk` the cp position mask (None without cp: plain causal). A flat x_ND (N = B*S
        tokens, the model's residual stream without tp) gives a flat output."""
        cos_SDh, sin_SDh = rope
        S = cos_SDh.shape[0]
        B = x_BSD.shape[0] if x_BSD.dim() == 3 else x_BSD.shape[0] // S
        if self._fused(x_BSD):
            w_QD, wo_DQ, args = self._fused_args()
            return _CpuAttention.apply(x_BSD, w_QD, wo_DQ, None, None, cos_SDh, sin_SDh, args)
        # One GEMM for q, k and v: the three weights (and biases) side by side.
        w_QD = torch.cat([self.wq.weight, self.wk.weight, self.wv.weight])
        b_Q = torch.cat([self.wq.bias, self.wk.bias, self.wv.bias]) if self.wq.bias is not None else None
        qkv = linear(x_BSD, w_QD, b_Q).view(B, S, self.Hl + 2 * self.Gl, self.Dh)
        qk_BSXDh, v = qkv.split([self.Hl + self.Gl, self.Gl], dim=2)  # X = Hl + Gl
        if self.q_norm is not None:
            q, k = qk_BSXDh.split([self.Hl, self.Gl], dim=2)
            qk_BSXDh = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        # q and k rotated together: one rope op for both.
        q, k = apply_rope(qk_BSXDh.transpose(1, 2), cos_SDh, sin_SDh).split([self.Hl, self.Gl], dim=1)
        v = v.transpose(1, 2)
        if self.cp_group.size > 1:
            k, v = self._gather_cp(k), self._gather_cp(v)
        if self.selective_recompute and torch.is_grad_enabled():
            o = checkpoint(self._core, q, k, v, mask_SSk, use_reentrant=False)
        else:
            o = self._core(q, k, v, mask_SSk)
        lead = (B, S) if x_BSD.dim() == 3 else (B * S,)
        return linear(o.transpose(1, 2).reshape(*lead, self.Hl * self.Dh), self.wo.weight)
