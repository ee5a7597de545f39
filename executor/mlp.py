"""Dense feed-forward block (SwiGLU or GELU); used for dense layers and shared experts.

Legend: T tokens (any leading dims), D model dim, F FFN size.
TP hook for the next issue: w_in is column-parallel, w_out row-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """w_out(silu(gate) * up) for SwiGLU, w_out(gelu(w_in x)) otherwise."""

    def __init__(self, hidden_size: int, ffn_size: int, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.w_in_DF = nn.Linear(hidden_size, (2 if gated else 1) * ffn_size, bias=False)
        self.w_out_FD = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h_TF = self.w_in_DF(x_TD)
        if self.gated:
            gate_TF, up_TF = h_TF.chunk(2, dim=-1)
            h_TF = F.silu(gate_TF) * up_TF
        else:
            h_TF = F.gelu(h_TF)
        return self.w_out_FD(h_TF)
