"""The profile of a machine: what `foldplan profile` writes and `ClusterSpec.profile` carries.

executor/profile measures a machine and writes a `Profile` as JSON; `load_profile` is the one
way to read such a file back; cost_model/hardware.py reads its numbers in place of datasheet
ones. A measured rate or latency is a finite number in [1e-6, 1e9); null means "not
measured" (the cluster's or the GPU preset's value applies). Keys beyond the fields below are
kept as given (a profile merged by hand may carry its own).

`step_time_scale` is not measured by `foldplan profile`: it is the correction a finished
verification of a plan's top-k measured on these machines (the median of measured / predicted
step time; GET /v1/verifications/{id}/profile writes it, api/verify.py `correction_profile`).
cost_model/estimate.py `to_estimate` multiplies every predicted step time and its breakdown by
it. A uniform factor cannot change which mapping is fastest, so the planner's ranking and its
search are the same with or without it: only the predicted numbers (step time, tokens/s, MFU)
move towards what the machines measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic import model_validator

PROFILE_VERSION = 1
MEASURED_MIN, MEASURED_MAX = 1e-6, 1e9
# A step-time correction outside this range says the prediction was for other machines (or a
# run measured something else), not that the model is off by that much: refused.
STEP_SCALE_MIN, STEP_SCALE_MAX = 1e-3, 1e3
# A measured rate or latency: a number (not a string or a bool). `Profile` checks the bounds,
# naming the field; the JSON schema states them.
Measured = Annotated[float, Field(strict=True, json_schema_extra={
    "minimum": MEASURED_MIN, "exclusiveMaximum": MEASURED_MAX})]


def _check_measured(name: str, x: float) -> None:
    if not MEASURED_MIN <= x < MEASURED_MAX:  # NaN fails every comparison
        raise ValueError(f"profile.{name}={x!r} must be a number in [1e-6, 1e9)")


Count = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class GemmShapeLaw(BaseModel):
    """rate(m, n, k) = tflops * m/(m + m_half) * n/(n + n_half) * k/(k + k_half): one GEMM
    of (m x k) @ (k x n) of the executor's precision, fitted to a grid of small shapes
    (raw.small_gemm); cost_model/foldplan_runtime.py `gemm_shape_rate`."""

    model_config = ConfigDict(frozen=True)

    tflops: Measured = Field(..., description="Rate of a GEMM large in every dimension, "
                             "TFLOP/s of one rank.")
    m_half: Count = Field(..., description="Rows at which the rate halves (for m alone).")
    n_half: Count = Field(..., description="Output columns at which the rate halves.")
    k_half: Count = Field(..., description="Inner dimension at which the rate halves.")


class ExecutorProfile(BaseModel):
    """What foldplan's own executor does on this machine, measured by `foldplan profile` on
    tiny instances of its real modules (executor/profile/executor_ops.py); read by
    `training.runtime: foldplan` (cost_model/foldplan_runtime.py). Counts are per rank."""

    model_config = ConfigDict(frozen=True)

    us_per_op: Measured = Field(..., description="Wall time of one dispatched op of the "
                                "executor's own mix (autograd, Python, dispatch, allocation), "
                                "microseconds: a tiny model's micro-batch over its op count.")
    edge_ops: Count = Field(..., description="Ops per micro-batch outside the decoder layers: "
                            "embedding, output layer, loss and the schedule, forward + backward.")
    dense_layer_ops: Count = Field(..., description="Ops of one dense layer per micro-batch, "
                                   "forward + backward.")
    moe_layer_ops: dict[str, Count] = Field(..., description="Ops of one MoE layer per "
                                            "micro-batch, forward + backward, by expert layout "
                                            "(foldplan_runtime.moe_layer_ops_key: local, "
                                            "alltoall_ep, allgather_ep, alltoall_etp, "
                                            "alltoall_ep_etp; _capacity with token dropping).")
    moe_layer_collectives: dict[str, dict[str, Count]] = Field(
        default_factory=dict, description="Collective calls of one MoE layer per micro-batch "
        "by expert layout (keys as moe_layer_ops), then by kind (all_reduce, all_to_all, "
        "all_gather, reduce_scatter; the executor builds uneven gathers on all_to_all).")
    step_collectives: dict[str, Count] = Field(
        default_factory=dict, description="Collective calls per step outside the "
        "micro-batches by kind, measured with every rank in the expert layout ep = world.")
    step_ops: Count = Field(..., description="Ops per step outside the micro-batches (gradient "
                            "reduction, norm, clipping, optimizer), besides the per-layer ones.")
    step_ops_per_layer: Count = Field(..., description="Ops per step outside the micro-batches "
                                      "for each decoder layer.")
    weight_bytes_per_param: dict[str, Count] = Field(..., description="Bytes that non-GEMM ops "
                                                     "move per parameter per micro-batch "
                                                     "(main-gradient accumulation, weight "
                                                     "copies), by part: moe_layer, "
                                                     "dense_layer, edge.")
    row_passes: dict[str, Count] = Field(..., description="Bytes that non-GEMM ops move per "
                                         "token per micro-batch, in h-wide rows of 4 bytes "
                                         "(moe_layer, dense_layer) or V-wide logit rows (edge).")
    optimizer_ns_per_param: Measured = Field(..., description="AdamW step (the executor's "
                                             "optimizer on its shard), nanoseconds per "
                                             "parameter of the shard.")
    step_rest_ns_per_param: Count = Field(..., description="The rest of the step outside the "
                                          "micro-batches (gradient flattening, norm, "
                                          "clipping, zeroing), nanoseconds per parameter of "
                                          "the rank, less its ops' fixed cost.")
    gemm: GemmShapeLaw = Field(..., description="GEMM rate by shape (small m, n, k).")
    sdpa_tflops: Measured = Field(..., description="Causal attention forward + backward, "
                                  "TFLOP/s as the cost model counts its FLOPs.")
    traffic_GBps: dict[str, Measured] = Field(..., description="{bytes of an h-wide "
                                              "activation (tokens x h x 4): GB/s} at which "
                                              "the executor's non-GEMM ops move data inside a "
                                              "real training step of a model of that row "
                                              "size (cold caches, fresh allocations).")
    cpu_share: dict[str, Measured] = Field(
        default_factory=dict, description="{expert layout (keys as moe_layer_ops: local, "
        "local_dp, alltoall_ep): share of a core each rank's thread gets while the profile's "
        "ranks train a model together in that layout} (executor/profile/lockstep.py: CPU "
        "time over wall time of the steps: cores time-shared by ranks and other processes, "
        "waits at collective calls). On CPU ranks the other executor numbers are CPU time "
        "and a step's wall time is their sum over the share; empty (share 1) on GPUs and in "
        "profiles whose executor numbers are wall time.")

    @model_validator(mode="after")
    def _check_rates(self) -> ExecutorProfile:
        for name in ("us_per_op", "optimizer_ns_per_param", "sdpa_tflops"):
            _check_measured(f"executor.{name}", getattr(self, name))
        _check_measured("executor.gemm.tflops", self.gemm.tflops)
        for size, x in self.traffic_GBps.items():
            _check_measured(f"executor.traffic_GBps.{size}", x)
            if not size.isdigit():
                raise ValueError(f"profile.executor.traffic_GBps key {size!r} must be a "
                                 "size in bytes")
        if not self.traffic_GBps:
            raise ValueError("profile.executor.traffic_GBps must hold at least one size")
        for layout, x in self.cpu_share.items():
            _check_measured(f"executor.cpu_share.{layout}", x)
        return self


class Profile(BaseModel):
    """Measured rates of one machine: one rank per GPU, or `nproc` CPU ranks per host."""

    model_config = ConfigDict(extra="allow", frozen=True)

    foldplan_profile_version: int = Field(
        PROFILE_VERSION, ge=1, description="Format version of this profile.")
    gemm_tflops: dict[str, Measured] | None = Field(
        None, description="{precision (fp32, bf16, fp8): sustained TFLOP/s of one rank in "
        "large GEMMs}, the median over the profiled shapes.")
    hbm_GBps: Measured | None = Field(
        None, description="One rank's memory bandwidth, GB/s (a large copy: read + write).")
    kernel_overhead_us: Measured | None = Field(
        None, description="Fixed cost of one small op, microseconds (eager dispatch on CPU, "
        "launch on GPU).")
    gemm_k_half: float | None = Field(
        None, ge=0, allow_inf_nan=False, strict=True,
        description="k at which a GEMM reaches half its large-k rate, fitted to a sweep over k "
        "(raw.gemm.k_sweep); not read by the cost model yet.")
    intra_node_GBps: Measured | None = Field(
        None, description="Collective bandwidth per rank per direction between ranks of one "
        "host, GB/s.")
    intra_node_latency_us: Measured | None = Field(
        None, description="Latency per collective step between ranks of one host, "
        "microseconds.")
    inter_node_GBps: Measured | None = Field(
        None, description="Collective bandwidth per rank per direction across hosts, GB/s.")
    inter_node_latency_us: Measured | None = Field(
        None, description="Latency per collective step across hosts, microseconds.")
    nproc: int | None = Field(None, ge=1, strict=True, description="Ranks profiled.")
    threads_per_rank: int | None = Field(
        None, ge=1, strict=True, description="CPU threads of each rank while profiling.")
    backend: str | None = Field(None, description="Collective backend measured: gloo or nccl.")
    notes: str | None = Field(None, description="What the numbers cover, in words.")
    raw: dict[str, Any] | None = Field(
        None, description="Every measurement behind the numbers above (executor/profile).")
    machine: dict[str, Any] | None = Field(
        None, description="Host, CPU, memory, torch version and CUDA devices profiled.")
    executor: ExecutorProfile | None = Field(
        None, description="foldplan's own executor on this machine (ops, per-op cost, GEMM "
        "rate by shape, bandwidth by size, optimizer per parameter): what `training.runtime: "
        "foldplan` predicts with. Null: not measured (runtime foldplan then predicts with "
        "the numbers above, as megatron does).")
    step_time_scale: float | None = Field(
        None, strict=True, json_schema_extra={"minimum": STEP_SCALE_MIN,
                                              "maximum": STEP_SCALE_MAX},
        description="Measured / predicted step time of a verification on these machines (the "
        "median over its candidates): every predicted step time is multiplied by it. It moves "
        "the predicted numbers, never the ranking. Null: no correction.")
    step_time_scale_source: dict[str, Any] | None = Field(
        None, description="Where step_time_scale comes from: verification_id, plan_id, "
        "the per-candidate ratios and the machine the predictions were for.")

    @field_validator("hbm_GBps", "kernel_overhead_us", "intra_node_GBps",
                     "intra_node_latency_us", "inter_node_GBps", "inter_node_latency_us")
    @classmethod
    def _check_rate(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None:
            _check_measured(info.field_name, v)
        return v

    @field_validator("step_time_scale")
    @classmethod
    def _check_scale(cls, v: float | None) -> float | None:
        if v is not None and not STEP_SCALE_MIN <= v <= STEP_SCALE_MAX:  # NaN fails too
            raise ValueError(f"profile.step_time_scale={v!r} must be a number in "
                             f"[{STEP_SCALE_MIN:g}, {STEP_SCALE_MAX:g}]: measured / predicted "
                             "step time of a verification")
        return v

    @field_validator("gemm_tflops", mode="before")
    @classmethod
    def _check_gemm_object(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict):
            raise ValueError("profile.gemm_tflops must be an object {precision: TFLOP/s}")
        return v

    @field_validator("gemm_tflops")
    @classmethod
    def _check_gemm(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for prec, x in (v or {}).items():
            _check_measured(f"gemm_tflops.{prec}", x)
        return v


def step_time_scale(profile: Profile | None) -> float:
    """The factor every predicted step time is multiplied by: the profile's
    `step_time_scale`, 1.0 without a profile or a correction."""
    if profile is None or profile.step_time_scale is None:
        return 1.0
    return profile.step_time_scale


def load_profile(path: str | Path) -> Profile:
    """The profile in the JSON file `path` (what `foldplan profile --out` wrote).

    Raises OSError when the file cannot be read, ValueError when it is not JSON or not a
    profile (a pydantic ValidationError naming the field, e.g. profile.hbm_GBps).
    """
    return Profile.model_validate(json.loads(Path(path).read_text()))
