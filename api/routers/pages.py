"""Server-rendered HTML: the index of recent plans and the readable plan page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from cost_model.presets import resolve_gpu

from .. import db as store
from ..deps import SessionDep
from ..pages_view import layout_grid, mapping_rows, megatron_text, memory_chart, time_chart
from ..schemas import PlanAnswer
from ..service import foldplan_version, presets
from .runs import run_answer

templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")
router = APIRouter(tags=["pages"], include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index(request: Request, s: SessionDep) -> HTMLResponse:
    rows, total = store.list_plans(s, 50, 0)
    p = presets()
    return templates.TemplateResponse(request, "index.html", {
        "plans": [{**{c: getattr(r, c) for c in ("id", "model_name", "num_gpus", "gpu", "status",
                                                  "best_step_time_s", "best_mfu")},
                   "created_at": store.iso(r.created_at).replace("T", " ").replace("+00:00", "")}
                  for r in rows],
        "total": total, "model_ids": sorted(p.models), "gpu_ids": sorted(p.gpus),
        "version": foldplan_version(),
    })


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(request: Request, plan_id: str, s: SessionDep,
              c: Annotated[int, Query(ge=0, le=49)] = 0) -> HTMLResponse:
    row = store.get_plan(s, plan_id)
    if row is None:
        raise HTTPException(404, f"no plan with id {plan_id!r}")
    try:
        plan = PlanAnswer.model_validate(row.answer)
    except ValidationError as exc:  # stored by a version whose answer differs from this one
        return HTMLResponse(
            f"<!doctype html><title>foldplan plan</title><p>Plan {html.escape(plan_id)} was made "
            f"by foldplan {html.escape(row.foldplan_version)} and cannot be drawn by this version "
            f"({exc.error_count()} differences). <a href='/v1/plans/{html.escape(plan_id)}'>"
            "Its JSON</a> is unchanged.</p>")
    chosen = min(c, max(len(plan.candidates) - 1, 0))
    ctx = {"plan": plan, "chosen": chosen, "version": foldplan_version(),
           "gpu_name": resolve_gpu(plan.cluster.gpu).name if isinstance(plan.cluster.gpu, str)
           else plan.cluster.gpu.name,
           # the runs table's first rows (runs.js draws them): what GET /v1/plans/{id}/runs says
           "runs": [run_answer(r).model_dump(mode="json") for r in store.runs_of_plan(s, plan_id)],
           "unfolded": plan.search.best_unfolded}
    if plan.candidates:
        ctx.update(time_chart=time_chart(plan), memory_chart=memory_chart(plan),
                   layout=layout_grid(plan, chosen), mapping_rows=mapping_rows(plan),
                   megatron_text=megatron_text(plan.candidates[chosen].megatron_args))
    return templates.TemplateResponse(request, "plan.html", ctx)
