"""Routed experts of one rank: one batched computation over all local experts.

Legend: M rows (tokens routed to local experts, sorted by expert), D model dim, El local
experts, F expert FFN size, Fs = F / etp this rank's FFN shard, Cm = max rows of one expert.

Sharding: expert e in [ep_rank * El, (ep_rank + 1) * El) lives on this EP rank; its FFN columns
[etp_rank * Fs, (etp_rank + 1) * Fs) live on this ETP rank, so fc2 yields a partial sum over
ETP that the dispatcher's reduce-scatter completes.
Compute: rows are scattered into a zero-padded [El, Cm, D] batch and multiplied with one bmm
per weight (padding rows stay zero and are never read back). No Python loop over experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import normal


class GroupedExperts(nn.Module):
    """SwiGLU (or GELU) experts, weights [El, D, 2Fs] and [El, Fs, D]."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, gated: bool, ep: int,
                 ep_rank: int, etp: int, etp_rank: int):
        super().__init__()
        if num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={num_experts}")
        if ffn_size % etp:
            raise ValueError(f"etp={etp} does not divide moe_ffn_hidden_size={ffn_size}")
        self.num_experts, self.hidden_size, self.ffn_size, self.gated = num_experts, hidden_size, ffn_size, gated
        self.num_local, self.shard = num_experts // ep, ffn_size // etp
        self.first_expert, self.first_col = ep_rank * self.num_local, etp_rank * self.shard
        width = 2 * self.shard if gated else self.shard
        self.w1_EDF = nn.Parameter(torch.empty(self.num_local, hidden_size, width))
        self.w2_EFD = nn.Parameter(torch.empty(self.num_local, self.shard, hidden_size))
        for p in self.parameters():
            p.is_expert = True  # gradients reduce over edp, not dp_cp

    @torch.no_grad()
    def init_from_seed(self, seed: int, prefix: str) -> None:
        """Draw the full [E, D, F] / [E, F, D] weights from the seed and keep this shard."""
        E, D, Fh = self.num_experts, self.hidden_size, self.ffn_size
        es = slice(self.first_expert, self.first_expert + self.num_local)
        cs = slice(self.first_col, self.first_col + self.shard)
        up = normal((E, D, Fh), seed, prefix + ".up")[es, :, cs]
        if self.gated:
            gate = normal((E, D, Fh), seed, prefix + ".gate")[es, :, cs]
            up = torch.cat([gate, up], dim=2)
        self.w1_EDF.copy_(up)
        self.w2_EFD.copy_(normal((E, Fh, D), seed, prefix + ".down")[es, cs, :])

    def forward(self, x_MD: torch.Tensor, tokens_per_expert: tuple[int, ...]) -> torch.Tensor:
        """Rows sorted by local expert (tokens_per_expert rows each) -> partial outputs y_MD."""
        assert len(tokens_per_expert) == self.num_local, (tokens_per_expert, self.num_local)
        M = x_MD.shape[0]
        if M == 0:
            # Keep every weight in the graph so gradient hooks and all-reduces stay uniform.
            return x_MD + 0 * (self.w1_EDF.sum() + self.w2_EFD.sum())
        counts_E = torch.tensor(tokens_per_expert, device=x_MD.device)
        cap = int(max(tokens_per_expert))
        expert_M = torch.repeat_interleave(torch.arange(self.num_local, device=x_MD.device), counts_E, output_size=M)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        pos_M = torch.arange(M, device=x_MD.device) - start_E[expert_M]
        x_ECD = x_MD.new_zeros(self.num_local, cap, x_MD.shape[1])
        x_ECD = x_ECD.index_put((expert_M, pos_M), x_MD)
        h_ECF = torch.bmm(x_ECD, self.w1_EDF.to(x_MD.dtype))
        if self.gated:
            gate_ECF, up_ECF = h_ECF.chunk(2, dim=-1)
            h_ECF = F.silu(gate_ECF) * up_ECF
        else:
            h_ECF = F.gelu(h_ECF)
        y_ECD = torch.bmm(h_ECF, self.w2_EFD.to(x_MD.dtype))
        return y_ECD[expert_M, pos_M]

    def full_shape(self, name: str) -> tuple[int, ...]:
        """Shape of parameter `name` in the unsharded (ep = etp = 1) model."""
        E, D, Fh = self.num_experts, self.hidden_size, self.ffn_size
        return (E, D, (2 if self.gated else 1) * Fh) if name == "w1_EDF" else (E, Fh, D)

    def shard_of_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of an unsharded (ep = etp = 1) tensor of parameter `name`.

        Used to compare sharded gradients with a single-rank reference."""
        es = slice(self.first_expert, self.first_expert + self.num_local)
        cs = slice(self.first_col, self.first_col + self.shard)
        if name == "w2_EFD":
            return full[es, cs, :]
        assert name == "w1_EDF", name
        if not self.gated:
            return full[es, :, cs]
        gate, up = full[es].chunk(2, dim=2)
        return torch.cat([gate[:, :, cs], up[:, :, cs]], dim=2)
