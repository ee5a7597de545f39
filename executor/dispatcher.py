"""Token dispatchers: move routed tokens to the ranks that own their experts and back.

Legend: T local tokens, D model dim, K top-k, E experts, El = E / ep local experts,
P EP peers, N rows this rank sends (its kept pairs), R rows received over EP, G rows after
the ETP gather (alltoall) or tokens gathered over ETP x EP (allgather), M rows the local
experts process, C source chunks (ETP rank x EP peer).

One interface:
    expert_in_MD, meta = dispatcher.dispatch(x_TD, routing)
    out_TD = dispatcher.combine(expert_out_MD, meta)
`meta` is a frozen value; nothing is kept on `self` between the two calls. Expert input rows
are sorted by local expert and `meta.tokens_per_expert` gives the rows of each.

LocalDispatcher      ep = etp = 1: permute -> experts -> unpermute.
AllToAllDispatcher   permute -> all-to-all over EP -> all-gather over ETP -> sort chunks by
                     local expert -> experts -> unsort -> reduce-scatter over ETP ->
                     all-to-all over EP -> unpermute (probabilities applied at unpermute).
AllGatherDispatcher  all-gather tokens, probs and indices over ETP x EP (group tp_ep), permute
                     the pairs that hit local experts -> experts -> unpermute ->
                     reduce-scatter back over ETP x EP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import CommCounter, all_gather_sizes, all_gather_v, all_to_all_v, reduce_scatter_v
from .kernels import RoutingIndex, get_ops, routing_index
from .parallel_dims import ParallelDims
from .router import Routing


def chunk_permutation(counts_CE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps between chunk-major rows [c][e] and expert-major rows [e][c].

    Returns (to_expert, to_chunk) with x_expert = x_chunk[to_expert], x_chunk = x_expert[to_chunk].
    Example: counts [[1, 2], [3, 0]] (C=2, E=2): chunk-major rows c0e0 | c0e1 c0e1 | c1e0 x3,
    expert-major rows c0e0 c1e0 x3 | c0e1 x2 -> to_expert = [0, 3, 4, 5, 1, 2].
    """
    flat_CE = counts_CE.reshape(-1)
    off_chunk_CE = (torch.cumsum(flat_CE, 0) - flat_CE).view_as(counts_CE)
    flat_EC = counts_CE.t().reshape(-1)
    off_expert_EC = (torch.cumsum(flat_EC, 0) - flat_EC).view(counts_CE.shape[1], -1)
    n = int(flat_CE.sum())
    rows = torch.arange(n, device=counts_CE.device)
    shift_EC = (off_chunk_CE.t() - off_expert_EC).reshape(-1)
    to_expert = rows + torch.repeat_interleave(shift_EC, flat_EC, output_size=n)
    shift_CE = (off_expert_EC.t() - off_chunk_CE).reshape(-1)
    to_chunk = rows + torch.repeat_interleave(shift_CE, flat_CE, output_size=n)
    return to_expert, to_chunk


@dataclass(frozen=True)
class LocalMeta:
    """What LocalDispatcher.combine needs: the local permutation and permuted probabilities."""

    index: RoutingIndex
    probs_N: torch.Tensor
    num_tokens: int
    tokens_per_expert: tuple[int, ...]


@dataclass(frozen=True)
class AllToAllMeta:
    """What AllToAllDispatcher.combine needs to reverse the dispatch exactly."""

    index: RoutingIndex
    probs_N: torch.Tensor
    num_tokens: int
    tokens_per_expert: tuple[int, ...]
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
    tokens_per_expert: tuple[int, ...]


class LocalDispatcher:
    """All experts on this rank: the simplest dispatcher."""

    def __init__(self, num_experts: int, backend: str = "torch"):
        self.num_experts = num_experts
        self.permute, self.unpermute = get_ops(backend)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """Sort the kept (token, expert) pairs by expert: (x_ND, meta)."""
        index = routing_index(routing.indices_TK, self.num_experts)
        x_ND, probs_N = self.permute(x_TD, routing.probs_TK, index)
        tpe = tuple(index.tokens_per_expert_E.tolist())
        return x_ND, LocalMeta(index, probs_N, x_TD.shape[0], tpe)

    def combine(self, y_ND: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        """Probability-weighted sum of each token's expert outputs: out_TD."""
        return self.unpermute(y_ND, meta.probs_N, meta.index)


class AllToAllDispatcher:
    """EP all-to-all plus ETP all-gather (Megatron's `MoEAlltoAllTokenDispatcher`)."""

    def __init__(self, num_experts: int, dims: ParallelDims, counter: CommCounter | None, backend="torch"):
        self.num_experts, self.dims, self.counter = num_experts, dims, counter
        self.num_local = num_experts // dims.ep
        self.permute, self.unpermute = get_ops(backend)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """Send pairs to the EP rank owning their expert, gather over ETP: (x_MD, meta)."""
        ep, etp, El = self.dims.group("ep"), self.dims.group("etp"), self.num_local
        index = routing_index(routing.indices_TK, self.num_experts)
        x_ND, probs_N = self.permute(x_TD, routing.probs_TK, index)
        # Exchange per-expert counts so every rank knows what it receives.
        send_counts_PE = index.tokens_per_expert_E.view(ep.size, El)
        recv_counts_PE = all_to_all_v(
            send_counts_PE, [1] * ep.size, [1] * ep.size, ep, self.counter, "ep.counts"
        )
        send = send_counts_PE.sum(1).tolist()
        recv = recv_counts_PE.sum(1).tolist()
        x_RD = all_to_all_v(x_ND, recv, send, ep, self.counter, "ep.all_to_all")
        # Gather over ETP: chunks ordered [etp rank][ep source][local expert].
        counts_CE = all_gather_v(recv_counts_PE, [ep.size] * etp.size, etp, self.counter, "etp.counts")
        etp_sizes = counts_CE.view(etp.size, -1).sum(1).tolist()
        x_GD = all_gather_v(x_RD, etp_sizes, etp, self.counter, "etp")
        to_expert, to_chunk = chunk_permutation(counts_CE)
        tpe = tuple(counts_CE.sum(0).tolist())
        meta = AllToAllMeta(
            index, probs_N, x_TD.shape[0], tpe, tuple(send), tuple(recv), tuple(etp_sizes),
            to_expert, to_chunk,
        )
        return x_GD[to_expert], meta

    def combine(self, y_MD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        """Reduce-scatter over ETP, return rows over EP, unpermute: out_TD."""
        ep, etp = self.dims.group("ep"), self.dims.group("etp")
        y_GD = y_MD[meta.to_chunk]
        y_RD = reduce_scatter_v(y_GD, meta.etp_sizes, etp, self.counter, "etp")
        y_ND = all_to_all_v(y_RD, meta.send_splits, meta.recv_splits, ep, self.counter, "ep.all_to_all")
        return self.unpermute(y_ND, meta.probs_N, meta.index)


class AllGatherDispatcher:
    """Gather every token of the ETP x EP group, compute the local experts' share, scatter back."""

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
        index = routing_index(local_GK, self.num_local)
        x_ND, probs_N = self.permute(x_GD, probs_GK, index)
        tpe = tuple(index.tokens_per_expert_E.tolist())
        return x_ND, AllGatherMeta(index, probs_N, x_GD.shape[0], tuple(sizes), tpe)

    def combine(self, y_ND: torch.Tensor, meta: AllGatherMeta) -> torch.Tensor:
        """Unpermute into the gathered tokens, reduce-scatter back: out_TD."""
        out_GD = self.unpermute(y_ND, meta.probs_N, meta.index)
        return reduce_scatter_v(out_GD, meta.token_sizes, self.dims.group("tp_ep"), self.counter, "tp_ep")


def make_dispatcher(kind: str, num_experts: int, dims: ParallelDims, counter, backend="torch"):
    """The dispatcher of `kind` ('alltoall' | 'allgather'); local when ETP x EP is one rank."""
    if dims.group("tp_ep").size == 1:
        return LocalDispatcher(num_experts, backend)
    if kind == "alltoall":
        return AllToAllDispatcher(num_experts, dims, counter, backend)
    if kind == "allgather":
        return AllGatherDispatcher(num_experts, dims, counter, backend)
    raise ValueError(f"dispatcher={kind!r}: use 'alltoall' or 'allgather'")
