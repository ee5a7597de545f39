"""Runs of a plan candidate (background, via the executor)."""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query

from .. import db as store
from ..deps import RunAuth, RunnerDep, SessionDep, SettingsDep
from ..elastic import RunOptions
from ..run_inputs import resolve_run_inputs
from ..runner import executor_refusal
from ..schemas import ErrorAnswer, RunAnswer, RunRequest, RunStatus
from ..service import RequestError
from . import BAD_INPUT, NOT_FOUND
from .examples import RUN_EXAMPLES
from .plans import load_plan

router = APIRouter(tags=["runs"])
AUTH = {401: {"model": ErrorAnswer, "description": "Token required."},
        403: {"model": ErrorAnswer, "description": "No token configured: loopback only."}}


def finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a diverged run's non-finite numbers are answered as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def run_answer(r: store.RunRow) -> RunAnswer:
    opts = RunOptions.of(r)
    return RunAnswer(
        id=r.id, plan_id=r.plan_id, candidate=r.candidate, steps=r.steps, backend=r.backend,
        status=r.status, metrics=finite(r.metrics), predicted=finite(r.predicted), error=r.error,
        log_tail=r.log_tail, job=r.job, created_at=store.iso(r.created_at),
        started_at=store.iso(r.started_at), finished_at=store.iso(r.finished_at),
        save_every=opts.save_every or None, on_failure=opts.on_failure, min_nodes=opts.min_nodes,
        max_nodes=opts.max_nodes,
        init_hf=(r.options or {}).get("init_hf"), data=(r.options or {}).get("data"),
        attempts=finite(r.attempts or []),
    )


@router.post("/v1/plans/{plan_id}/runs", status_code=202, response_model=RunAnswer,
             summary="Start a run of one candidate", dependencies=[RunAuth],
             responses={**BAD_INPUT, **NOT_FOUND, **AUTH})
def create_run(
    plan_id: str,
    req: Annotated[RunRequest, Body(openapi_examples=RUN_EXAMPLES)],
    s: SessionDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> RunAnswer:
    plan = load_plan(s, plan_id)
    candidates = plan.answer["candidates"]
    if req.candidate >= len(candidates):
        raise RequestError(("candidate",), f"candidate={req.candidate} but the plan has "
                           f"{len(candidates)} candidates")
    if req.on_failure == "replan" and (req.init_hf or req.data):
        field = "init_hf" if req.init_hf else "data"
        raise RequestError((field,), f"{field} with on_failure='replan' is not supported yet "
                           "(the re-planned attempts do not carry it)")
    inputs = resolve_run_inputs(settings, plan.answer, req.candidate, req.init_hf, req.data)
    refusal = None if inputs.init_hf else executor_refusal(plan.answer, req.candidate)
    if refusal:
        raise RequestError(("candidate",), f"candidate {req.candidate} uses what foldplan's "
                           f"executor cannot run: {refusal}")
    num_nodes = plan.answer["cluster"]["num_nodes"]
    if req.min_nodes > num_nodes:
        raise RequestError(("min_nodes",), f"min_nodes={req.min_nodes} but the plan's cluster "
                           f"has {num_nodes} nodes")
    if req.max_nodes is not None and (req.on_failure != "replan" or req.max_nodes < num_nodes):
        raise RequestError(("max_nodes",), f"max_nodes={req.max_nodes} needs on_failure='replan' "
                           f"and at least the plan's {num_nodes} nodes")
    run_id = uuid.uuid4().hex
    why = runner.unavailable(req.backend, runner.job(run_id, plan.answer, req.candidate, req.steps,
                                                     req.save_every or 0))
    if why:
        raise RequestError(("backend",), why)
    if req.on_failure == "replan" and not runner.backends[req.backend].reports_lost_nodes:
        raise RequestError(("on_failure",), f"on_failure='replan' needs a backend that reports "
                           f"lost nodes; backend={req.backend!r} does not (use 'local')")
    row = store.RunRow(
        id=run_id, plan_id=plan_id, candidate=req.candidate, steps=req.steps,
        backend=req.backend, status="queued",
        options={"save_every": req.save_every, "on_failure": req.on_failure,
                 "min_nodes": req.min_nodes, "max_nodes": req.max_nodes, **inputs.options()},
        predicted=runner.predict(plan.answer, req.candidate), created_at=store.utcnow(),
    )
    s.add(row)
    s.commit()  # visible to the worker before it starts
    runner.submit(row.id)
    return run_answer(row)


@router.get("/v1/plans/{plan_id}/runs", response_model=list[RunAnswer],
            summary="Runs of a plan, newest first", responses=NOT_FOUND)
def list_runs(
    plan_id: str, s: SessionDep,
    status: Annotated[list[RunStatus] | None, Query(
        description="Only runs in these states (repeat the parameter), e.g. "
        "?status=queued&status=running.")] = None,
) -> list[RunAnswer]:
    load_plan(s, plan_id)
    return [run_answer(r) for r in store.runs_of_plan(s, plan_id, status)]


@router.get("/v1/runs/{run_id}", response_model=RunAnswer, summary="A run's status and metrics",
            responses=NOT_FOUND)
def get_run(run_id: str, s: SessionDep) -> RunAnswer:
    r = store.get_run(s, run_id)
    if r is None:
        raise HTTPException(404, f"no run with id {run_id!r}")
    return run_answer(r)


@router.delete("/v1/runs/{run_id}", response_model=RunAnswer, summary="Cancel a run",
               dependencies=[RunAuth], responses={**NOT_FOUND, **AUTH})
def cancel_run(run_id: str, s: SessionDep, runner: RunnerDep) -> RunAnswer:
    if runner.cancel(run_id) is None:
        raise HTTPException(404, f"no run with id {run_id!r}")
    r = store.get_run(s, run_id)
    s.refresh(r)
    return run_answer(r)
