"""Counting sort of (token, k) pairs by expert: no comparison sort needed.

Legend: T tokens, K top-k, E experts, N = kept pairs.

With a flattened index idx_P (P = T*K, token-major so the sort is stable by token) the row of
pair p in the expert-sorted order is
    dest[p] = offset[idx[p]] + #{q < p : idx[q] == idx[p]}
where offset = exclusive cumsum of bincount(idx). The second term is a running count, taken
from a cumsum over the one-hot matrix (E x P; fine for the E of one rank: above
COUNTING_LIMIT entries a stable sort of the keys is used instead).
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
    src_pair_N: torch.Tensor  # flat pair index t * K + k of each permuted row (inverse of dest)

    @property
    def src_token_N(self) -> torch.Tensor:
        return self.src_pair_N // self.dest_TK.shape[1]


# Above this many one-hot entries (pairs x experts) a stable sort is cheaper than counting.
COUNTING_LIMIT = 1 << 21


def routing_index(indices_TK: torch.Tensor, num_experts: int) -> RoutingIndex:
    """Stable sort of `indices_TK` (expert id per pair, -1 = dropped) into expert order.

    Counting sort (bincount + cumsum) when P * E <= COUNTING_LIMIT, else a stable sort of
    the keys; both give the same `dest_TK`.
    """
    idx_P = indices_TK.reshape(-1).long()
    P = idx_P.numel()
    valid_P = idx_P >= 0
    tokens_per_expert_E = torch.bincount(idx_P[valid_P], minlength=num_experts)
    num_rows = int(tokens_per_expert_E.sum())
    dest_P = torch.full_like(idx_P, -1)
    if P * num_experts <= COUNTING_LIMIT:
        safe_P = idx_P.clamp(min=0)
        offset_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        # E x P layout so the running count is a contiguous cumsum along each expert's row.
        hit_EP = idx_P[None, :] == torch.arange(num_experts, device=idx_P.device)[:, None]
        running_EP = torch.cumsum(hit_EP, 1, dtype=torch.int32)
        within_P = running_EP.gather(0, safe_P[None, :]).squeeze(0).long() - 1
        dest_P = torch.where(valid_P, offset_E[safe_P] + within_P, dest_P)
        src_pair_N = torch.empty(num_rows, dtype=torch.int64, device=idx_P.device)
        src_pair_N[dest_P[valid_P]] = torch.arange(P, device=idx_P.device)[valid_P]
    else:
        key_P = torch.where(valid_P, idx_P, torch.full_like(idx_P, num_experts))
        order_P = torch.sort(key_P, stable=True).indices
        src_pair_N = order_P[:num_rows]
        dest_P[src_pair_N] = torch.arange(num_rows, device=idx_P.device)
    return RoutingIndex(dest_P.view(indices_TK.shape), tokens_per_expert_E, num_rows, src_pair_N)
