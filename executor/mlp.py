"""Dense feed-forward block (SwiGLU or GELU); used for dense layers and shared experts.

Legend: T tokens of this rank (the sequence-parallel shard), Tg = T * tp tokens after the tp
gather, D model dim, F FFN size, Fl = F / tp this rank's FFN shard.
Tensor parallelism: w_in is column-parallel (for SwiGLU the gate and up halves are split one by
one), w_out row-parallel; tokens are all-gathered over tp before and the partial outputs
reduce-scattered after (see tensor_parallel.py). Per-token math, so token order is free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .comm import CommCounter
from .parallel_dims import Group
from .tensor_parallel import mark_tp, token_gather, token_scatter

_ONE = Group((0,), None, 0)


class MLP(nn.Module):
    """w_out(silu(gate) * up) for SwiGLU, w_out(gelu(w_in x)) otherwise."""

    def __init__(self, hidden_size: int, ffn_size: int, gated: bool = True, tp: Group = _ONE,
                 counter: CommCounter | None = None):
        super().__init__()
        if ffn_size % tp.size:
            raise ValueError(f"tp={tp.size} does not divide the FFN size {ffn_size}")
        self.gated, self.tp, self.counter = gated, tp, counter
        local = ffn_size // tp.size
        self.w_in_DF = nn.Linear(hidden_size, (2 if gated else 1) * local, bias=False)
        self.w_out_FD = nn.Linear(local, hidden_size, bias=False)
        mark_tp(self.w_in_DF.weight, 0, 2 if gated else 1, tp)
        mark_tp(self.w_out_FD.weight, 1, 1, tp)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_TgD = token_gather(x_TD, self.tp, self.counter)
        h_TgF = self.w_in_DF(x_TgD)
        if self.gated:
            gate_TgF, up_TgF = h_TgF.chunk(2, dim=-1)
            h_TgF = F.silu(gate_TgF) * up_TgF
        else:
            h_TgF = F.gelu(h_TgF)
        return token_scatter(self.w_out_FD(h_TgF), self.tp, self.counter)
