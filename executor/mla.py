"""Multi-latent attention (MLA, DeepSeek-V2/V3), split by heads over tp and by sequence over cp.

Legend: B sequences, S this rank's sequence (the cp shard, gathered over tp), Sk keys after the
cp gather, H heads, Hl = H / tp local heads, D model dim, Lq / Lkv the query / key-value
latent ranks (`q_lora_rank`, `kv_lora_rank`), Dn the per-head q/k dim without RoPE
(`qk_head_dim`), Dr the RoPE dim (`qk_pos_emb_head_dim`), Dv the value head dim.

    q      = q_b(RMSNorm(q_a(x)))                 [B, S, Hl, Dn + Dr]  (q = q_proj(x) without Lq)
    c, kr  = split(kv_a(x), [Lkv, Dr]);  c = RMSNorm(c)        one latent and one RoPE key per token
    k, v   = split(kv_b(c), [Dn, Dv]) per head;  k = [k, rope(kr)] (kr shared by all heads)
    out    = wo(softmax(q k^T / sqrt(Dn + Dr)) v)

Tensor parallelism: q_a, kv_a and the latent norms are replicated (every tp rank computes them
on the gathered sequence; each rank's gradient covers its own heads, and the trainer sums
replicated gradients over tp_cp_dp, which includes tp); q_b (or q_proj) and kv_b are
column-parallel by heads, wo row-parallel. Context parallelism: the normalised latent and the
rotated RoPE key, [B, S, Lkv + Dr], are all-gathered over cp (cheaper than gathering the
expanded per-head K and V) and expanded locally; the backward reduce-scatters their gradient.
RoPE rotates interleaved pairs, as DeepSeek's `rope_interleave` checkpoints expect; a
rotate-half checkpoint is permuted on load (hf_checkpoint.py). The softmax scale is
1 / sqrt(Dn + Dr), times DeepSeek's YaRN correction mscale^2 when the config asks for it
(`ArchOptions.softmax_scale_factor`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cost_model.specs import ModelSpec

from .arch import ArchOptions
from .attention import apply_rope, attention_core, cp_gather
from .comm import CommCounter
from .norm import RMSNorm
from .parallel_dims import ParallelDims
from .tensor_parallel import mark_tp


class MultiLatentAttention(nn.Module):
    """MLA with the spec's ranks and head dims (module docstring)."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, counter: CommCounter | None = None,
                 selective_recompute: bool = False, arch: ArchOptions | None = None):
        super().__init__()
        arch = arch or ArchOptions()
        tp = dims.group("tp")
        H, D = spec.num_attention_heads, spec.hidden_size
        if H % tp.size:
            raise ValueError(f"tp={tp.size} does not divide num_attention_heads={H}")
        self.Hl = H // tp.size
        self.Dn, self.Dr, self.Dv = spec.qk_head_dim, spec.qk_pos_emb_head_dim, spec.v_head_dim
        self.Lkv = spec.kv_lora_rank
        Dq = self.Dn + self.Dr
        if spec.q_lora_rank:
            self.q_a = nn.Linear(D, spec.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(spec.q_lora_rank, arch.latent_norm_eps)
            self.q_b = nn.Linear(spec.q_lora_rank, self.Hl * Dq, bias=False)
            mark_tp(self.q_b.weight, 0, 1, tp)
        else:
            self.q_proj = nn.Linear(D, self.Hl * Dq, bias=False)
            mark_tp(self.q_proj.weight, 0, 1, tp)
        self.kv_a = nn.Linear(D, self.Lkv + self.Dr, bias=False)
        self.kv_a_norm = RMSNorm(self.Lkv, arch.latent_norm_eps)
        self.kv_b = nn.Linear(self.Lkv, self.Hl * (self.Dn + self.Dv), bias=False)
        self.wo = nn.Linear(self.Hl * self.Dv, D, bias=False)
        mark_tp(self.kv_b.weight, 0, 1, tp)
        mark_tp(self.wo.weight, 1, 1, tp)
        self.cp_group, self.counter = dims.group("cp"), counter
        self.selective_recompute = selective_recompute
        factor = arch.softmax_scale_factor  # DeepSeek's YaRN correction (arch.py)
        self.scale = None if factor == 1.0 else factor / Dq**0.5

    def forward(self, x_BSD: torch.Tensor, rope, mask_SSk: torch.Tensor | None) -> torch.Tensor:
        """Partial (row-parallel) output [B, S, D]; `rope` = (cos, sin) [S, Dr] at the local
        positions, `mask_SSk` the cp position mask (None without cp: plain causal)."""
        B, S, _ = x_BSD.shape
        cos_SDr, sin_SDr = rope
        if hasattr(self, "q_a"):
            q_BSQ = self.q_b(self.q_a_norm(self.q_a(x_BSD)))
        else:
            q_BSQ = self.q_proj(x_BSD)
        q_BHSQ = q_BSQ.view(B, S, self.Hl, self.Dn + self.Dr).transpose(1, 2)
        q_nope, q_rot = q_BHSQ.split([self.Dn, self.Dr], dim=-1)
        q_BHSQ = torch.cat([q_nope, apply_rope(q_rot, cos_SDr, sin_SDr)], dim=-1)
        c_BSL, k_rot_BSR = self.kv_a(x_BSD).split([self.Lkv, self.Dr], dim=-1)
        k_rot_B1SR = apply_rope(k_rot_BSR.unsqueeze(1), cos_SDr, sin_SDr)
        latent_B1SX = torch.cat([self.kv_a_norm(c_BSL).unsqueeze(1), k_rot_B1SR], dim=-1)
        if self.cp_group.size > 1:
            latent_B1SX = cp_gather(latent_B1SX, self.cp_group, self.counter)
        c_BSkL, k_rot_B1SkR = latent_B1SX.squeeze(1).split([self.Lkv, self.Dr], dim=-1)
        Sk = c_BSkL.shape[1]
        kv_BHSkX = self.kv_b(c_BSkL).view(B, Sk, self.Hl, self.Dn + self.Dv).transpose(1, 2)
        k_nope, v_BHSkV = kv_BHSkX.split([self.Dn, self.Dv], dim=-1)
        k_BHSkQ = torch.cat([k_nope, k_rot_B1SkR.unsqueeze(1).expand(B, self.Hl, Sk, self.Dr)], dim=-1)
        if self.selective_recompute and torch.is_grad_enabled():
            o = checkpoint(attention_core, q_BHSQ, k_BHSkQ, v_BHSkV, mask_SSk, self.scale,
                           use_reentrant=False)
        else:
            o = attention_core(q_BHSQ, k_BHSkQ, v_BHSkV, mask_SSk, self.scale)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.Hl * self.Dv))
