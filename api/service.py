"""What the endpoints and the CLI do, as plain functions over the request models.

No HTTP and no database here: the routers and `cli.py` call these, so the same JSON gives the
same answer in both. Input problems raise `RequestError` (a field path and a message) or
`cost_model.validate.InvalidMapping` (reasons); both become 422 answers or one-line CLI errors.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata, resources
from typing import Any

from cost_model.estimate import Estimate, estimate
from cost_model.layout import GROUP_KINDS, build_layout
from cost_model.presets import (
    gpu_presets,
    import_hf_config,
    model_presets,
    preset_source,
    resolve_gpu,
)
from cost_model.specs import ClusterSpec, HFConfigRef, ModelSpec, PresetRef
from cost_model.validate import InvalidMapping

from .schemas import (
    EstimateError,
    EstimateRequest,
    LayoutAnswer,
    LayoutRequest,
    ModelPreset,
    PlanAnswer,
    PlanRequest,
    PresetsAnswer,
)


class RequestError(ValueError):
    """A request value the service cannot use; `loc` is the field path inside the body."""

    def __init__(self, loc: tuple[str | int, ...], msg: str):
        super().__init__(f"{'.'.join(map(str, loc))}: {msg}")
        self.loc = loc
        self.msg = msg


@lru_cache(maxsize=1)
def foldplan_version() -> str:
    try:
        return metadata.version("foldplan")
    except metadata.PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def cost_model_constants() -> dict[str, Any]:
    """The cost model's data files as they are now: stored with each plan as provenance."""
    data = resources.files("cost_model").joinpath("data")
    return {
        name: json.loads(data.joinpath(name).read_text())
        for name in ("gpus.json", "efficiency.json")
    }


def resolve_model_input(model: Any) -> tuple[ModelSpec, list[str]]:
    """Full spec for any model input; raises RequestError naming `model.<field>`."""
    if isinstance(model, ModelSpec):
        return model, []
    if isinstance(model, PresetRef):
        try:
            spec = model_presets()[model.preset]
        except KeyError:
            known = ", ".join(sorted(model_presets()))
            raise RequestError(
                ("model", "preset"), f"unknown model preset {model.preset!r}; known: {known}"
            ) from None
        return spec, [f"preset {model.preset}: {preset_source(model.preset)}"]
    if isinstance(model, HFConfigRef):
        try:
            return import_hf_config(model.hf_config)
        except ValueError as exc:  # UnsupportedConfig names hf_config.<key> itself
            raise RequestError(("model", "hf_config"), str(exc)) from exc
    raise RequestError(("model",), f"not a model input: {type(model).__name__}")


def check_cluster(cluster: ClusterSpec) -> None:
    try:
        resolve_gpu(cluster.gpu)
    except ValueError as exc:
        raise RequestError(("cluster", "gpu"), str(exc)) from exc


def run_estimate(req: EstimateRequest) -> Estimate | list[Estimate | EstimateError]:
    """One estimate (InvalidMapping propagates) or a batch with errors in place."""
    model, _ = resolve_model_input(req.model)
    check_cluster(req.cluster)
    if req.mapping is not None:
        return estimate(model, req.cluster, req.training, req.mapping)
    out: list[Estimate | EstimateError] = []
    for m in req.mappings or []:
        try:
            out.append(estimate(model, req.cluster, req.training, m))
        except InvalidMapping as exc:
            out.append(EstimateError(error=str(exc)))
    return out


def make_plan(req: PlanRequest, time_limit_s: float | None,
              plan_id: str | None = None) -> PlanAnswer:
    """Run the planner and wrap its result in the contract's plan answer."""
    from planner.search import plan  # imported here: the planner is the heavy dependency

    model, notes = resolve_model_input(req.model)
    check_cluster(req.cluster)
    fixed = req.fixed_dict()
    try:
        result = plan(model, req.cluster, req.training, top_k=req.top_k, fixed=fixed,
                      time_limit_s=time_limit_s)
    except InvalidMapping as exc:
        raise RequestError(("fixed",), str(exc)) from exc
    return PlanAnswer(
        id=plan_id or uuid.uuid4().hex,
        foldplan_version=foldplan_version(),
        created_at=now_iso(),
        model=model,
        cluster=req.cluster,
        training=req.training,
        top_k=req.top_k,
        fixed=fixed,
        model_notes=notes,
        candidates=result.candidates,
        search=result.search,
    )


def run_layout(req: LayoutRequest) -> LayoutAnswer:
    try:
        layout = build_layout(req.world_size, req.gpus_per_node, req.mapping,
                              req.domain_size, req.tier_units)
    except (ValueError, AssertionError) as exc:
        raise RequestError(("mapping",), str(exc)) from exc
    return LayoutAnswer(
        groups={k: layout.groups[k] for k in GROUP_KINDS},
        crosses_node={k: layout.crosses_node(k) for k in GROUP_KINDS},
        crosses_domain={k: layout.crosses_domain(k) for k in GROUP_KINDS},
        tiers={k: req.tier_names[layout.tier(k)] for k in GROUP_KINDS},
    )


@lru_cache(maxsize=1)
def presets() -> PresetsAnswer:
    return PresetsAnswer(
        models={
            k: ModelPreset(id=k, source=preset_source(k), spec=v)
            for k, v in model_presets().items()
        },
        gpus=gpu_presets(),
    )
