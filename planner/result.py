"""What a plan returns: ranked candidates and the search's own account of itself."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from cost_model.estimate import Estimate
from cost_model.specs import Mapping


class Candidate(BaseModel):
    """One complete mapping with its estimate and what to run."""

    mapping: Mapping = Field(..., description="Complete mapping (dp, edp filled in).")
    estimate: Estimate = Field(..., description="The cost model's answer for this mapping.")
    megatron_args: list[str] = Field(..., description="Megatron-LM command-line arguments.")
    launch_scripts: dict[str, str] = Field(
        default_factory=dict, description="'torchrun' (per node) and 'sbatch' scripts."
    )
    folded: bool = Field(
        ..., description="True when the MoE layout differs from the classic one (etp != tp or "
        "ep not carved out of dp alone)."
    )


class SearchInfo(BaseModel):
    """How the search went."""

    status: Literal["OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNKNOWN"] = Field(
        ..., description="OPTIMAL: the best under the cost model, proven; FEASIBLE: the best "
        "found when the time limit cut the search; INFEASIBLE: nothing fits (see reasons); "
        "UNKNOWN: the time limit passed before any fitting mapping was found.")
    wall_time_s: float = Field(..., description="Planner time from validated request to answer.")
    reasons: list[str] = Field(default_factory=list, description="Why nothing fits, if so.")
    space_size: int = Field(0, description="Mappings in the search space (before memory).")
    num_feasible: int = Field(0, description="Valid mappings that fit in memory.")
    solver: dict[str, float | int | str] = Field(
        default_factory=dict, description="CP-SAT statistics (branches, conflicts, ...)."
    )
    objective_resolution_s: float = Field(
        0.0, description="Step-time resolution of the solver's integer objective, seconds."
    )
    best_unfolded: dict | None = Field(
        None, description="Best classic (unfolded) mapping and its step time, for comparison."
    )


class PlanResult(BaseModel):
    candidates: list[Candidate]
    search: SearchInfo
