"""Token dispatchers: move routed tokens to the ranks that own their experts and back.

Legend: T local tokens, D model dim, K top-k, E experts, El = E / ep local experts,
P EP peers, N rows of the permuted buffer (T*K, E*C or the kept pairs; the kept pairs come
first and are what this rank sends), R rows received over EP, G rows after the ETP gather
(alltoall) or tokens gathered over ETP x EP (allgather), M rows the local experts process,
C source chunks (ETP rank x EP peer).

One interface:
    expert_in_MD, meta = dispatcher.dispatch(x_TD, routing)
    out_TD = dispatcher.combine(expert_out_MD, meta)
`meta` is a frozen value; nothing is kept on `self` between the two calls. Expert input rows
are sorted by local expert and `meta.rows` (experts.ExpertRows) says which rows each owns.
`dispatch_start(x_TD, routing)` then `dispatch_finish(started)` is the same dispatch with the
tokens in flight in between (`InFlightDispatch`): the caller runs work that does not need them
(the shared experts, moe.py). Only AllToAllDispatcher has something in flight there
(`overlaps_dispatch`); the others finish in `dispatch_start`.

LocalDispatcher      ep = etp = 1: permute -> experts -> unpermute. Reads nothing back: the
                     buffer has T*K rows (dropless) or E*C rows (capacity C, Megatron's
                     pad-to-capacity, chosen by the router's one topk: `Routing.kept`), the
                     grouped GEMM takes device offsets.
AllToAllDispatcher   permute -> all-to-all over EP -> all-gather over ETP -> sort chunks by
                     local expert -> experts -> unsort -> reduce-scatter over ETP ->
                     all-to-all over EP -> unpermute (probabilities applied at unpermute).
                     Split sizes: ONE host read per layer and micro-batch (below).
AllGatherDispatcher  all-gather tokens, probs and indices over ETP x EP (group tp_ep), permute
                     the pairs that hit local experts -> experts -> unpermute ->
                     reduce-scatter back over ETP x EP. Reads the gathered sizes and its
                     row count (two host reads per layer and micro-batch).

Split sizes with ep > 1 (issue 12): the all-to-all needs its split sizes on the host. We read
them once per layer and micro-batch, as Megatron-Core's all-to-all dispatcher does: the
per-expert counts are exchanged on the device (a tiny all-to-all, plus an all-gather over
ETP), one tensor [send counts | received counts of the ETP group] starts its copy to the host
right then (non-blocking into pinned memory on CUDA), the permute runs while it travels, and
the host waits only just before the token all-to-all. The alternative, a fixed per-rank
budget with an overflow flag checked once per step (Megatron's sync-free mode), makes every
all-to-all as large as the budget and must re-run or fail a step that overflows; with
dropless training that budget is the worst case (every token to one rank), so the exchange
would grow by up to ep times. One small read per layer costs less on both CPU and GPU.

Overlap (issue 12): AllToAllDispatcher.dispatch_start returns with the token all-to-all over
EP in flight (comm.all_to_all_v_start) and the whole meta (splits, chunk permutation, expert
rows) already computed from the counts, so dispatch_finish only waits, gathers over ETP and
sorts by expert. The combine's all-to-all stays blocking: nothing of the layer is left that
does not need its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .comm import (
    CommCounter,
    PendingAllToAll,
    all_gather_sizes,
    all_gather_v,
    all_to_all_v,
    all_to_all_v_start,
    reduce_scatter_v,
)
from .experts import ExpertRows
from .kernels import RoutingIndex, gather_rows, get_ops, routing_index, unpermute_rows
from .parallel_dims import ParallelDims
from .router import Routing, expert_capacity


class HostCounts:
    """A small device integer tensor on its way to the host: the copy starts at construction
    (non-blocking into pinned memory on CUDA, so the GPU keeps going), `wait()` blocks until
    it has arrived and returns the values. On CPU the read happens at `wait()`."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def chunk_permutation(counts_CE: torch.Tensor, num_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between chunk-major rows [c][e] and expert-major rows [e][c].

    Returns (to_expert, to_chunk) with x_expert = x_chunk[to_expert], x_chunk = x_expert[to_chunk].
    `num_rows` = counts_CE.sum() when the host knows it (else it is read back).
    Example: counts [[1, 2], [3, 0]] (C=2, E=2): chunk-major rows c0e0 | c0e1 c0e1 | c1e0 x3,
    expert-major rows c0e0 c1e0 x3 | c0e1 x2 -> to_expert = [0, 3, 4, 5, 1, 2].
    """
    flat_CE = counts_CE.reshape(-1)
    off_chunk_CE = (torch.cumsum(flat_CE, 0) - flat_CE).view_as(counts_CE)
    flat_EC = counts_CE.t().reshape(-1)
    off_expert_EC = (torch.cumsum(flat_EC, 0) - flat_EC).view(counts_CE.shape[1], -1)
    n = int(flat_CE.sum()) if num_rows is None else num_rows
    rows = torch.arange(n, device=counts_CE.device)
    shift_EC = (off_chunk_CE.t() - off_expert_EC).reshape(-1)
    to_expert = rows + torch.repeat_interleave(shift_EC, flat_EC, output_size=n)
    shift_CE = (off_expert_EC.t() - off_chunk_CE).reshape(-1)
    to_chunk = rows + torch.repeat_interleave(shift_CE, flat_CE, output_size=n)
    return to_expert, to_chunk


@dataclass(frozen=True)
class LocalMeta:
    """What LocalDispatcher.combine needs: the local permutation and permuted probabilities."""

    index: RoutingIndex | None  # None: the router's pad-to-capacity rows (`tokens_EC`)
    probs_N: torch.Tensor  # [N] or, with `tokens_EC`, [E, C, 1]
    num_tokens: int
    rows: ExpertRows
    tokens_EC: torch.Tensor | None = None  # token of each row when `index` is None


@dataclass(frozen=True)
class AllToAllMeta:
    """What AllToAllDispatcher.combine needs to reverse the dispatch exactly."""

    index: RoutingIndex
    probs_N: torch.Tensor
    num_tokens: int
    rows: ExpertRows
    send_splits: tuple[int, ...]  # rows to each EP rank
    recv_splits: tuple[int, ...]  # rows from each EP rank
    etp_sizes: tuple[int, ...]  # rows each ETP rank received over EP
    to_expert: torch.Tensor
    to_chunk: torch.Tensor


@dataclass(frozen=True)
class AllGatherMeta:
    """What AllGatherDispatcher.combine needs: permutation of the gathered pairs and sizes."""

    index: RoutingIndex
    probs_N: torch.Tensor
    num_gathered: int
    token_sizes: tuple[int, ...]  # local tokens of each tp_ep rank
    rows: ExpertRows


@dataclass(frozen=True)
class InFlightDispatch:
    """A started dispatch: `rows` is the finished expert input x_MD (local, all-gather) or, for
    the all-to-all dispatcher, the rows received over EP (x_RD) or their exchange still in
    flight; `meta` is complete either way."""

    rows: torch.Tensor | PendingAllToAll
    meta: LocalMeta | AllToAllMeta | AllGatherMeta


class LocalDispatcher:
    """All experts on this rank: the simplest dispatcher; nothing is read back. With a
    capacity and the torch kernels it takes the router's drop as rows (`Routing.kept`,
    router.choose_by_expert: the pad-to-capacity layout from one topk, no sort); the Triton
    kernels take the pairs (index -1 where dropped)."""

    overlaps_dispatch = False  # nothing in flight between dispatch_start and dispatch_finish

    def dispatch_start(self, x_TD: torch.Tensor, routing: Routing) -> InFlightDispatch:
        return InFlightDispatch(*self.dispatch(x_TD, routing))

    def dispatch_finish(self, started: InFlightDispatch):
        return started.rows, started.meta

    def __init__(self, num_experts: int, backend: str = "torch", capacity_factor: float | None = None):
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.permute, self.unpermute = get_ops(backend)
        # the router gives its capacity drop as rows (Router.forward(by_expert=...))
        self.takes_expert_choice = capacity_factor is not None and backend == "torch"
        self._capacity_offsets: dict[tuple[int, torch.device], torch.Tensor] = {}  # constants

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """Sort the kept (token, expert) pairs by expert: (x_ND, meta)."""
        kept = routing.kept
        if kept is not None:  # expert e's rows e*C .. e*C+C-1, chosen by the router
            key = (kept.capacity, x_TD.device)
            if key not in self._capacity_offsets:  # (e+1)*C: a constant of the layout
                ends = [(e + 1) * kept.capacity for e in range(self.num_experts)]
                self._capacity_offsets[key] = torch.tensor(ends, dtype=torch.int32, device=x_TD.device)
            rows = ExpertRows(self._capacity_offsets[key], kept.capacity)
            meta = LocalMeta(None, kept.probs_EC1, x_TD.shape[0], rows, kept.tokens_EC)
            return gather_rows(x_TD, kept.tokens_EC), meta  # x_ECD: a batch per expert
        (T, K), E, cf = routing.indices_TK.shape, self.num_experts, self.capacity_factor
        cap = None if cf is None else expert_capacity(cf, T, K, E)  # the router's drop rule
        index = routing_index(routing.indices_TK, E, static=True, capacity=cap, dropless=cf is None)
        x_ND, probs_N = self.permute(x_TD, routing.probs_TK, index)
        return x_ND, LocalMeta(index, probs_N, x_TD.shape[0], ExpertRows(index.offsets_E, cap))

    def combine(self, y_ND: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        """Probability-weighted sum of each token's expert outputs: out_TD."""
        if meta.index is None:
            return unpermute_rows(y_ND, meta.probs_N, meta.tokens_EC, meta.num_tokens)
        return self.unpermute(y_ND, meta.probs_N, meta.index)


class AllToAllDispatcher:
    """EP all-to-all plus ETP all-gather (Megatron's `MoEAlltoAllTokenDispatcher`)."""

    overlaps_dispatch = True  # the token all-to-all is in flight after dispatch_start
    takes_expert_choice = False  # moves pairs: the router's drop as index -1

    def __init__(self, num_experts: int, dims: ParallelDims, counter: CommCounter | None, backend="torch",
                 capacity_factor: float | None = None):
        self.num_experts, self.dims, self.counter = num_experts, dims, counter
        self.num_local = num_experts // dims.ep
        self.dropless = capacity_factor is None
        self.permute, self.unpermute = get_ops(backend)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """Send pairs to the EP rank owning their expert, gather over ETP: (x_MD, meta)."""
        return self.dispatch_finish(self.dispatch_start(x_TD, routing, in_flight=False))

    def dispatch_start(self, x_TD: torch.Tensor, routing: Routing, in_flight: bool = True) -> InFlightDispatch:
        """Exchange the counts, permute, launch the token all-to-all over EP and build the
        meta; returns with the tokens in flight (`in_flight=False`: exchanged, blocking)."""
        ep, etp, El, E = self.dims.group("ep"), self.dims.group("etp"), self.num_local, self.num_experts
        # Static buffer of T*K rows, kept pairs first: those go out, their number read below.
        index = routing_index(routing.indices_TK, E, static=True, dropless=self.dropless)
        # Exchange per-expert counts on the device so every rank knows what it receives.
        send_counts_PE = index.tokens_per_expert_E.view(ep.size, El)
        recv_counts_PE = all_to_all_v(
            send_counts_PE, [1] * ep.size, [1] * ep.size, ep, self.counter, "ep.counts"
        )
        # Chunks ordered [etp rank][ep source][local expert].
        counts_CE = all_gather_v(recv_counts_PE, [ep.size] * etp.size, etp, self.counter, "etp.counts")
        on_host = HostCounts(torch.cat([index.tokens_per_expert_E, counts_CE.reshape(-1)]))
        x_ND, probs_N = self.permute(x_TD, routing.probs_TK, index)  # while the counts travel
        counts = on_host.wait()  # the one host read of this layer and micro-batch
        send_PE, chunks = counts[:E], counts[E:]
        send = [sum(send_PE[j * El:(j + 1) * El]) for j in range(ep.size)]
        chunk_rows = [sum(chunks[c * El:(c + 1) * El]) for c in range(etp.size * ep.size)]
        etp_sizes = [sum(chunk_rows[i * ep.size:(i + 1) * ep.size]) for i in range(etp.size)]
        recv = chunk_rows[etp.index * ep.size:(etp.index + 1) * ep.size]
        tpe = tuple(sum(chunks[c * El + e] for c in range(etp.size * ep.size)) for e in range(El))
        n_send = sum(send)
        a2a = all_to_all_v_start if in_flight else all_to_all_v
        x_RD = a2a(x_ND[:n_send], recv, send, ep, self.counter, "ep.all_to_all")
        # While the tokens travel: the index maps and expert rows come from the counts alone.
        to_expert, to_chunk = chunk_permutation(counts_CE, sum(etp_sizes))
        rows = ExpertRows(torch.cumsum(counts_CE.sum(0), 0, dtype=torch.int32), None, tpe)
        meta = AllToAllMeta(
            index, probs_N, x_TD.shape[0], rows, tuple(send), tuple(recv), tuple(etp_sizes),
            to_expert, to_chunk,
        )
        return InFlightDispatch(x_RD, meta)

    def dispatch_finish(self, started: InFlightDispatch):
        """Wait for the tokens, gather over ETP, sort by local expert: (x_MD, meta)."""
        meta = started.meta
        x_RD = started.rows.wait() if isinstance(started.rows, PendingAllToAll) else started.rows
        x_GD = all_gather_v(x_RD, meta.etp_sizes, self.dims.group("etp"), self.counter, "etp")
        return x_GD[meta.to_expert], meta

    def combine(self, y_MD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        """Reduce-scatter over ETP, return rows over EP, unpermute: out_TD."""
        ep, etp = self.dims.group("ep"), self.dims.group("etp")
        y_GD = y_MD[meta.to_chunk]
        y_RD = reduce_scatter_v(y_GD, meta.etp_sizes, etp, self.counter, "etp")
        y_ND = all_to_all_v(y_RD, meta.send_splits, meta.recv_splits, ep, self.counter, "ep.all_to_all")
        pad = meta.index.num_rows - y_ND.shape[0]  # dropped pairs' rows: zero, weight zero
        return self.unpermute(F.pad(y_ND, (0, 0, 0, pad)) if pad else y_ND, meta.probs_N, meta.index)


class AllGatherDispatcher:
    """Gather every token of the ETP x EP group, compute the local experts' share, scatter back."""

    overlaps_dispatch = False  # the gathers are blocking (not overlapped)
    takes_expert_choice = False  # moves pairs: the router's drop as index -1
    dispatch_start, dispatch_finish = LocalDispatcher.dispatch_start, LocalDispatcher.dispatch_finish

    def __init__(self, num_experts: int, dims: ParallelDims, counter: CommCounter | None, backend="torch"):
        self.num_experts, self.dims, self.counter = num_experts, dims, counter
        self.num_local = num_experts // dims.ep
        self.first = dims.ep_rank * self.num_local
        self.permute, self.unpermute = get_ops(backend)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """Gather the group's tokens, keep the pairs of local experts: (x_ND, meta)."""
        g = self.dims.group("tp_ep")
        sizes = all_gather_sizes(x_TD.shape[0], g, x_TD.device, self.counter, "tp_ep.counts")
        x_GD = all_gather_v(x_TD, sizes, g, self.counter, "tp_ep")
        probs_GK = all_gather_v(routing.probs_TK, sizes, g, self.counter, "tp_ep")
        idx_GK = all_gather_v(routing.indices_TK, sizes, g, self.counter, "tp_ep.indices")
        local_GK = idx_GK - self.first
        local_GK = torch.where((local_GK >= 0) & (local_GK < self.num_local) & (idx_GK >= 0),
                               local_GK, torch.full_like(local_GK, -1))
        # Exact layout (reads the row count): a static one would make the experts run over
        # every gathered pair, most of them another rank's.
        index = routing_index(local_GK, self.num_local)
        x_ND, probs_N = self.permute(x_GD, probs_GK, index)
        rows = ExpertRows(index.offsets_E)
        return x_ND, AllGatherMeta(index, probs_N, x_GD.shape[0], tuple(sizes), rows)

    def combine(self, y_ND: torch.Tensor, meta: AllGatherMeta) -> torch.Tensor:
        """Unpermute into the gathered tokens, reduce-scatter back: out_TD."""
        out_GD = self.unpermute(y_ND, meta.probs_N, meta.index)
        return reduce_scatter_v(out_GD, meta.token_sizes, self.dims.group("tp_ep"), self.counter, "tp_ep")


def make_dispatcher(kind: str, num_experts: int, dims: ParallelDims, counter, backend="torch",
                    capacity_factor: float | None = None):
    """The dispatcher of `kind` ('alltoall' | 'allgather'); local when ETP x EP is one rank.
    `capacity_factor` is the router's (None = dropless): it fixes the static buffer sizes."""
    if dims.group("tp_ep").size == 1:
        return LocalDispatcher(num_experts, backend, capacity_factor)
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, dims, counter, backend, capacity_factor)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, dims, counter, backend)
    raise ValueError(f"dispatcher={kind!r}: use 'alltoall' or 'allgather'")
