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


class ClusterSpec(_Spec):
    """Nodes of identical GPUs; bandwidths are per GPU, per direction."""

    num_nodes: int = Field(..., ge=1, le=MAX_WORLD_SIZE, description="Number of nodes.")
    gpus_per_node: int = Field(..., ge=1, le=1024, description="GPUs per node.")
    gpu: str | GPUSpec = Field(
        "h100", description="GPU preset id (h100, h200, a100-80gb, b200, cpu) or a GPU object."
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
        return self

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node
