"""Hardware constants of one cluster, resolved once per estimate.

Datasheet numbers come from data/gpus.json; the achievable fractions of them (GEMM, attention,
memory-bound kernels, each link and collective kind) from data/efficiency.json, each with its
source or its reason. A `profile` (`profile_model.Profile`, what `foldplan profile` writes)
replaces them with numbers measured on the user's own machines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from .presets import resolve_gpu
from .profile_model import Profile
from .specs import ClusterSpec
from .specs.cluster import DEFAULT_TIER_NAME


@lru_cache(maxsize=1)
def efficiency_table() -> dict[str, Any]:
    text = resources.files("cost_model").joinpath("data/efficiency.json").read_text()
    return json.loads(text)


def _value(key: str) -> float:
    return float(efficiency_table()[key]["value"])


@dataclass(frozen=True)
class Hardware:
    """Rates in FLOP/s and bytes/s; latencies in seconds."""

    gpu_name: str
    peak_flops: dict[str, float]  # precision -> FLOP/s
    memory_bytes: float
    memory_reserve_bytes: float
    comm_overlap: bool
    hbm_bps: float
    # Links by tier: 0 is NVLink inside a domain of `gpus_per_domain` GPUs, i >= 1 the
    # cluster's network tier i-1 (`ClusterSpec.network`, or one tier of inter_node_GBps).
    gpus_per_domain: int
    tier_units: tuple[int, ...]  # GPUs one unit of each network tier connects
    tier_names: tuple[str, ...]  # "nvlink", then the network tiers' names
    link_bps: tuple[float, ...]  # per GPU per direction, after oversubscription
    link_latency_s: tuple[float, ...]
    gemm_efficiency: float
    attention_fwd_efficiency: float
    attention_bwd_efficiency: float
    attention_kv_half: float
    memory_efficiency: float
    kernel_overhead_s: float
    num_sms: int
    tile_m: int
    tile_n: int
    k_half: float
    intra_collective_eff: float
    inter_collective_eff: float
    intra_alltoall_eff: float
    inter_alltoall_eff: float
    flex_intra_eff: float  # DeepEP / HybridEP NVLink part (data/efficiency.json)
    flex_rdma_eff: float  # ... and network part
    flex_sm_share: float  # share of the SMs its kernels hold while they run
    host_launch_s: float  # host time per counted kernel launch (0: host never binds)
    host_copy_bps: float  # GPU <-> host memory copies, per direction, achieved (0: none)
    # Results of pure functions of these constants and their arguments
    # (`kernels.linear_time`): exact, the same numbers as computing them again.
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def intra_bps(self) -> float:
        """NVLink, per GPU per direction (link tier 0)."""
        return self.link_bps[0]

    @property
    def inter_bps(self) -> float:
        """The innermost network tier, per GPU per direction, after oversubscription."""
        return self.link_bps[1]

    @property
    def intra_latency_s(self) -> float:
        return self.link_latency_s[0]

    @property
    def inter_latency_s(self) -> float:
        return self.link_latency_s[1]

    def mfu_peak_flops(self, precision: str) -> float:
        """The peak MFU is measured against: the dense bf16 rate (also for fp8 training, as
        Megatron-LM and the MoE Parallel Folding paper report it), fp32 for fp32 training."""
        return self.peak_flops["fp32" if precision == "fp32" else "bf16"]


def fp8_gemm_key(recipe: str) -> str:
    """The `Hardware.peak_flops` key of fp8 GEMMs under `recipe` (per-tensor recipes: "fp8")."""
    return "fp8" if recipe in ("delayed", "tensorwise") else f"fp8_{recipe}"


def fp8_cast_bytes(recipe: str) -> float:
    """HBM bytes per element to quantize one GEMM input under `recipe` (data file)."""
    return float(efficiency_table()["fp8_recipes"]["value"][recipe]["cast_bytes"])


def _hardware_impl(cluster: ClusterSpec) -> Hardware:
    gpu = resolve_gpu(cluster.gpu)
    prof = cluster.profile or Profile()
    bf16 = gpu.peak_tflops * 1e12
    fp8_rel = _value("fp8_gemm_relative_efficiency") if gpu.fp8_tflops else 1.0
    peak = {
        "bf16": bf16,
        # Effective fp8 peak: the same sustained fraction as bf16 applies on top of this.
        "fp8": (gpu.fp8_tflops or gpu.peak_tflops) * 1e12 * fp8_rel,
        "fp32": (gpu.fp32_tflops or gpu.peak_tflops / 2) * 1e12,
    }
    gemm_eff = gpu.gemm_efficiency or _value("gemm_efficiency_default")
    # A measured profile gives sustained GEMM rates directly: fold them into the efficiency.
    for prec, measured in (prof.gemm_tflops or {}).items():
        if prec in peak:
            peak[prec] = measured * 1e12 / gemm_eff
    for recipe, row in efficiency_table()["fp8_recipes"]["value"].items():
        peak[fp8_gemm_key(recipe)] = peak["fp8"] * row["gemm_factor"]  # fp8 GEMMs per recipe
    is_cpu = cluster.gpu == "cpu" or gpu.name.lower().startswith("cpu")
    intra = cluster.intra_node_GBps or gpu.intra_node_GBps or 450.0
    inter = cluster.inter_node_GBps or gpu.inter_node_GBps or 50.0
    intra = _first(prof.intra_node_GBps, intra)
    inter = _first(prof.inter_node_GBps, inter)
    measured_links = prof.intra_node_GBps is not None
    intra_latency = _first(prof.intra_node_latency_us, cluster.intra_node_latency_us,
                           gpu.intra_node_latency_us) * 1e-6
    inter_latency = _first(prof.inter_node_latency_us, cluster.inter_node_latency_us,
                           gpu.inter_node_latency_us) * 1e-6
    if cluster.network is None:
        tiers = [(DEFAULT_TIER_NAME, max(cluster.world_size, cluster.domain_size), inter * 1e9,
                  inter_latency)]
    else:
        tiers = [(t.name, t.gpus, t.GBps * 1e9 / t.oversubscription, t.latency_us * 1e-6)
                 for t in cluster.network]
    return Hardware(
        gpu_name=gpu.name,
        peak_flops=peak,
        memory_bytes=gpu.memory_gib * 2**30,
        memory_reserve_bytes=gpu.memory_reserve_gib * 2**30,
        comm_overlap=gpu.comm_overlap,
        # A measured bandwidth is already what kernels reach: undo the derating applied later.
        hbm_bps=(prof.hbm_GBps / _value("memory_bound_efficiency") if prof.hbm_GBps is not None
                 else gpu.hbm_GBps) * 1e9,
        gpus_per_domain=cluster.domain_size,
        tier_units=tuple(t[1] for t in tiers),
        tier_names=("nvlink",) + tuple(t[0] for t in tiers),
        link_bps=(intra * 1e9,) + tuple(t[2] for t in tiers),
        link_latency_s=(intra_latency,) + tuple(t[3] for t in tiers),
        gemm_efficiency=gemm_eff,
        attention_fwd_efficiency=_value("attention_fwd_efficiency"),
        attention_bwd_efficiency=_value("attention_bwd_efficiency"),
        attention_kv_half=0.0 if is_cpu else _value("attention_kv_half"),
        memory_efficiency=_value("memory_bound_efficiency"),
        kernel_overhead_s=_first(
            prof.kernel_overhead_us,
            _value("cpu_op_overhead_us") if is_cpu else _value("kernel_overhead_us"),
        )
        * 1e-6,
        num_sms=1 if is_cpu else int(_value("num_sms_" + _sm_key(gpu.name))),
        tile_m=1 if is_cpu else 128,
        tile_n=1 if is_cpu else 256,
        k_half=0.0 if is_cpu else _value("gemm_k_half"),
        intra_collective_eff=1.0 if measured_links else _value("intra_collective_efficiency"),
        inter_collective_eff=1.0 if measured_links else _value("inter_collective_efficiency"),
        intra_alltoall_eff=1.0 if measured_links else _value("intra_alltoall_efficiency"),
        inter_alltoall_eff=1.0 if measured_links else _value("inter_alltoall_efficiency"),
        # On CPU ranks the host runs the ops themselves: kernel_overhead_s already counts it.
        host_launch_s=0.0 if is_cpu else _value("host_launch_us") * 1e-6,
        host_copy_bps=0.0 if is_cpu or not gpu.host_GBps
        else gpu.host_GBps * 1e9 * _value("host_copy_efficiency"),
        flex_intra_eff=_value("flex_intranode_efficiency"),
        flex_rdma_eff=_value("flex_rdma_efficiency"),
        flex_sm_share=0.0 if is_cpu else min(1.0, _value("flex_sms")
                                              / int(_value("num_sms_" + _sm_key(gpu.name)))),
    )


def _first(*values) -> float:
    """The first value that is set (a profile's, the cluster's, the GPU preset's)."""
    return float(next(v for v in values if v is not None))


def _sm_key(name: str) -> str:
    n = name.lower()
    for key in ("b200", "a100"):
        if key in n:
            return key
    return "hopper"


def _cluster_key(cluster: ClusterSpec) -> str:
    return cluster.model_dump_json()


@lru_cache(maxsize=256)
def _cached(key: str) -> Hardware:
    return _hardware_impl(ClusterSpec.model_validate_json(key))


_last: tuple = (None, None)  # (cluster, its Hardware): the same object asks again and again


def hardware(cluster: ClusterSpec) -> Hardware:
    """Resolved constants for `cluster` (cached: the planner asks thousands of times; a
    ClusterSpec is immutable, so the last one asked is answered without serializing it; one
    tuple, replaced whole, so threads never see a cluster with another's answer)."""
    global _last
    last = _last
    if last[0] is cluster:
        return last[1]
    hw = _cached(_cluster_key(cluster))
    _last = (cluster, hw)
    return hw
