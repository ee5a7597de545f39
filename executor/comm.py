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

Overlap (issue 12): `all_to_all_v_start` launches the all-to-all asynchronously and returns a
`PendingAllToAll`; the caller computes what does not need the received rows, then `wait()`s.
Autograd sees two nodes, start and wait. The engine runs the backward in reverse creation
order, so wait's backward launches the reverse all-to-all of the gradient, the engine then
runs every ready node created between start and wait in the forward (the work that overlapped
the forward all-to-all: its backward overlaps the gradient's all-to-all), and start's backward
waits. Pure data movement: the rows and gradients are bit-identical to `all_to_all_v`.
`CommCounter.blocked_s` adds up the seconds the host spent blocked in each key's
all-to-alls (launch + wait), forward and backward apart.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .parallel_dims import Group


@dataclass
class CommCounter:
    """Bytes sent by this rank per collective key; `per_step` keeps one dict per finished step."""

    current: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_step: list[dict[str, int]] = field(default_factory=list)
    # seconds the host was blocked in the all-to-alls of "<key>.forward" / "<key>.backward"
    # since construction (not reset by end_step: callers take differences)
    blocked_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))

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


@contextmanager
def _blocked(counter: CommCounter | None, key: str):
    """Add the wall time of the block to counter.blocked_s[key]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if counter is not None:
            counter.blocked_s[key] += time.perf_counter() - t0


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, counter, key):
        ctx.args = (out_splits, in_splits, group, counter, key)
        _count(counter, key, _sent_bytes(x, in_splits, group.index))
        with _blocked(counter, key + ".forward"):
            return _a2a(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits, group, counter, key = ctx.args
        _count(counter, key, _sent_bytes(g, out_splits, group.index))
        with _blocked(counter, key + ".backward"):
            return _a2a(g, in_splits, out_splits, group), None, None, None, None, None


def all_to_all_v(x, out_splits, in_splits, group: Group, counter=None, key="all_to_all"):
    """Rows in_splits[j] of `x` go to group rank j; returns the rows received (out_splits)."""
    if group.size == 1:
        return x
    return _AllToAllV.apply(x, list(out_splits), list(in_splits), group, counter, key)


@dataclass(eq=False)
class _InFlight:
    """One asynchronous all-to-all, shared by its start and wait autograd nodes: the splits,
    the work of the forward exchange and, during the backward, of the gradient's."""

    out_splits: list[int]
    in_splits: list[int]
    group: Group
    counter: CommCounter | None
    key: str
    work: object | None = None  # dist.Work of the forward exchange until it is waited for
    sent: torch.Tensor | None = None  # the send buffer, alive until the exchange is done
    grad_work: object | None = None  # dist.Work of the gradient's exchange (backward)
    grad_sent: torch.Tensor | None = None
    grad_received: torch.Tensor | None = None  # x's gradient, being received


def _a2a_launch(x, out_splits, in_splits, group, counter, key):
    """Start all_to_all_single: (received buffer, work, contiguous send buffer)."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    with _blocked(counter, key):
        work = dist.all_to_all_single(out, x, out_splits, in_splits, group=group.pg, async_op=True)
    return out, work, x


def _a2a_wait(work, counter, key) -> None:
    with _blocked(counter, key):
        work.wait()


class _AllToAllStart(torch.autograd.Function):
    """Forward: launch the exchange, return the buffer being received into (not readable
    before the wait). Backward: wait for the gradient's exchange that wait's backward launched
    and return what it received."""

    @staticmethod
    def forward(ctx, x, flight):
        ctx.flight = flight
        _count(flight.counter, flight.key, _sent_bytes(x, flight.in_splits, flight.group.index))
        out, flight.work, flight.sent = _a2a_launch(x, flight.out_splits, flight.in_splits, flight.group,
                                                    flight.counter, flight.key + ".forward")
        return out

    @staticmethod
    def backward(ctx, _g_received):  # the same values wait's backward launched
        f = ctx.flight
        assert f.grad_work is not None, "the gradient must come through PendingAllToAll.wait()"
        _a2a_wait(f.grad_work, f.counter, f.key + ".backward")
        g_x = f.grad_received
        f.grad_work = f.grad_sent = f.grad_received = None
        return g_x, None


class _AllToAllWait(torch.autograd.Function):
    """Forward: wait for the exchange. Backward: launch the gradient's reverse exchange and
    pass the gradient on unchanged; start's backward waits and returns what arrived."""

    @staticmethod
    def forward(ctx, received, flight):
        ctx.flight = flight
        _a2a_wait(flight.work, flight.counter, flight.key + ".forward")
        flight.work = flight.sent = None
        return received

    @staticmethod
    def backward(ctx, g):
        f = ctx.flight
        _count(f.counter, f.key, _sent_bytes(g, f.out_splits, f.group.index))
        f.grad_received, f.grad_work, f.grad_sent = _a2a_launch(
            g, f.in_splits, f.out_splits, f.group, f.counter, f.key + ".backward")
        return g, None


@dataclass(frozen=True)
class PendingAllToAll:
    """An all-to-all in flight (`all_to_all_v_start`); `wait()` returns the rows received."""

    received: torch.Tensor  # being written by the exchange: read it only through wait()
    flight: _InFlight | None  # None: nothing to exchange (group of one rank)

    def wait(self) -> torch.Tensor:
        if self.flight is None:
            return self.received
        return _AllToAllWait.apply(self.received, self.flight)


def all_to_all_v_start(x, out_splits, in_splits, group: Group, counter=None, key="all_to_all") -> PendingAllToAll:
    """`all_to_all_v` started asynchronously: compute what does not need the received rows,
    then call `wait()` once (see the module docstring for what overlaps in the backward)."""
    if group.size == 1:
        return PendingAllToAll(x, None)
    flight = _InFlight(list(out_splits), list(in_splits), group, counter, key)
    return PendingAllToAll(_AllToAllStart.apply(x, flight), flight)


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
