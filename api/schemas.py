"""Request and answer models shared by the HTTP API and the CLI (same JSON in both).

Field names follow ../shared/CONTRACT.md exactly. Database tables live in `db.py`; nothing here
knows about storage.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from cost_model.estimate import Estimate
from cost_model.specs import (
    MAX_WORLD_SIZE,
    ClusterSpec,
    GPUSpec,
    HFConfigRef,
    Mapping,
    ModelSpec,
    NetworkTier,
    PresetRef,
    TrainingSpec,
)
from cost_model.specs.cluster import DEFAULT_TIER_NAME, check_links
from planner.result import Candidate, SearchInfo


def _model_kind(value: Any) -> str:
    """Pick the model input variant by its keys, so errors name one variant's fields."""
    if isinstance(value, dict):
        if "preset" in value:
            return "preset"
        if "hf_config" in value:
            return "hf_config"
        return "spec"
    if isinstance(value, PresetRef):
        return "preset"
    if isinstance(value, HFConfigRef):
        return "hf_config"
    return "spec"


ModelField = Annotated[
    Annotated[ModelSpec, Tag("spec")]
    | Annotated[PresetRef, Tag("preset")]
    | Annotated[HFConfigRef, Tag("hf_config")],
    Discriminator(_model_kind),
    Field(
        description="A model spec (Megatron-LM names), {'preset': id} or {'hf_config': {...}}.",
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A partial mapping: every Mapping field, optional, with Mapping's own constraints.
_fixed_fields: dict[str, Any] = {
    name: (
        Annotated[(f.annotation, *f.metadata)] | None if f.metadata else f.annotation | None,
        Field(None, description=f.description),
    )
    for name, f in Mapping.model_fields.items()
}


class _FixedBase(_Request):
    @field_validator("order", check_fields=False)
    @classmethod
    def _check_order(cls, v: str | None) -> str | None:
        return None if v is None else Mapping._check_order(v)


FixedMapping = create_model(  # type: ignore[call-overload]
    "FixedMapping",
    __base__=_FixedBase,
    __doc__="A partial mapping the plan must keep, e.g. {'tp': 2, 'ep': 8}.",
    **_fixed_fields,
)


class EstimateRequest(_Request):
    """Body of POST /v1/estimate and input of `foldplan estimate`."""

    model: ModelField
    cluster: ClusterSpec
    training: TrainingSpec
    mapping: Mapping | None = Field(None, description="One mapping (give this or `mappings`).")
    mappings: list[Mapping] | None = Field(
        None, min_length=1, max_length=1024, description="A batch of mappings, answered in order."
    )

    @model_validator(mode="after")
    def _one_of(self) -> EstimateRequest:
        if (self.mapping is None) == (self.mappings is None):
            raise ValueError("give exactly one of `mapping` and `mappings`")
        return self


class EstimateError(BaseModel):
    """In a `mappings` batch: the place of a mapping that cannot run."""

    error: str = Field(..., description="Why this mapping is invalid.")


class PlanRequest(_Request):
    """Body of POST /v1/plans and input of `foldplan plan`."""

    model: ModelField
    cluster: ClusterSpec
    training: TrainingSpec
    top_k: int = Field(5, ge=1, le=50, description="How many ranked candidates to return.")
    fixed: FixedMapping | None = Field(  # type: ignore[valid-type]
        None, description="A partial mapping the plan must keep, e.g. {'tp': 2, 'ep': 8}."
    )
    time_limit_s: float | None = Field(
        None, gt=0, le=600, description="Planner time limit in seconds; null = server default."
    )

    def fixed_dict(self) -> dict[str, Any] | None:
        """The fixed fields that were given, as the planner takes them."""
        if self.fixed is None:
            return None
        return self.fixed.model_dump(exclude_none=True) or None


class PlanAnswer(BaseModel):
    """Answer of POST /v1/plans and GET /v1/plans/{id} (stored and returned unchanged)."""

    id: str = Field(..., description="Plan id.")
    foldplan_version: str = Field(..., description="foldplan version that made the plan.")
    created_at: str = Field(..., description="UTC time of creation, ISO 8601.")
    model: ModelSpec = Field(..., description="The resolved model (full spec).")
    cluster: ClusterSpec
    training: TrainingSpec
    top_k: int = Field(..., description="Candidates asked for.")
    fixed: dict[str, Any] | None = Field(None, description="The partial mapping kept fixed.")
    model_notes: list[str] = Field(
        default_factory=list, description="How a preset or hf_config was mapped to the spec."
    )
    candidates: list[Candidate] = Field(..., description="Best first.")
    search: SearchInfo


class PlanSummary(BaseModel):
    """One row of GET /v1/plans."""

    id: str
    created_at: str
    model_name: str | None
    num_gpus: int
    gpu: str
    status: str = Field(..., description="The search status: OPTIMAL, FEASIBLE, INFEASIBLE or "
                        "UNKNOWN (time limit before any fitting mapping).")
    best_step_time_s: float | None
    best_mfu: float | None


class PlanList(BaseModel):
    """A page of stored plans, newest first."""

    items: list[PlanSummary]
    total: int
    limit: int
    offset: int


class LayoutRequest(_Request):
    """Body of POST /v1/layout and input of `foldplan layout`."""

    world_size: int = Field(..., ge=1, le=MAX_WORLD_SIZE, description="Number of GPUs.")
    gpus_per_node: int = Field(..., ge=1, le=1024, description="GPUs per node.")
    nvlink_domain_size: int | None = Field(
        None, ge=1, le=MAX_WORLD_SIZE, description="GPUs per NVLink domain (as in the "
        "cluster); null = gpus_per_node.")
    network: list[NetworkTier] | None = Field(
        None, min_length=1, max_length=8, description="Network tiers beyond the NVLink domain, "
        "innermost first (as in the cluster); null = one tier named 'network'.")
    mapping: Mapping

    @model_validator(mode="after")
    def _check_links(self) -> LayoutRequest:
        check_links(self.world_size, self.gpus_per_node, self.domain_size, self.network)
        return self

    @property
    def domain_size(self) -> int:
        return self.nvlink_domain_size or self.gpus_per_node

    @property
    def tier_units(self) -> tuple[int, ...]:
        return (tuple(t.gpus for t in self.network) if self.network
                else (max(self.world_size, self.domain_size),))

    @property
    def tier_names(self) -> tuple[str, ...]:
        return ("nvlink",) + (tuple(t.name for t in self.network) if self.network
                              else (DEFAULT_TIER_NAME,))


class LayoutAnswer(BaseModel):
    """Rank groups of one mapping by Megatron-Core's rule."""

    groups: dict[str, list[list[int]]] = Field(
        ..., description="For each of tp, cp, dp, pp, ep, etp, edp: the list of rank lists."
    )
    crosses_node: dict[str, bool] = Field(
        ..., description="For each key: whether any of its groups spans two nodes."
    )
    crosses_domain: dict[str, bool] = Field(
        ..., description="For each key: whether any of its groups spans two NVLink domains."
    )
    tiers: dict[str, str] = Field(
        ..., description="For each key: the name of the outermost link its groups cross: "
        "'nvlink' when they stay inside an NVLink domain, else a network tier's name."
    )


class ModelPreset(BaseModel):
    id: str
    source: str = Field(..., description="Where the dimensions come from.")
    spec: ModelSpec


class PresetsAnswer(BaseModel):
    """Built-in models and GPUs, keyed by id."""

    models: dict[str, ModelPreset]
    gpus: dict[str, GPUSpec]


RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class RunRequest(_Request):
    """Body of POST /v1/plans/{id}/runs."""

    candidate: int = Field(0, ge=0, le=49, description="Index into the plan's candidates.")
    steps: int = Field(..., ge=1, le=10_000_000, description="Training steps to run.")
    backend: Literal["local", "slurm"] = Field(
        "local", description="Where to run; how a backend reaches its machines is server config."
    )
    save_every: int | None = Field(
        None, ge=1, le=10_000_000, description="Checkpoint into the run folder every K steps "
        "(null: never). An elastic run resumes from the latest one.")
    on_failure: Literal["fail", "replan"] = Field(
        "fail", description="When nodes are lost: `fail` the run, or `replan` for the nodes "
        "left and resume from the latest checkpoint (see docs/API.md, elastic runs).")
    min_nodes: int = Field(
        1, ge=1, le=MAX_WORLD_SIZE, description="With `replan`: fewer nodes left than this "
        "fails the run instead of re-planning.")
    max_nodes: int | None = Field(
        None, ge=1, le=MAX_WORLD_SIZE, description="With `replan`: when the backend offers more "
        "nodes than the run trains on (nodes came back), re-plan up to this many at the next "
        "checkpoint; null: never grow.")
    init_hf: str | None = Field(
        None, max_length=1024, description="Start from this Hugging Face model folder: a name "
        "relative to the server's FOLDPLAN_MODELS_DIR (no leading '/', no '..'). The plan must "
        "have been made from its config.json (`model.hf_config`).")
    data: str | None = Field(
        None, max_length=1024, description="Train on this Megatron indexed dataset: a prefix "
        "relative to the server's FOLDPLAN_DATA_DIR (PREFIX.bin/.idx, e.g. from `foldplan "
        "tokenize`); null: the bundled corpus.")


class Attempt(BaseModel):
    """One attempt of a run: the steps it trained on one mapping (api/elastic.py)."""

    plan_id: str | None = Field(None, description="The plan of this attempt's mapping (the "
                                "run's own plan first, then the re-plans); null while planning.")
    candidate: int | None = Field(None, description="Index of the candidate in that plan.")
    mapping: dict[str, Any] | None = Field(None, description="The mapping trained on.")
    num_nodes: int = Field(..., description="Nodes of this attempt.")
    start_step: int | None = Field(None, description="First step (1-based) of this attempt: "
                                   "the step after the checkpoint it resumed from.")
    end_step: int | None = Field(None, description="Last step it finished (inclusive).")
    status: Literal["replanning", "starting", "running", "succeeded", "failed", "cancelled",
                    "stopped"] = Field(..., description="replanning/starting: the run is "
                                       "recovering from the previous attempt's end; stopped: "
                                       "ended after a checkpoint to grow onto more nodes.")
    error: str | None = Field(None, description="Why this attempt ended, if it failed.")
    recovery_s: float | None = Field(None, description="Seconds from the detection of the "
                                     "previous attempt's failure to this attempt's first step.")
    lost_nodes: list[int] = Field(default_factory=list, description="Nodes (0-based) this "
                                  "attempt lost.")
    failed_at: str | None = Field(None, description="When the loss was detected (UTC).")
    stopped_at: str | None = Field(None, description="When it was stopped to grow (UTC).")
    started_at: str | None = Field(None, description="When this attempt's job started (UTC).")
    predicted_step_time_s: float | None = Field(None, description="The plan's estimate for "
                                                "this attempt's candidate.")


class RunAnswer(BaseModel):
    """A run of one plan candidate."""

    id: str
    plan_id: str
    candidate: int
    steps: int
    backend: str
    status: RunStatus
    metrics: dict[str, Any] | None = Field(
        None, description="Measured: the executor's metrics.json (executor/run_files.py "
        "`RunMetrics`: per-step `loss`, `aux_loss` and `steps` lists, `step_times_s`, "
        "`step_time_s` (median after the first step), `tokens_per_s`, ...) with `mfu` counted "
        "against the prediction's FLOPs and peak; while the run is still going, the steps so "
        "far from its progress lines and `partial: true`."
    )
    predicted: dict[str, Any] | None = Field(
        None, description="The cost model's estimate for the machine the run uses; `machine` "
        "says which (the plan's cluster, or the server's profiled machine); `num_gpus` and "
        "`peak_flops_per_gpu` are what its MFU is counted against."
    )
    error: str | None = None
    log_tail: str | None = None
    job: dict[str, Any] | None = Field(
        None, description="The backend's job of the current attempt: local {\"pid\": ..., "
        "\"nodes\": [{\"node\": i, \"pgid\": <process group id>}, ...]} (one torchrun agent per "
        "node), slurm {\"job_id\": ...}; null between two attempts of an elastic run."
    )
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    save_every: int | None = Field(None, description="As requested.")
    on_failure: Literal["fail", "replan"] = Field("fail", description="As requested.")
    min_nodes: int = Field(1, description="As requested.")
    max_nodes: int | None = Field(None, description="As requested.")
    init_hf: str | None = Field(None, description="As requested.")
    data: str | None = Field(None, description="As requested.")
    attempts: list[Attempt] = Field(
        default_factory=list, description="One per mapping the run trained on, in order; an "
        "elastic run that lost nodes has more than one (steps 1-based and inclusive; steps "
        "trained again after a rollback replace their earlier entries in `metrics`).")


class VerifyRequest(_Request):
    """Body of POST /v1/plans/{id}/verify: run some candidates for a few steps each, one after
    the other, and rank them by measured step time."""

    candidates: list[Annotated[int, Field(ge=0, le=49)]] | None = Field(
        None, min_length=1, max_length=10, description="Indices into the plan's candidates, "
        "each at most once; null = the first three (all, when the plan has fewer).")
    steps: int = Field(5, ge=2, le=10_000, description="Training steps per candidate (the "
                       "measured step time is the median after the first, warm-up, step).")
    backend: Literal["local", "slurm"] = Field(
        "local", description="Where the runs go, as for POST /v1/plans/{id}/runs.")

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"candidates={v} names a candidate twice")
        return v


class VerifiedCandidate(BaseModel):
    """One candidate of a verification: its prediction, its run and what the run measured."""

    candidate: int = Field(..., description="Index into the plan's candidates.")
    run_id: str | None = Field(None, description="Its run (GET /v1/runs/{id}); null until it "
                               "starts.")
    status: str = Field(..., description="'waiting' before its run exists, then the run's "
                        "status; 'failed' with `error` when the run could not be started.")
    predicted_step_time_s: float = Field(..., description="The run's prediction (the plan's "
                                         "estimate, or the server's run profile's).")
    measured_step_time_s: float | None = Field(None, description="The run's median step time "
                                               "after the warm-up step; null until it succeeds.")
    predicted_rank: int = Field(..., description="1 = fastest predicted among these.")
    measured_rank: int | None = Field(None, description="1 = fastest measured among those "
                                      "measured.")
    error: str | None = None


class VerificationAnswer(BaseModel):
    """A verification of a plan's top candidates (GET /v1/verifications/{id})."""

    id: str
    plan_id: str
    status: RunStatus = Field(..., description="queued, running (a candidate is training), "
                              "succeeded (every run over, at least one measured), failed, "
                              "cancelled.")
    steps: int
    backend: str
    candidates: list[VerifiedCandidate] = Field(..., description="In the order asked.")
    spearman: float | None = Field(None, description="Spearman rank correlation of predicted "
                                   "and measured step times over the measured candidates; null "
                                   "with fewer than 2 measured (or all equal).")
    measured_over_predicted: float | None = Field(
        None, description="Median of measured / predicted step time over the measured "
        "candidates: how far this machine is from the prediction.")
    error: str | None = None
    created_at: str
    finished_at: str | None = None


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorAnswer(BaseModel):
    """Every 4xx answer: `detail` names the offending fields."""

    detail: list[ErrorItem] | str
    reasons: list[str] | None = None


__all__ = [
    "EstimateRequest", "EstimateError", "Estimate", "PlanRequest", "PlanAnswer", "PlanSummary",
    "PlanList", "LayoutRequest", "LayoutAnswer", "PresetsAnswer", "ModelPreset", "RunRequest",
    "RunAnswer", "Attempt", "ErrorAnswer", "FixedMapping", "VerifyRequest", "VerifiedCandidate",
    "VerificationAnswer",
]
