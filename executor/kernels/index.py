"""Stable sort of (token, k) pairs by expert: a handful of ops, no host read.

Legend: T tokens, K top-k, E experts, P = T*K pairs, N kept pairs, R rows of the permuted
buffer (R >= N).

The pairs idx_P (P = T*K, token-major) are sorted by expert with a stable sort (dropped pairs,
index -1, sort last under the key E), so within an expert the pairs keep their token order:
    order_P   the pair at each sorted position (the sort's permutation)
    ends_E    end of each expert's block in the sorted order: one `searchsorted` of the
              expert ids in the sorted keys (int32, what the grouped GEMM takes)
The sorted order is the permuted buffer itself (row i holds pair order_P[i]), so a dropless
index costs five ops (view, sort, arange, searchsorted, floor-divide for the token of each
row) where the counting sort it replaces (a cumsum over an E x P one-hot) took twenty; torchtitan
sorts the same way (argsort + offsets on the device). The inverse map `dest_TK` (row of each
pair) and the counts per expert are computed only when asked for (the Triton kernels, the
all-to-all dispatcher and tests ask).
Worked example: idx = [1, 0, 1, 1] (T=2, K=2), E=2: sorted keys [0, 1, 1, 1], order
[1, 0, 2, 3], ends [1, 4] -> dest = [1, 0, 2, 3].

Buffer layouts (R rows; a row no pair fills is a *padding row*: its pair is the sentinel P,
its token T-1, its probability zero, see torch_ops.py; the Triton kernels leave it zero):
  exact     R = N: reads N to the host once (the only layout that does)
  static    R = P: kept rows first in expert order, padding rows after (dropless: none)
  capacity  R = E*C: expert e owns rows [e*C, (e+1)*C) (Megatron's pad-to-capacity), its
            kept pairs first; needs at most C kept pairs per expert (the router's drop rule
            as index -1: the Triton kernels' input; the torch path takes the same layout
            straight from the router's one topk, router.choose_by_expert, without this sort)
Every step of static and capacity has shapes fixed by T, K, E and C: nothing is read back,
no op has a data-dependent output shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutingIndex:
    """Where each (token, k) pair goes in the expert-sorted buffer."""

    offsets_E: torch.Tensor  # int32 end row of each expert's block: what the grouped GEMM takes
    num_rows: int  # R, rows of the permuted buffer
    src_pair_N: torch.Tensor  # flat pair index t * K + k of each row; P for a padding row
    src_token_N: torch.Tensor  # token of each row; T - 1 for a padding row
    num_tokens: int  # T
    sorted_key_P: torch.Tensor  # expert of each sorted pair, E for a dropped one
    order_P: torch.Tensor  # pair at each sorted position
    capacity: int | None = None  # rows per expert in the capacity layout, else None
    padded: bool = False  # whether the buffer may hold padding rows

    @functools.cached_property
    def tokens_per_expert_E(self) -> torch.Tensor:
        """int64 counts of kept pairs per expert (device; computed on first use): the ends
        minus the starts of each expert's keys in the sorted order (dropped pairs, key E,
        fall in no expert)."""
        experts_E = torch.arange(self.offsets_E.shape[0], device=self.sorted_key_P.device)
        ends_E = torch.searchsorted(self.sorted_key_P, experts_E, right=True)
        return ends_E - torch.searchsorted(self.sorted_key_P, experts_E)

    @functools.cached_property
    def dest_TK(self) -> torch.Tensor:
        """int64 row of each pair in the permuted buffer, -1 when dropped (computed on first
        use): the inverse of `src_pair_N`."""
        P, R = self.order_P.shape[0], self.num_rows
        if self.capacity is None and not self.padded and R == P:  # dropless: row = position
            row_P = torch.arange(P, device=self.order_P.device)
        else:
            # Rows hold their pair (padding rows the sentinel P, which lands in slot P).
            dest = torch.full((P + 1,), -1, dtype=torch.int64, device=self.order_P.device)
            dest.scatter_(0, self.src_pair_N, torch.arange(R, device=self.order_P.device))
            return dest[:P].view(self.num_tokens, -1)
        dest = torch.empty_like(row_P).scatter_(0, self.order_P, row_P)
        return dest.view(self.num_tokens, -1)


def routing_index(indices_TK: torch.Tensor, num_experts: int, *, static: bool = False,
                  capacity: int | None = None, dropless: bool = False) -> RoutingIndex:
    """Stable sort of `indices_TK` (expert id per pair, -1 = dropped) into expert order.

    Layout (module docstring): exact by default, `static=True` for R = T*K rows, `capacity=C`
    for E*C rows. `dropless=True` promises that no pair is -1, so a static buffer has no
    padding rows and the permute kernels skip the zero row.
    """
    T, K = indices_TK.shape
    idx_P = indices_TK.reshape(-1)
    P, E, dev = idx_P.numel(), num_experts, idx_P.device
    key_P = idx_P if dropless else idx_P.remainder(E + 1)  # -1 -> E: dropped pairs sort last
    sorted_P, order_P = torch.sort(key_P, stable=True)
    if capacity is None:
        ends_E = torch.searchsorted(sorted_P, torch.arange(E, device=dev), right=True, out_int32=True)
        R = P if static else int(ends_E[-1]) if E else 0
        if dropless:
            src_pair_N = order_P
        elif static:  # rows past the kept pairs hold dropped pairs: make them padding rows
            src_pair_N = torch.where(sorted_P < E, order_P, P)
        else:
            src_pair_N = order_P[:R]
        offsets_E = ends_E
    else:
        # Expert e's j-th kept pair (sorted position p = starts_e + j) goes to row e*C + j:
        # row = (p - starts_e) + C*e, starts_e being where the pair's own key starts in the
        # sorted keys (one searchsorted of the keys in themselves). Dropped pairs (e = E) land
        # in rows [R, R + P), past the buffer, which are cut off.
        R = E * capacity
        starts_P = torch.searchsorted(sorted_P, sorted_P)
        row_P = torch.add(torch.arange(P, device=dev) - starts_P, sorted_P, alpha=capacity)
        src_pair_N = torch.full((R + P,), P, dtype=torch.int64, device=dev)
        src_pair_N = src_pair_N.scatter_(0, row_P, order_P)[:R]
        offsets_E = torch.arange(capacity, R + 1, capacity, device=dev, dtype=torch.int32)  # (e+1)*C
    padded = capacity is not None or (static and not dropless)
    # token of each row: pair // K, a shift when K is a power of two (a quarter of the time)
    src_token_N = src_pair_N >> (K.bit_length() - 1) if K & (K - 1) == 0 else src_pair_N // K
    if padded:  # padding rows (sentinel pair P -> token T) read the last real token instead
        src_token_N = src_token_N.clamp_(max=max(T - 1, 0))
    return RoutingIndex(offsets_E, R, src_pair_N, src_token_N, T, sorted_P, order_P, capacity, padded)
