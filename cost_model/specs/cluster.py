"""The cluster: nodes of identical GPUs and the links between them."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..profile_model import Profile
from .common import _Spec

MAX_WORLD_SIZE = 131_072


class GPUSpec(_Spec):
    """One accelerator. Rates are dense (no sparsity)."""

    name: str = Field(..., min_length=1, max_length=64, description="GPU name.")
    peak_tflops: float = Field(..., ge=1e-3, le=1e6, description="Dense bf16 peak, TFLOP/s.")
    memory_gib: float = Field(..., ge=1e-3, le=1e5, description="Memory usable by one process, GiB.")
    hbm_GBps: float = Field(..., ge=1e-3, le=1e6, description="Memory bandwidth, GB/s.")
    fp8_tflops: float | None = Field(
        None, ge=1e-3, le=1e6, description="Dense fp8 peak; null = bf16 rate (no fp8 tensor cores)."
    )
    fp32_tflops: float | None = Field(
        None, ge=1e-3, le=1e6, description="fp32 (TF32 where the GPU has it) peak; null = bf16/2."
    )
    compute_capability: float | None = Field(
        None, ge=1, le=100, description="CUDA compute capability (8.0 Ampere, 9.0 Hopper, 10.0 "
        "Blackwell); null = unknown (options that need an architecture are not checked)."
    )
    intra_node_GBps: float | None = Field(None, ge=1e-3, le=1e6, description="Default NVLink GB/s.")
    host_GBps: float | None = Field(
        None, ge=1e-3, le=1e6, description="GPU <-> host memory GB/s per direction (PCIe or "
        "NVLink-C2C), what activation offloading copies over; null = no host link to offload "
        "over.")
    inter_node_GBps: float | None = Field(None, ge=1e-3, le=1e6, description="Default network GB/s.")
    gemm_efficiency: float | None = Field(
        None, ge=0.01, le=1, description="Sustained fraction of peak in large GEMMs."
    )
    memory_reserve_gib: float = Field(
        2.0, ge=0, le=1e5, description="Fixed allowance for buffers and workspaces, GiB."
    )
    comm_overlap: bool = Field(
        True, description="Collectives can run under compute (false for CPU ranks)."
    )
    intra_node_latency_us: float = Field(5.0, ge=0, le=1e6, description="Per collective step.")
    inter_node_latency_us: float = Field(12.0, ge=0, le=1e6, description="Per collective step.")
    source: str | None = Field(None, description="Where these numbers come from.")


class NetworkTier(_Spec):
    """One tier of the network beyond the NVLink domain (a leaf switch, a rail, a spine)."""

    name: str = Field(..., min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="Tier name, reported by /v1/layout (`tiers`); not 'nvlink'.")
    gpus: int = Field(..., ge=1, le=MAX_WORLD_SIZE,
                      description="GPUs one unit of this tier connects (a leaf switch's GPUs).")
    GBps: float = Field(..., ge=1e-3, le=1e6,
                        description="GB/s per GPU per direction, before oversubscription.")
    latency_us: float = Field(12.0, ge=0, le=1e6, description="Per collective step across it.")
    oversubscription: float = Field(
        1.0, ge=1.0, le=1024, description="Downlinks over uplinks of this tier's switches "
        "(2 = 2:1): traffic that crosses it gets GBps / oversubscription per GPU.")


DEFAULT_TIER_NAME = "network"


def check_links(world_size: int, gpus_per_node: int, domain: int,
                network: list[NetworkTier] | None, inter_field: str | None = None) -> None:
    """Raise ValueError naming the field when the NVLink domains or the network tiers do not
    fit the cluster (the one home of these rules: the cluster and /v1/layout call it).
    `inter_field` names a given inter-node setting, which the network replaces."""
    if domain % gpus_per_node and gpus_per_node % domain:
        raise ValueError(f"nvlink_domain_size={domain} must be a multiple or a divisor of "
                         f"gpus_per_node={gpus_per_node}")
    if world_size % domain:
        raise ValueError(f"nvlink_domain_size={domain}: the {world_size} GPUs do not make "
                         "whole NVLink domains")
    if network is None:
        return
    if inter_field is not None:
        raise ValueError(f"network and {inter_field} are both given: the network's tiers say "
                         "what crosses nodes (give one or the other)")
    inner, inner_name = domain, "nvlink_domain_size"
    names = set()
    for i, tier in enumerate(network):
        if tier.name == "nvlink" or tier.name in names:
            raise ValueError(f"network[{i}].name={tier.name!r}: names must be unique and not "
                             "'nvlink'")
        names.add(tier.name)
        if tier.gpus <= inner or tier.gpus % inner:
            raise ValueError(f"network[{i}].gpus={tier.gpus} must be a multiple of "
                             f"{inner_name}={inner} and larger than it (innermost first)")
        inner, inner_name = tier.gpus, f"network[{i}].gpus"
    if inner < world_size:
        raise ValueError(f"network[{len(network) - 1}].gpus={inner}: the outermost tier must "
                         f"connect all {world_size} GPUs")


class ClusterSpec(_Spec):
    """Nodes of identical GPUs; bandwidths are per GPU, per direction.

    Links: GPUs of one NVLink domain (`nvlink_domain_size`, default one node) talk over NVLink
    at `intra_node_GBps`; beyond a domain traffic crosses the tiers of `network`, innermost
    first; a group of ranks is priced on the outermost tier its ranks cross
    (`cost_model/layout.py`). Without `network`: one tier of `inter_node_GBps`.
    """

    num_nodes: int = Field(..., ge=1, le=MAX_WORLD_SIZE, description="Number of nodes.")
    gpus_per_node: int = Field(..., ge=1, le=1024, description="GPUs per node.")
    gpu: str | GPUSpec = Field(
        "h100", description="GPU preset id (h100, h200, h800, a100-80gb, b200, gb200, cpu) or a GPU object."
    )
    intra_node_GBps: float | None = Field(
        None, ge=1e-3, le=1e6, description="Inside a node, GB/s per GPU per direction."
    )
    inter_node_GBps: float | None = Field(
        None, ge=1e-3, le=1e6, description="Across nodes, GB/s per GPU per direction."
    )
    intra_node_latency_us: float | None = Field(
        None, ge=0, le=1e6, description="Per collective step inside a node; null = GPU preset's."
    )
    inter_node_latency_us: float | None = Field(
        None, ge=0, le=1e6, description="Per collective step across nodes; null = GPU preset's."
    )
    nvlink_domain_size: int | None = Field(
        None, ge=1, le=MAX_WORLD_SIZE, description="GPUs sharing one NVLink domain (72 in a "
        "GB200 NVL72 rack, often used as 64-GPU segments); a multiple or divisor of "
        "gpus_per_node; null = gpus_per_node.")
    network: list[NetworkTier] | None = Field(
        None, min_length=1, max_length=8, description="Tiers beyond the NVLink domain, "
        "innermost first (e.g. leaf then spine); each tier's `gpus` a multiple of the one "
        "inside it, the outermost connecting every GPU. null = one tier of inter_node_GBps.")
    profile: Profile | None = Field(
        None, description="Output of `foldplan profile`; measured numbers replace datasheet ones."
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        if self.world_size > MAX_WORLD_SIZE:
            raise ValueError(
                f"num_nodes*gpus_per_node = {self.world_size} exceeds the limit of "
                f"{MAX_WORLD_SIZE} GPUs"
            )
        inter = next((f for f in ("inter_node_GBps", "inter_node_latency_us")
                      if getattr(self, f) is not None), None)
        check_links(self.world_size, self.gpus_per_node, self.domain_size, self.network, inter)
        return self

    @property
    def domain_size(self) -> int:
        """GPUs per NVLink domain (resolved)."""
        return self.nvlink_domain_size or self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node
