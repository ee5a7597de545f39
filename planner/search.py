"""Placeholder: the CP-SAT search lands here next (see planner/result.py for the answer type)."""

from __future__ import annotations

from cost_model.specs import ClusterSpec, ModelSpec, TrainingSpec

from .result import PlanResult


def plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, top_k: int = 5,
         fixed: dict | None = None, time_limit_s: float | None = None) -> PlanResult:
    raise NotImplementedError("planner search not implemented yet")
