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

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cost_model.specs import ModelSpec

from .arch import ArchOptions, YarnRope
from .comm import CommCounter, all_gather_v
from .norm import RMSNorm
from .parallel_dims import ParallelDims
from .tensor_parallel import mark_tp


def rope_tables(positions_S: torch.Tensor, head_dim: int, base: float = 10000.0,
                yarn: YarnRope | None = None):
    """cos/sin tables [S, Dh/2] for rotary embeddings at the given positions (with YaRN: its
    inverse frequencies, and cos/sin times its attention factor, arch.YarnRope)."""
    if yarn is None:
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions_S.device, dtype=torch.float32) / head_dim)
    else:
        inv = yarn.inv_freq(head_dim, base).to(positions_S.device)
    angles_SF = positions_S.float()[:, None] * inv[None, :]
    if yarn is None or yarn.attention_factor == 1.0:
        return angles_SF.cos(), angles_SF.sin()
    return angles_SF.cos() * yarn.attention_factor, angles_SF.sin() * yarn.attention_factor


def apply_rope(x_BHSDh: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head by the position's angles."""
    x1, x2 = x_BHSDh[..., 0::2].float(), x_BHSDh[..., 1::2].float()
    out = torch.stack([x1 * cos_SF - x2 * sin_SF, x1 * sin_SF + x2 * cos_SF], dim=-1)
    return out.flatten(-2).to(x_BHSDh.dtype)


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
    1 / sqrt(q/k head dim)."""
    if mask_SSk is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SSk, scale=scale)


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

    def _core(self, q, k, v, mask_SSk):
        return attention_core(q, k, v, mask_SSk, self.scale)

    def _gather_cp(self, x_BGSDh: torch.Tensor) -> torch.Tensor:
        return cp_gather(x_BGSDh, self.cp_group, self.counter)

    def forward(self, x_BSD: torch.Tensor, rope, mask_SSk: torch.Tensor | None) -> torch.Tensor:
        """Partial (row-parallel) output [B, S, D]; `rope` = (cos, sin) at the local positions,
        `mask_SSk` the cp position mask (None without cp: plain causal)."""
        B, S, _ = x_BSD.shape
        cos_SF, sin_SF = rope
        q = self.wq(x_BSD).view(B, S, self.Hl, self.Dh)
        k = self.wk(x_BSD).view(B, S, self.Gl, self.Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.Gl, self.Dh).transpose(1, 2)
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        if self.cp_group.size > 1:
            k, v = self._gather_cp(k), self._gather_cp(v)
        if self.Gl != self.Hl:
            k = k.repeat_interleave(self.Hl // self.Gl, dim=1)
            v = v.repeat_interleave(self.Hl // self.Gl, dim=1)
        if self.selective_recompute and torch.is_grad_enabled():
            o = checkpoint(self._core, q, k, v, mask_SSk, use_reentrant=False)
        else:
            o = self._core(q, k, v, mask_SSk)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.Hl * self.Dh))
