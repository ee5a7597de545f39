"""Time of single kernels and collectives on one GPU and its links.

GEMM: the larger of a compute bound and a memory bound. The compute bound derates the peak by
a sustained efficiency, by wave quantization of 128x256 output tiles over the SMs (a GEMM whose
tiles do not fill the last wave leaves SMs idle) and by a short-k penalty k/(k + k_half).
Collective: latency per step + bytes over the slowest link the group crosses, where a group
spread over nodes shares its node's network links as described in `ring_time` and
`alltoall_time`.
"""

from __future__ import annotations

import math

from .hardware import Hardware
from .layout import GroupPlacement


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
    """(forward, backward) seconds of a linear layer: fwd, then dgrad + wgrad."""
    fwd = gemm_time(hw, prec, tokens, n_out, n_in, groups, elem_bytes)
    dgrad = gemm_time(hw, prec, tokens, n_in, n_out, groups, elem_bytes)
    wgrad = gemm_time(hw, prec, n_in, n_out, tokens, groups, elem_bytes)
    return fwd, dgrad + wgrad


def memory_time(hw: Hardware, num_bytes: float) -> float:
    return num_bytes / (hw.hbm_bps * hw.memory_efficiency)


def _latency(hw: Hardware, p: GroupPlacement) -> float:
    return hw.inter_latency_s if p.crosses_node else hw.intra_latency_s


def ring_time(hw: Hardware, p: GroupPlacement, bytes_sent_per_rank: float) -> float:
    """All-gather / reduce-scatter (ring) where each rank sends `bytes_sent_per_rank`.

    Inside a node the bytes cross NVLink. A group spread over nodes with k members per node
    crosses the network once per node per ring; all groups of the kind run at once, so the
    G GPUs of a node carry G/k rings' crossings on their G links: V/(k * link) per GPU.
    """
    if p.size <= 1 or bytes_sent_per_rank <= 0:
        return 0.0
    t = bytes_sent_per_rank / (hw.intra_bps * hw.intra_collective_eff)
    if p.crosses_node:
        t = max(t, bytes_sent_per_rank / (p.per_node * hw.inter_bps * hw.inter_collective_eff))
    return t + (p.size - 1) * _latency(hw, p)


def alltoall_time(hw: Hardware, p: GroupPlacement, bytes_per_rank: float,
                  load_factor: float = 1.0) -> float:
    """All-to-all where each rank holds `bytes_per_rank` spread evenly over the group's ranks.

    (n - k)/n of it leaves the node over the rank's own network link, (k - 1)/n stays on
    NVLink; the busiest receiver gets `load_factor` times the mean.
    """
    n = p.size
    if n <= 1 or bytes_per_rank <= 0:
        return 0.0
    k = p.per_node
    vol = bytes_per_rank * load_factor
    t = vol * (k - 1) / n / (hw.intra_bps * hw.intra_alltoall_eff)
    if p.crosses_node:
        t = max(t, vol * (n - k) / n / (hw.inter_bps * hw.inter_alltoall_eff))
    return t + (n - 1) * _latency(hw, p) / max(1, k) + _latency(hw, p)


def p2p_time(hw: Hardware, crosses_node: bool, num_bytes: float) -> float:
    if num_bytes <= 0:
        return 0.0
    if crosses_node:
        return num_bytes / (hw.inter_bps * hw.inter_collective_eff) + hw.inter_latency_s
    return num_bytes / (hw.intra_bps * hw.intra_collective_eff) + hw.intra_latency_s
