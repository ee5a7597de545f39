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
    PresetRef,
    TrainingSpec,
)
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
    mapping: Mapping


class LayoutAnswer(BaseModel):
    """Rank groups of one mapping by Megatron-Core's rule."""

    groups: dict[str, list[list[int]]] = Field(
        ..., description="For each of tp, cp, dp, pp, ep, etp, edp: the list of rank lists."
    )
    crosses_node: dict[str, bool] = Field(
        ..., description="For each key: whether any of its groups spans two nodes."
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
        None, description="The backend's job: {\"pid\": ...} (local) or {\"job_id\": ...} (slurm)."
    )
    created_at: str
    started_at: str | None = None
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
    "RunAnswer", "ErrorAnswer", "FixedMapping",
]
