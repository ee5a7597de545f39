"""Time of single kernels and collectives on one GPU and its links.

GEMM: the larger of a compute bound and a memory bound. The compute bound derates the peak by
a sustained efficiency, by wave quantization of 128x256 output tiles over the SMs (a GEMM whose
tiles do not fill the last wave leaves SMs idle) and by a short-k penalty k/(k + k_half).
Collective: latency per step + bytes over the slowest link the group crosses, where a group
spread over nodes shares its node's network links as described in `_ring_link_time` and
`alltoall_time`. What one collective sends and how many latency steps it takes is
`collective_bytes_and_steps`, the one convention the cost model prices with and the profiler
(executor/profile/fit.py) fits measured times with.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from .hardware import Hardware
from .layout import GroupPlacement

CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]
COLLECTIVE_OPS: tuple[str, ...] = get_args(CollectiveOp)


def gemm_time(hw: Hardware, prec: str, m: float, n: float, k: float, groups: int = 1,
              elem_bytes: float = 2.0) -> float:
    """Seconds for `groups` GEMMs of (m x k) @ (k x n)."""
    if m <= 0 or n <= 0 or k <= 0:
        return 0.0
    flops = 2.0 * m * n * k * groups
    tiles = math.ceil(m / hw.tile_m) * math.ceil(n / hw.tile_n) * groups
    waves = math.ceil(tiles / hw.num_sms)
    wave_eff = tiles / (waves * hw.num_sms)
    k_eff = k / (k + hw.k_half)
    t_compute = flops / (hw.peak_flops[prec] * hw.gemm_efficiency * wave_eff * k_eff)
    t_memory = (m * k + k * n + m * n) * groups * elem_bytes / (hw.hbm_bps * hw.memory_efficiency)
    return max(t_compute, t_memory)


def linear_time(hw: Hardware, prec: str, tokens: float, n_in: float, n_out: float,
                groups: int = 1, elem_bytes: float = 2.0) -> tuple[float, float]:
    """(forward, backward) seconds of a linear layer: fwd, then dgrad + wgrad. Kept in
    `hw.memo` (a pure function of `hw` and the arguments: the planner asks ~100k times for
    under 1k shapes)."""
    key = ("linear", prec, tokens, n_in, n_out, groups, elem_bytes)
    hit = hw.memo.get(key)
    if hit is not None:
        return hit
    if len(hw.memo) > 200_000:  # a long-lived service: keep the memo bounded
        hw.memo.clear()
    hw.memo[key] = out = _linear_time(hw, prec, tokens, n_in, n_out, groups, elem_bytes)
    return out


def _linear_time(hw: Hardware, prec: str, tokens: float, n_in: float, n_out: float,
                 groups: int, elem_bytes: float) -> tuple[float, float]:
    fwd = gemm_time(hw, prec, tokens, n_out, n_in, groups, elem_bytes)
    dgrad = gemm_time(hw, prec, tokens, n_in, n_out, groups, elem_bytes)
    wgrad = gemm_time(hw, prec, n_in, n_out, tokens, groups, elem_bytes)
    return fwd, dgrad + wgrad


def memory_time(hw: Hardware, num_bytes: float) -> float:
    return num_bytes / (hw.hbm_bps * hw.memory_efficiency)


def collective_bytes_and_steps(op: CollectiveOp, num_ranks: int, size_bytes: float,
                               ranks_per_node: int | None = None) -> tuple[float, float]:
    """(bytes each rank sends, latency steps) of one `op` over `num_ranks` ranks.

    `size_bytes` is each rank's buffer as torch.distributed names it: the tensor of an
    all-reduce (S), each rank's input of an all-gather (C), each rank's full input of a
    reduce-scatter (S) and of an all-to-all (V). Ring algorithms for the first three (NCCL's
    and gloo's; Thakur, Rabenseifner and Gropp 2005, "Optimization of collective
    communication operations in MPICH"), a pairwise exchange for the all-to-all:

      all_reduce      2(p-1)/p * S   2(p-1) steps   (a reduce-scatter, then an all-gather)
      all_gather      (p-1) * C      p-1
      reduce_scatter  (p-1)/p * S    p-1
      all_to_all      (p-1)/p * V    1 + (p-1)/k    (k = ranks_per_node, default p: the
                                                     p-1 sends go out k at a time, plus
                                                     one step to start)

    Worked example, p = 4 on one node, 1000 bytes: all_reduce (1500, 6), all_gather
    (3000, 3), reduce_scatter (750, 3), all_to_all (750, 1.75). One rank: (0, 0).
    """
    p = num_ranks
    if p <= 1:
        return 0.0, 0.0
    if op == "all_reduce":
        sent, steps = collective_bytes_and_steps("reduce_scatter", p, size_bytes)
        return 2.0 * sent, 2.0 * steps
    if op == "reduce_scatter":
        return size_bytes * (p - 1) / p, float(p - 1)
    if op == "all_gather":
        return size_bytes * (p - 1), float(p - 1)
    if op == "all_to_all":
        return size_bytes * (p - 1) / p, (p - 1) / max(1, ranks_per_node or p) + 1.0
    raise ValueError(f"op={op!r} is not one of {', '.join(COLLECTIVE_OPS)}")


def _latency(hw: Hardware, p: GroupPlacement) -> float:
    return hw.link_latency_s[p.tier]


def _network_bps(hw: Hardware, p: GroupPlacement, efficiency: float) -> float:
    """What a group that leaves its NVLink domain gets per GPU: the outermost tier it crosses
    (the slowest one it needs: after oversubscription, outer tiers are never faster)."""
    return min(hw.link_bps[1:p.tier + 1]) * efficiency


def _ring_link_time(hw: Hardware, p: GroupPlacement, bytes_sent_per_rank: float) -> float:
    """Bandwidth term of a ring: NVLink inside a domain; a group spread over domains with k
    members per domain crosses the network once per domain per ring, and all groups of the
    kind run at once, so the G GPUs of a domain carry G/k rings' crossings on their G links:
    V/(k * link) per GPU, on the slowest tier the group crosses."""
    t = bytes_sent_per_rank / (hw.intra_bps * hw.intra_collective_eff)
    if p.crosses_domain:
        t = max(t, bytes_sent_per_rank
                / (p.per_domain * _network_bps(hw, p, hw.inter_collective_eff)))
    return t


def collective_time(hw: Hardware, p: GroupPlacement, op: CollectiveOp, size_bytes: float,
                    load_factor: float = 1.0) -> float:
    """Seconds of one `op` over group `p`, each rank's buffer `size_bytes` as in
    `collective_bytes_and_steps`; `load_factor` (all-to-all only) is the busiest receiver's
    bytes over the mean."""
    if op == "all_to_all":
        return alltoall_time(hw, p, size_bytes, load_factor)
    if p.size <= 1 or size_bytes <= 0:
        return 0.0
    sent, steps = collective_bytes_and_steps(op, p.size, size_bytes, p.per_domain)
    return _ring_link_time(hw, p, sent) + steps * _latency(hw, p)


def ring_time(hw: Hardware, p: GroupPlacement, bytes_sent_per_rank: float) -> float:
    """One all-gather or reduce-scatter ring in which each rank sends `bytes_sent_per_rank`
    (for callers that count those bytes themselves, e.g. one step of the CP ring)."""
    if p.size <= 1 or bytes_sent_per_rank <= 0:
        return 0.0
    # A ring's latency steps do not depend on its bytes.
    _, steps = collective_bytes_and_steps("all_gather", p.size, 0.0, p.per_domain)
    return _ring_link_time(hw, p, bytes_sent_per_rank) + steps * _latency(hw, p)


def alltoall_time(hw: Hardware, p: GroupPlacement, bytes_per_rank: float,
                  load_factor: float = 1.0) -> float:
    """All-to-all where each rank holds `bytes_per_rank` spread evenly over the group's ranks.

    (n - k)/n of it leaves the NVLink domain over the rank's own network link (priced on the
    slowest tier the group crosses), (k - 1)/n stays on NVLink; the busiest receiver gets
    `load_factor` times the mean.
    """
    n = p.size
    if n <= 1 or bytes_per_rank <= 0:
        return 0.0
    k = p.per_domain
    _, steps = collective_bytes_and_steps("all_to_all", n, bytes_per_rank, k)
    vol = bytes_per_rank * load_factor
    t = vol * (k - 1) / n / (hw.intra_bps * hw.intra_alltoall_eff)
    if p.crosses_domain:
        t = max(t, vol * (n - k) / n / _network_bps(hw, p, hw.inter_alltoall_eff))
    return t + steps * _latency(hw, p)


def p2p_time(hw: Hardware, p: GroupPlacement, num_bytes: float) -> float:
    """One send between neighbours of group `p` (a pipeline send), on its outermost link."""
    if num_bytes <= 0:
        return 0.0
    if p.crosses_domain:
        return num_bytes / _network_bps(hw, p, hw.inter_collective_eff) + _latency(hw, p)
    return num_bytes / (hw.intra_bps * hw.intra_collective_eff) + _latency(hw, p)
