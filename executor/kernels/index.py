"""Counting sort of (token, k) pairs by expert: no comparison sort, no host read.

Legend: T tokens, K top-k, E experts, P = T*K pairs, N kept pairs, R rows of the permuted
buffer (R >= N).

With a flattened index idx_P (P = T*K, token-major so the sort is stable by token) the row of
pair p in the expert-sorted order is
    dest[p] = offset[idx[p]] + #{q < p : idx[q] == idx[p]}
where offset = exclusive cumsum of the per-expert counts. The second term is a running count,
taken from a cumsum over the one-hot matrix (E x P; fine for the E of one rank: above
COUNTING_LIMIT entries a stable sort of the keys is used instead).
Worked example: idx = [1, 0, 1, 1] (T=2, K=2), E=2: counts [1, 3], offset [0, 1],
running [0, 0, 1, 2] -> dest = [1, 0, 2, 3].

Buffer layouts (R rows; a row no pair fills is a *padding row*: its pair is the sentinel P,
its token T-1, its probability zero, see torch_ops.py; the Triton kernels leave it zero):
  exact     R = N: reads N to the host once (the only layout that does)
  static    R = P: kept rows first in expert order, padding rows after (dropless: none)
  capacity  R = E*C: expert e owns rows [e*C, (e+1)*C) (Megatron's pad-to-capacity), its
            kept pairs first; needs at most C kept pairs per expert (the router's drop rule)
Every step of static and capacity has shapes fixed by T, K, E and C: nothing is read back,
no op has a data-dependent output shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingIndex:
    """Where each (token, k) pair goes in the expert-sorted buffer."""

    dest_TK: torch.Tensor  # int64, row in the permuted buffer, -1 when dropped
    tokens_per_expert_E: torch.Tensor  # int64 counts of kept pairs per expert (device)
    offsets_E: torch.Tensor  # int32 end row of each expert's block: what the grouped GEMM takes
    num_rows: int  # R, rows of the permuted buffer
    src_pair_N: torch.Tensor  # flat pair index t * K + k of each row; P for a padding row
    src_token_N: torch.Tensor  # token of each row; T - 1 for a padding row
    capacity: int | None = None  # rows per expert in the capacity layout, else None
    padded: bool = False  # whether the buffer may hold padding rows


# Above this many one-hot entries (pairs x experts) a stable sort is cheaper than counting.
COUNTING_LIMIT = 1 << 21


def expert_counts(idx_P: torch.Tensor, num_experts: int, *, with_dropped: bool = True) -> torch.Tensor:
    """Pairs per expert (int64, length E), ignoring -1: a scatter-add with a static shape
    (unlike bincount, whose length depends on the largest value). `with_dropped=False`
    promises no -1 (a router's choice before capacity dropping) and skips the extra slot."""
    if not with_dropped:
        counts = torch.zeros(num_experts, dtype=torch.int64, device=idx_P.device)
        return counts.scatter_add_(0, idx_P, torch.ones_like(idx_P))
    slot_P = torch.where(idx_P >= 0, idx_P, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx_P.device)
    return counts.scatter_add_(0, slot_P, torch.ones_like(slot_P))[:num_experts]


def routing_index(indices_TK: torch.Tensor, num_experts: int, *, static: bool = False,
                  capacity: int | None = None, dropless: bool = False) -> RoutingIndex:
    """Stable sort of `indices_TK` (expert id per pair, -1 = dropped) into expert order.

    Layout (module docstring): exact by default, `static=True` for R = T*K rows, `capacity=C`
    for E*C rows. `dropless=True` promises that no pair is -1, so a static buffer has no
    padding rows and the permute kernels skip the zero row. Counting sort (cumsum over
    one-hot rows) when 0 < P * E <= COUNTING_LIMIT, else a stable sort of the keys; both
    give the same `dest_TK`.
    """
    idx_P = indices_TK.reshape(-1).long()
    P, E, dev = idx_P.numel(), num_experts, idx_P.device
    counting = 0 < P * E <= COUNTING_LIMIT
    if counting:
        # E x P one-hot (a -1 matches no expert); its running count along each expert's row
        # is the rank of a pair within its expert, and the last column the expert's count.
        running_EP = torch.cumsum(idx_P[None, :] == torch.arange(E, device=dev)[:, None], 1)
        tokens_per_expert_E = running_EP[:, -1]
    else:
        tokens_per_expert_E = expert_counts(idx_P, E)
    # end row of each expert's block; its first row minus one (the running count starts at 1)
    if capacity is not None:
        R = E * capacity
        offsets_E = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * capacity
        base_E = offsets_E - (capacity + 1)
    else:
        offsets_E = torch.cumsum(tokens_per_expert_E, 0, dtype=torch.int32)
        R = P if static else int(offsets_E[-1])
        base_E = offsets_E - tokens_per_expert_E - 1
    safe_P = idx_P if dropless else idx_P.clamp(min=0)
    if counting:
        dest_P = (running_EP + base_E[:, None]).gather(0, safe_P[None, :]).squeeze(0)
    else:
        key_P = torch.where(idx_P >= 0, idx_P, E)
        order_P = torch.sort(key_P, stable=True).indices
        rank_P = torch.empty_like(order_P).scatter_(0, order_P, torch.arange(P, device=dev))
        first_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E  # in sorted order
        dest_P = rank_P - first_E[safe_P] + base_E[safe_P] + 1
    pairs_P = torch.arange(P, device=dev)
    if dropless and capacity is None:  # every pair kept: rows = pairs, a plain inverse
        src_pair_N = torch.empty(R, dtype=torch.int64, device=dev).scatter_(0, dest_P, pairs_P)
    else:
        dest_P = torch.where(idx_P >= 0, dest_P, -1)
        # Inverse map: row -> pair; dropped pairs land in the extra slot R, which is cut off.
        slot_P = torch.where(idx_P >= 0, dest_P, R)
        src_pair_N = torch.full((R + 1,), P, dtype=torch.int64, device=dev)
        src_pair_N = src_pair_N.scatter_(0, slot_P, pairs_P)[:R]
    padded = capacity is not None or (static and not dropless)
    src_token_N = src_pair_N // indices_TK.shape[1]
    if padded:  # padding rows (sentinel pair P -> token T) read the last real token instead
        src_token_N = src_token_N.clamp_(max=max(indices_TK.shape[0] - 1, 0))
    return RoutingIndex(dest_P.view(indices_TK.shape), tokens_per_expert_E, offsets_E, R, src_pair_N,
                        src_token_N, capacity, padded)
