"""Token permute / unpermute kernels for MoE dispatch.

Legend: T tokens, D model dim, K top-k, E experts, N permuted rows (kept (token, k) pairs).

`routing_index` turns `indices_TK` into `dest_TK` (the row of each (token, k) pair in the
expert-sorted order, -1 when dropped) by counting sort. `permute` / `unpermute` then move data
with that index; they are autograd Functions with a torch implementation (CPU and GPU) and a
Triton implementation (GPU, or the Triton interpreter with TRITON_INTERPRET=1).
`gather_rows` / `unpermute_rows` (torch) move rows by their token alone, for a layout that
comes with its own row probabilities (router.choose_by_expert: pad-to-capacity by one topk).
"""

from __future__ import annotations

from .index import RoutingIndex, routing_index
from .torch_ops import gather_rows, permute, unpermute, unpermute_rows

__all__ = ["RoutingIndex", "gather_rows", "get_ops", "permute", "routing_index", "unpermute",
           "unpermute_rows"]


def get_ops(backend: str):
    """(permute, unpermute) for backend 'torch' or 'triton'."""
    if backend == "torch":
        return permute, unpermute
    if backend == "triton":
        from . import triton_ops

        return triton_ops.permute, triton_ops.unpermute
    raise ValueError(f"unknown kernel backend {backend!r}; use 'torch' or 'triton'")
