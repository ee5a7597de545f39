"""Differentiable collectives over a `Group`, and a counter of the bytes they move.

Legend: N rows (tokens or pairs), D row width.

Byte accounting (what this rank sends, per call, excluding what it keeps for itself):
  all-to-all      bytes of rows sent to other ranks
  all-gather-v    (n - 1) * own bytes          (each rank's rows reach n - 1 peers)
  reduce-scatter  total bytes - own share
  all-reduce      2 * (n - 1) / n * bytes      (ring-equivalent volume)
Keys are "<group kind>.<op>", e.g. "ep.all_to_all", "etp.all_gather", "edp.all_reduce", so they
line up with the cost model's per-group communication.
Uneven all-gather and reduce-scatter are built on all_to_all_single (gloo and NCCL support
uneven splits there).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .parallel_dims import Group


@dataclass
class CommCounter:
    """Bytes sent by this rank per collective key; `per_step` keeps one dict per finished step."""

    current: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_step: list[dict[str, int]] = field(default_factory=list)

    def add(self, key: str, nbytes: int) -> None:
        self.current[key] += int(nbytes)

    def end_step(self) -> dict[str, int]:
        done = dict(self.current)
        self.per_step.append(done)
        self.current = defaultdict(int)
        return done


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _count(counter: CommCounter | None, key: str, nbytes: int) -> None:
    if counter is not None and nbytes:
        counter.add(key, nbytes)


def _a2a(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group.pg)
    return out


def _sent_bytes(x: torch.Tensor, in_splits: list[int], me: int) -> int:
    row = _nbytes(x) // max(x.shape[0], 1)
    return (sum(in_splits) - in_splits[me]) * row


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, counter, key):
        ctx.args = (out_splits, in_splits, group, counter, key)
        _count(counter, key, _sent_bytes(x, in_splits, group.index))
        return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, group, counter, key = ctx.args
        _count(counter, key, _sent_bytes(g, out_splits, group.index))
        return _a2a(g, in_splits, out_splits, group), None, None, None, None, None


def all_to_all_v(x, out_splits, in_splits, group: Group, counter=None, key="all_to_all"):
    """Rows in_splits[j] of `x` go to group rank j; returns the rows received (out_splits)."""
    if group.size == 1:
        return x
    return _AllToAllV.apply(x, list(out_splits), list(in_splits), group, counter, key)


def _gather(x, sizes, group, counter, key):
    n = group.size
    _count(counter, key, (n - 1) * _nbytes(x))
    return _a2a(x.repeat((n,) + (1,) * (x.dim() - 1)), list(sizes), [x.shape[0]] * n, group)


def _scatter_sum(x, sizes, group, counter, key):
    me = group.index
    _count(counter, key, _sent_bytes(x, sizes, me))
    recv = _a2a(x, [sizes[me]] * group.size, list(sizes), group)
    return recv.view((group.size, sizes[me]) + tuple(x.shape[1:])).sum(0)


class _AllGatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, counter, key):
        ctx.args = (sizes, group, counter, key)
        return _gather(x, sizes, group, counter, key + ".all_gather")

    @staticmethod
    def backward(ctx, g):
        sizes, group, counter, key = ctx.args
        return _scatter_sum(g, sizes, group, counter, key + ".reduce_scatter"), None, None, None, None


class _ReduceScatterV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, counter, key):
        ctx.args = (sizes, group, counter, key)
        return _scatter_sum(x, sizes, group, counter, key + ".reduce_scatter")

    @staticmethod
    def backward(ctx, g):
        sizes, group, counter, key = ctx.args
        return _gather(g, sizes, group, counter, key + ".all_gather"), None, None, None, None


def all_gather_v(x, sizes, group: Group, counter=None, key="group"):
    """Concatenate every group rank's rows (rank j has sizes[j] rows); backward reduce-scatters."""
    if group.size == 1:
        return x
    if not x.requires_grad:
        return _gather(x, list(sizes), group, counter, key + ".all_gather")
    return _AllGatherV.apply(x, list(sizes), group, counter, key)


def reduce_scatter_v(x, sizes, group: Group, counter=None, key="group"):
    """Sum `x` over the group and keep this rank's block of sizes[me] rows."""
    if group.size == 1:
        return x
    return _ReduceScatterV.apply(x, list(sizes), group, counter, key)


def all_gather_sizes(n: int, group: Group, device, counter=None, key="group") -> list[int]:
    """Every group rank's row count (a tiny int64 all-gather)."""
    if group.size == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=device)
    return _gather(t, [1] * group.size, group, counter, key + ".all_gather").tolist()


def all_reduce_(t: torch.Tensor, group: Group, counter=None, key="group") -> torch.Tensor:
    """In-place sum over the group (no autograd); counts ring-equivalent bytes."""
    if group.size > 1:
        n = group.size
        _count(counter, key + ".all_reduce", 2 * (n - 1) * _nbytes(t) // n)
        dist.all_reduce(t, group=group.pg)
    return t
