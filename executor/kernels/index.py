"""Counting sort of (token, k) pairs by expert: no comparison sort needed.

Legend: T tokens, K top-k, E experts, N = kept pairs.

With a flattened index idx_P (P = T*K, token-major so the sort is stable by token) the row of
pair p in the expert-sorted order is
    dest[p] = offset[idx[p]] + #{q < p : idx[q] == idx[p]}
where offset = exclusive cumsum of bincount(idx). The second term is a running count, taken
from a cumsum over the one-hot matrix (P x E integers; fine for the E of one rank).
Worked example: idx = [1, 0, 1, 1] (T=2, K=2), E=2: counts [1, 3], offset [0, 1],
running [0, 0, 1, 2] -> dest = [1, 0, 2, 3].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingIndex:
    """Where each (token, k) pair goes in the expert-sorted order."""

    dest_TK: torch.Tensor  # int64, row in the permuted order, -1 when dropped
    tokens_per_expert_E: torch.Tensor  # int64 counts of kept pairs per expert
    num_rows: int  # N = tokens_per_expert_E.sum()


def routing_index(indices_TK: torch.Tensor, num_experts: int) -> RoutingIndex:
    """Counting sort of `indices_TK` (expert id per pair, -1 = dropped) into expert order."""
    idx_P = indices_TK.reshape(-1).long()
    valid_P = idx_P >= 0
    safe_P = torch.where(valid_P, idx_P, torch.zeros_like(idx_P))
    onehot_PE = torch.zeros(idx_P.numel(), num_experts, dtype=torch.int64, device=idx_P.device)
    onehot_PE[valid_P, safe_P[valid_P]] = 1
    tokens_per_expert_E = onehot_PE.sum(0)
    offset_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    running_PE = torch.cumsum(onehot_PE, 0) - onehot_PE
    within_P = running_PE.gather(1, safe_P[:, None]).squeeze(1)
    dest_P = torch.where(valid_P, offset_E[safe_P] + within_P, torch.full_like(idx_P, -1))
    return RoutingIndex(
        dest_P.view(indices_TK.shape), tokens_per_expert_E, int(tokens_per_expert_E.sum())
    )
