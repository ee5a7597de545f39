"""RMSNorm, the one normalisation of the executor's models (layers, final, q/k, MLA latents)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, computed in fp32 (transformers' order:
    normalise in fp32, cast back, then scale)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight_D = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight_D
