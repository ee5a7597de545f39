"""Plans: create (planner off the event loop, bounded by the time limit), read, list."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .. import db as store
from ..deps import DatabaseDep, SessionDep, SettingsDep
from ..schemas import ErrorAnswer, PlanAnswer, PlanList, PlanRequest, PlanSummary
from ..service import cost_model_constants, make_plan
from . import BAD_INPUT, NOT_FOUND
from .examples import PLAN_EXAMPLES

router = APIRouter(tags=["plans"])


def effective_time_limit(req: PlanRequest, settings: Any) -> float:
    return min(req.time_limit_s or settings.plan_time_limit_s, settings.plan_time_cap_s)


@router.post(
    "/v1/plans",
    status_code=201,
    summary="Plan: ranked mappings for a model on a cluster",
    response_model=PlanAnswer,
    responses={**BAD_INPUT, 504: {"model": ErrorAnswer, "description": "Planner overran."}},
)
async def create_plan(
    req: Annotated[PlanRequest, Body(openapi_examples=PLAN_EXAMPLES)],
    settings: SettingsDep,
    db: DatabaseDep,
    request: Request,
) -> JSONResponse:
    """The search runs on a worker thread with `time_limit_s` (capped by the server); at most
    `FOLDPLAN_PLAN_WORKERS` searches run at once, and time spent waiting for a worker counts
    against the limit. The answer is stored and `GET /v1/plans/{id}` returns it unchanged."""
    limit = effective_time_limit(req, settings)
    plan_id = uuid.uuid4().hex
    try:
        with anyio.fail_after(limit + settings.plan_grace_s):
            answer = await anyio.to_thread.run_sync(
                lambda: make_plan(req, limit, plan_id), abandon_on_cancel=True,
                limiter=request.app.state.plan_limiter,
            )
    except TimeoutError:
        msg = f"the planner did not answer within time_limit_s={limit:g}"
        raise HTTPException(504, msg) from None
    data = answer.model_dump(mode="json")

    def save() -> None:
        with db.session() as s:
            request_record = {"body": req.model_dump(mode="json"), "time_limit_s_used": limit}
            store.insert_plan(s, data, request_record, cost_model_constants())

    await run_in_threadpool(save)
    return JSONResponse(data, status_code=201)


@router.get("/v1/plans", summary="Stored plans, newest first", response_model=PlanList,
            responses=BAD_INPUT)
def list_plans(
    s: SessionDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> PlanList:
    rows, total = store.list_plans(s, limit, offset)
    items = [
        PlanSummary(id=r.id, created_at=store.iso(r.created_at), model_name=r.model_name,
                    num_gpus=r.num_gpus, gpu=r.gpu, status=r.status,
                    best_step_time_s=r.best_step_time_s, best_mfu=r.best_mfu)
        for r in rows
    ]
    return PlanList(items=items, total=total, limit=limit, offset=offset)


def load_plan(s: Any, plan_id: str) -> store.PlanRow:
    row = store.get_plan(s, plan_id)
    if row is None:
        raise HTTPException(404, f"no plan with id {plan_id!r}")
    return row


@router.get("/v1/plans/{plan_id}", summary="A stored plan, exactly as it was answered",
            response_model=PlanAnswer, responses=NOT_FOUND)
def get_plan(plan_id: str, s: SessionDep) -> JSONResponse:
    # The stored JSON as is: not re-validated, so plans made by older versions stay readable.
    return JSONResponse(load_plan(s, plan_id).answer)


@router.get("/v1/plans/{plan_id}/provenance",
            summary="What a plan was made from: request, version, cost-model constants",
            responses=NOT_FOUND)
def get_provenance(plan_id: str, s: SessionDep) -> dict[str, Any]:
    row = load_plan(s, plan_id)
    return {"id": row.id, "foldplan_version": row.foldplan_version, "request": row.request,
            "cost_model_constants": row.constants}
