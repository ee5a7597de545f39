"""Decoder-only MoE transformer built from a ModelSpec.

Legend: B sequences, S sequence length, D model dim, H query heads, G key/value groups,
Dh head dim, V vocabulary.

Layer: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)) with FFN = MoE on the layers of
`ModelSpec.moe_layer_pattern()` and a dense SwiGLU MLP elsewhere. RoPE on q and k, GQA with G
key/value heads, causal attention, final RMSNorm, output layer (untied unless the spec ties it).
Only parallelism that needs no change inside attention is supported here (DP, EP, ETP); the
next issue adds TP/SP (column/row-parallel linears), CP (sequence split of attention) and PP
(a stage owns a slice of `self.layers`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cost_model.specs import ModelSpec

from .comm import CommCounter
from .init import normal
from .mlp import MLP
from .moe import MoELayer
from .parallel_dims import ParallelDims
from .router import RouterConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight_D = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight_D


def rope_tables(seq_len: int, head_dim: int, base: float = 10000.0, device=None):
    """cos/sin tables [S, Dh/2] for rotary embeddings."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles_SF = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return angles_SF.cos(), angles_SF.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of each head by the position's angles."""
    x1, x2 = x_BHSDh[..., 0::2].float(), x_BHSDh[..., 1::2].float()
    out = torch.stack([x1 * cos_SF - x2 * sin_SF, x1 * sin_SF + x2 * cos_SF], dim=-1)
    return out.flatten(-2).to(x_BHSDh.dtype)


class Attention(nn.Module):
    """GQA self-attention with RoPE (causal)."""

    def __init__(self, spec: ModelSpec, selective_recompute: bool = False):
        super().__init__()
        H, G, Dh, D = spec.num_attention_heads, spec.query_groups, spec.head_dim, spec.hidden_size
        self.H, self.G, self.Dh = H, G, Dh
        self.wq = nn.Linear(D, H * Dh, bias=False)
        self.wk = nn.Linear(D, G * Dh, bias=False)
        self.wv = nn.Linear(D, G * Dh, bias=False)
        self.wo = nn.Linear(H * Dh, D, bias=False)
        self.selective_recompute = selective_recompute

    @staticmethod
    def _core(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x_BSD: torch.Tensor, cos_SF, sin_SF) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.H, self.Dh).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, self.G, self.Dh).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.G, self.Dh).transpose(1, 2)
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        if self.G != self.H:
            k = k.repeat_interleave(self.H // self.G, dim=1)
            v = v.repeat_interleave(self.H // self.G, dim=1)
        if self.selective_recompute and torch.is_grad_enabled():
            o = checkpoint(self._core, q, k, v, use_reentrant=False)
        else:
            o = self._core(q, k, v)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.H * self.Dh))


class Block(nn.Module):
    """Pre-norm transformer layer; forward returns (x, router loss share, dropped pairs)."""

    def __init__(self, spec: ModelSpec, is_moe: bool, dims: ParallelDims, counter, router_config,
                 dispatcher: str, kernel_backend: str, recompute: str):
        super().__init__()
        self.attn_norm = RMSNorm(spec.hidden_size)
        self.attn = Attention(spec, selective_recompute=recompute == "selective")
        self.ffn_norm = RMSNorm(spec.hidden_size)
        self.is_moe = is_moe
        if is_moe:
            self.ffn = MoELayer(spec, dims, counter, router_config, dispatcher, kernel_backend)
        else:
            self.ffn = MLP(spec.hidden_size, spec.ffn_hidden_size, spec.swiglu)

    def forward(self, x_BSD, cos_SF, sin_SF):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SF, sin_SF)
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:
            out = self.ffn(h_BSD)
            return x_BSD + out.out_BSD, out.aux_loss, out.num_dropped
        return x_BSD + self.ffn(h_BSD), x_BSD.new_zeros((), dtype=torch.float32), 0


class MoETransformer(nn.Module):
    """The whole model on one rank (experts sharded per `dims`)."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, counter: CommCounter | None = None,
                 router_config: RouterConfig | None = None, dispatcher: str = "alltoall",
                 kernel_backend: str = "torch", recompute: str = "none"):
        super().__init__()
        if spec.multi_latent_attention:
            raise NotImplementedError("multi-latent attention (MLA) is not supported by the executor yet")
        self.spec, self.recompute = spec, recompute
        router_config = router_config or RouterConfig()
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(
            Block(spec, bool(m), dims, counter, router_config, dispatcher, kernel_backend, recompute)
            for m in spec.moe_layer_pattern()
        )
        self.norm = RMSNorm(spec.hidden_size)
        self.output = None
        if spec.untie_embeddings_and_output_weights:
            self.output = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Mapping-independent init (see init.py): N(0, 0.02) linears, ones for norms."""
        for name, module in self.named_modules():
            if hasattr(module, "init_from_seed"):
                module.init_from_seed(seed, name)
        for name, p in self.named_parameters():
            if getattr(p, "is_expert", False):
                continue
            if name.endswith("weight_D"):
                p.fill_(1.0)
            else:
                p.copy_(normal(tuple(p.shape), seed, name).to(p.device))

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor):
        """(sum of token cross-entropies, this rank's router loss share, dropped pairs)."""
        S = tokens_BS.shape[1]
        cos_SF, sin_SF = rope_tables(S, self.spec.head_dim, device=tokens_BS.device)
        x_BSD = self.embed(tokens_BS)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        dropped = 0
        for layer in self.layers:
            if self.recompute == "full" and torch.is_grad_enabled():
                x_BSD, a, d = checkpoint(layer, x_BSD, cos_SF, sin_SF, use_reentrant=False)
            else:
                x_BSD, a, d = layer(x_BSD, cos_SF, sin_SF)
            aux, dropped = aux + a, dropped + d
        x_BSD = self.norm(x_BSD)
        weight_VD = self.output.weight if self.output is not None else self.embed.weight
        logits_BSV = F.linear(x_BSD, weight_VD).float()
        ce_sum = F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten(), reduction="sum")
        return ce_sum, aux, dropped
