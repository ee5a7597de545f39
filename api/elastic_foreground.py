"""`foldplan run --on-failure replan`: an elastic run in the foreground, by the service's code.

The run goes through the same run manager as the service's runs (api/runner.py with the
local backend and api/elastic.py), on a SQLite database inside the run folder
(DIR/foldplan-run.db: the plan, the run row, the re-plans), so the CLI twin and the service
cannot drift apart: one torchrun agent per node of the plan's cluster, a lost node re-planned
for the nodes left, the resumed attempt, the same `metrics` (one series across attempts) and
`attempts`. The agents' output is echoed from DIR/train.log; Ctrl-C cancels every node.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from executor.run_files import LOG_FILE

from .backends.local import LocalBackend
from .db import Database, RunRow, get_plan, get_run, insert_plan, utcnow
from .runner import RunManager
from .schemas import Attempt
from .service import cost_model_constants, foldplan_version, now_iso

RUN_DB = "foldplan-run.db"
ATTEMPTS_FILE = "attempts.json"
FINAL = ("succeeded", "failed", "cancelled")


class ElasticRunFailed(RuntimeError):
    """The run ended failed or cancelled; the message is the run's error."""


def _stored_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan answer as the database keeps it (a plan file made by hand may lack the
    bookkeeping fields; candidates need their `estimate`, as `foldplan plan` writes them)."""
    if not all("estimate" in c for c in plan["candidates"]):
        raise ValueError("--on-failure replan needs a plan answer with estimates (as `foldplan "
                         "plan` writes it): a candidate has no 'estimate'")
    return {**plan, "id": plan.get("id") or uuid.uuid4().hex,
            "created_at": plan.get("created_at") or now_iso(),
            "foldplan_version": plan.get("foldplan_version") or foldplan_version(),
            "search": plan.get("search") or {"status": "FEASIBLE", "wall_time_s": 0.0}}


def run_elastic(plan: dict[str, Any], candidate: int, steps: int, out_dir: Path, *,
                seed: int = 0, save_every: int = 0, min_nodes: int = 1,
                replan_time_limit_s: float = 60.0, poll_s: float = 0.5,
                echo: bool = True, backend: LocalBackend | None = None,
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train candidate `candidate` for `steps` steps, re-planning when nodes are lost; return
    the run's metrics and attempts (also written to DIR/attempts.json). Raises
    ElasticRunFailed when the run fails (no mapping fits, fewer than `min_nodes` left, a rank
    error). `backend`: the local backend to use (tests pass one that runs fake nodes)."""
    nodes = plan["cluster"]["num_nodes"]
    if min_nodes > nodes:
        raise ValueError(f"--min-nodes {min_nodes}: the plan's cluster has {nodes} nodes")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stored = _stored_plan(plan)
    db = Database(f"sqlite:///{out / RUN_DB}")
    db.init()
    run_id = uuid.uuid4().hex
    with db.session() as s:
        if get_plan(s, stored["id"]) is None:
            insert_plan(s, stored, {"foldplan_run": True}, cost_model_constants())
        s.add(RunRow(id=run_id, plan_id=stored["id"], candidate=candidate, steps=steps,
                     backend="local", status="queued", created_at=utcnow(), out_dir=str(out),
                     options={"save_every": save_every or None, "on_failure": "replan",
                              "min_nodes": min_nodes, "seed": seed}))
    manager = RunManager(db, out.parent, {"local": backend or LocalBackend()}, poll_s=poll_s,
                         replan_time_limit_s=replan_time_limit_s)
    offset = 0
    try:
        while True:
            manager.tick()
            offset = _echo_log(out / LOG_FILE, offset) if echo else offset
            with db.session() as s:
                r = get_run(s, run_id)
                status, error, metrics, attempts = r.status, r.error, r.metrics, r.attempts
            if status in FINAL:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        manager.cancel(run_id)
        raise
    finally:
        manager.shutdown()
        db.dispose()
    answered = [Attempt.model_validate(a).model_dump(mode="json") for a in attempts or []]
    (out / ATTEMPTS_FILE).write_text(json.dumps(answered, indent=2))
    if status != "succeeded":
        raise ElasticRunFailed(f"run {status}: {error}")
    return metrics or {}, answered


def attempts_summary(attempts: list[dict[str, Any]]) -> str:
    """One line per attempt: nodes, steps, status, error, recovery time."""
    return "\n".join(
        f"attempt {i}: {a['num_nodes']} node(s), steps {a['start_step']}-{a['end_step']}, "
        f"{a['status']}" + (f" ({a['error']})" if a["error"] else "")
        + (f", recovered in {a['recovery_s']:.1f} s" if a["recovery_s"] else "")
        for i, a in enumerate(attempts))


def _echo_log(path: Path, offset: int) -> int:
    """Print what the agents appended to train.log since `offset`; return the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    if chunk:
        print(chunk.decode(errors="replace"), end="", file=sys.stdout, flush=True)
    return offset + len(chunk)
