"""Server-rendered HTML: the index of recent plans, the plan page, the run page and its
downloads, HTML 404 pages and the favicon."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from cost_model.presets import resolve_gpu

from .. import db as store
from ..deps import SessionDep
from ..pages_view import (
    HEADROOM_WHY,
    headroom,
    layout_grid,
    mapping_rows,
    megatron_text,
    memory_chart,
    time_chart,
)
from ..run_view import metrics_csv, run_data
from ..schemas import PlanAnswer
from ..service import foldplan_version, presets
from ..verify import verification_answer, verifications_of_plan
from .runs import run_answer

templates = Jinja2Templates(directory=Path(__file__).parent.parent / "templates")
STATIC_DIR = Path(__file__).parent.parent / "static"
router = APIRouter(tags=["pages"], include_in_schema=False)
# The sizes the index form can fix (`fixed` of POST /v1/plans); recompute has its own select.
FORM_FIXED_FIELDS = ("tp", "cp", "pp", "vpp", "ep", "etp", "micro_batch_size")


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
        "fixed_fields": FORM_FIXED_FIELDS, "version": foldplan_version(),
    })


def not_found(request: Request, kind: str, item_id: str) -> HTMLResponse:
    """The HTML 404 page of an unknown plan or run id (the /v1 twins answer JSON)."""
    return templates.TemplateResponse(
        request, "404.html", {"kind": kind, "item_id": item_id, "version": foldplan_version()},
        status_code=404)


def offered_backends(request: Request, plan: dict[str, Any], candidate: int
                     ) -> list[dict[str, str | None]]:
    """The server's run backends for the run form: `name`, and `reason` when that backend
    cannot run this plan's candidate here (not configured, too large for this host)."""
    runner = request.app.state.runner
    job = runner.job("page", plan, candidate, 1)
    return [{"name": name, "reason": runner.unavailable(name, job)}
            for name in sorted(runner.backends)]


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(request: Request, plan_id: str, s: SessionDep,
              c: Annotated[int, Query(ge=0, le=49)] = 0,
              node: Annotated[int | None, Query(ge=0, le=131_072)] = None) -> HTMLResponse:
    row = store.get_plan(s, plan_id)
    if row is None:
        return not_found(request, "plan", plan_id)
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
           # the verify section's latest verification (verify.js follows it while it runs)
           "verifications": [verification_answer(v).model_dump(mode="json")
                             for v in verifications_of_plan(s, plan_id)],
           "unfolded": plan.search.best_unfolded}
    if plan.candidates:
        backends = offered_backends(request, row.answer, chosen)
        ctx.update(time_chart=time_chart(plan), memory_chart=memory_chart(plan),
                   layout=layout_grid(plan, chosen, node),
                   mapping_rows=mapping_rows([c.mapping for c in plan.candidates]),
                   headrooms=[headroom(c.estimate.memory) for c in plan.candidates],
                   headroom_why=HEADROOM_WHY, backends=backends,
                   default_backend=next((b["name"] for b in backends if not b["reason"]), None),
                   megatron_text=megatron_text(plan.candidates[chosen].megatron_args))
    return templates.TemplateResponse(request, "plan.html", ctx)


def _run_data(s: Any, run_id: str) -> dict[str, Any] | None:
    """The run page's data of a stored run (api/run_view.run_data), None for an unknown id."""
    r = store.get_run(s, run_id)
    if r is None:
        return None
    plan = store.get_plan(s, r.plan_id)
    return run_data(run_answer(r).model_dump(mode="json"), plan.answer, r.attempts)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str, s: SessionDep) -> HTMLResponse:
    """The page of one run: live charts of its metrics against the prediction, its mapping,
    log and downloads (drawn by api/static/run_page.js from /runs/{id}/data.json)."""
    data = _run_data(s, run_id)
    if data is None:
        return not_found(request, "run", run_id)
    return templates.TemplateResponse(request, "run.html", {
        "data": data, "run": data["run"], "version": foldplan_version()})


@router.get("/runs/{run_id}/data.json")
def run_page_data(run_id: str, s: SessionDep) -> JSONResponse:
    """What the run page draws (api/run_view.run_data); it polls this while the run is going."""
    data = _run_data(s, run_id)
    if data is None:
        raise HTTPException(404, f"no run with id {run_id!r}")
    return JSONResponse(data)


@router.get("/runs/{run_id}/metrics.csv")
def run_metrics_csv(run_id: str, s: SessionDep) -> Response:
    """The run's per-step metrics as CSV (a download)."""
    data = _run_data(s, run_id)
    if data is None:
        raise HTTPException(404, f"no run with id {run_id!r}")
    return Response(metrics_csv(data["columns"]), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="run-{run_id}-metrics.csv"'})


@router.get("/runs/{run_id}/metrics.json")
def run_metrics_json(run_id: str, s: SessionDep) -> Response:
    """The run's `metrics` object, as GET /v1/runs/{id} answers it, plus the per-step columns
    of the CSV (a download)."""
    data = _run_data(s, run_id)
    if data is None:
        raise HTTPException(404, f"no run with id {run_id!r}")
    body = {"run_id": run_id, "metrics": data["run"]["metrics"], "per_step": data["columns"],
            "predicted": data["run"]["predicted"]}
    return Response(json.dumps(body, indent=1), media_type="application/json", headers={
        "Content-Disposition": f'attachment; filename="run-{run_id}-metrics.json"'})
