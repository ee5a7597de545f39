"""Elastic runs: when a node of a run dies, re-plan for the nodes left and train on.

A run asks for it with `on_failure: "replan"` (stored in `runs.options` with `save_every` and
`min_nodes`, see `RunOptions`). Every run keeps its `attempts` (`runs.attempts`), one per
mapping it trained on; the run manager (api/runner.py) calls in here at these points:
  - `first_attempt` when a run's job starts;
  - `note_lost` when the backend reports lost nodes (`JobState.lost_nodes`): the detection
    time and the nodes go on the current attempt, and the manager stops the other nodes (the
    job cannot go on without them);
  - `begin_recovery` when that job is over without metrics.json: the attempt ends `failed`,
    and a new attempt is appended in phase `replanning` with the nodes left (the row keeps
    status running, `job` null); fewer than `min_nodes` left fails the run instead;
  - `Recovery.ensure` for a running row without a job whose last attempt is `replanning` or
    `starting`: a thread (off the scheduler's lock) re-plans with the same model and training
    for the nodes left, stores the answer as a normal plan (visible at /plans/{id}), marks the
    attempt `starting` with that plan, and starts the plan's best candidate that the executor
    and the backend can run, resuming from the latest complete checkpoint (`--resume`: the
    executor reshards parameters and optimizer state onto the new mapping, and the data
    position is a function of the step). No mapping fitting fails the run with the planner's
    reasons;
  - `check_growth` while a job runs: with `max_nodes`, when the backend offers more nodes
    than the attempt trains on (`Backend.available_nodes`), the job is stopped once a newer
    checkpoint is complete, `begin_growth` ends the attempt `stopped` and appends a
    `replanning` attempt for min(offered, max_nodes) nodes, recovered as above (a grow that
    cannot be planned or started resumes on the previous plan and turns growing off);
  - `end_attempt` when the run ends (succeeded, failed, cancelled).
Each phase is a database write, so a server that restarts during recovery finds the phase
and finishes it: `replanning` plans again, `starting` starts the stored plan's attempt.
Only lost nodes trigger a re-plan: a rank that fails on its own (an error in training) fails
the run as before, since the same nodes would fail the same way.

Attempt fields (schemas.Attempt): plan_id, candidate, mapping, num_nodes, start_step and
end_step (1-based, inclusive), status, error, recovery_s (from the failure's detection, within
one scheduler pass of the kill, or from the stop to grow, to the first step of this attempt
the scheduler saw), and lost_nodes, failed_at, stopped_at, started_at, predicted_step_time_s;
the internal keys (`first_progress_line`: where this attempt's lines begin in progress.jsonl;
`grow_after`, `grow_to`) are not answered.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from executor.run_files import ProgressLine, latest_checkpoint, write_plan_file

from .backends import RunJob
from .db import RunRow, get_plan, get_run, insert_plan, iso, utcnow
from .run_inputs import RunInputs
from .schemas import PlanRequest
from .service import cost_model_constants, make_plan

if TYPE_CHECKING:
    from .runner import RunManager

log = logging.getLogger("foldplan.runs")
ACTIVE = ("running", "replanning", "starting")
RECOVERING = ("replanning", "starting")
RESTOP_AFTER_S = 10.0  # a job with lost nodes still running this long after: stop it again


@dataclass(frozen=True)
class RunOptions:
    """What a run body asked for beyond candidate, steps and backend (`runs.options`)."""

    save_every: int = 0
    on_failure: Literal["fail", "replan"] = "fail"
    min_nodes: int = 1
    max_nodes: int | None = None  # grow back up to this many nodes (None: never grow)
    seed: int = 0  # `foldplan run --seed` (the service's runs use 0)

    @classmethod
    def of(cls, r: RunRow) -> RunOptions:
        o = r.options or {}
        return cls(save_every=int(o.get("save_every") or 0),
                   on_failure=o.get("on_failure") or "fail", min_nodes=int(o.get("min_nodes") or 1),
                   max_nodes=o.get("max_nodes"), seed=int(o.get("seed") or 0))


def _attempt(plan: dict[str, Any], plan_id: str, candidate: int, start_step: int,
             first_progress_line: int) -> dict[str, Any]:
    cand = plan["candidates"][candidate]
    return {"plan_id": plan_id, "candidate": candidate, "mapping": cand["mapping"],
            "num_nodes": plan["cluster"]["num_nodes"], "start_step": start_step,
            "end_step": None, "status": "running", "error": None, "recovery_s": None,
            "lost_nodes": [], "failed_at": None, "started_at": iso(utcnow()),
            "predicted_step_time_s": (cand.get("estimate") or {}).get("step_time_s"),
            "first_progress_line": first_progress_line}


def first_attempt(r: RunRow, plan: dict[str, Any]) -> None:
    """The run's job has started on the candidate it was asked for."""
    r.attempts = [_attempt(plan, r.plan_id, r.candidate, 1, 0)]


def _set_last(r: RunRow, **changes: Any) -> None:
    attempts = [dict(a) for a in r.attempts or []]  # a new list: the JSON column sees the change
    if attempts:
        attempts[-1].update(changes)
        r.attempts = attempts


def recovering(r: RunRow) -> bool:
    """A running run between two attempts (no job): its last attempt is being planned or started."""
    return bool(r.attempts) and r.attempts[-1]["status"] in RECOVERING


def note_lost(r: RunRow, lost: tuple[int, ...]) -> bool:
    """Record the lost nodes on the current attempt; True the first time (the job must be
    stopped) and again when a stop did not take within RESTOP_AFTER_S."""
    if not r.attempts:
        return True
    last = r.attempts[-1]
    if last.get("failed_at"):
        since = (utcnow() - datetime.fromisoformat(last["failed_at"])).total_seconds()
        return since > RESTOP_AFTER_S
    _set_last(r, failed_at=iso(utcnow()), lost_nodes=sorted(set(lost)))
    return True


def _attempt_steps(r: RunRow, progress: list[ProgressLine]) -> list[int]:
    start = (r.attempts or [{}])[-1].get("first_progress_line") or 0
    return [p.step for p in progress[start:]]


def note_progress(r: RunRow, progress: list[ProgressLine]) -> None:
    """Keep the current attempt's end step, and its recovery time once its first step is in."""
    if not r.attempts or r.attempts[-1]["status"] != "running":
        return
    steps = _attempt_steps(r, progress)
    if not steps:
        return
    changes: dict[str, Any] = {"end_step": max(steps)}
    if r.attempts[-1]["recovery_s"] is None and len(r.attempts) > 1:
        ended_at = r.attempts[-2].get("failed_at") or r.attempts[-2].get("stopped_at")
        if ended_at:
            changes["recovery_s"] = round(
                (utcnow() - datetime.fromisoformat(ended_at)).total_seconds(), 3)
    _set_last(r, **changes)


def end_attempt(r: RunRow, status: str, error: str | None,
                progress: list[ProgressLine] | None) -> None:
    """The run is over: so is its current attempt (if it was still going)."""
    if not r.attempts or r.attempts[-1]["status"] not in ACTIVE:
        return
    if progress is not None:
        note_progress(r, progress)
    _set_last(r, status=status, error=error or r.attempts[-1].get("error"))  # keep a grow's note


def begin_recovery(r: RunRow, detail: str | None, lost: tuple[int, ...],
                   progress: list[ProgressLine]) -> str | None:
    """The job is over and nodes were lost: end the attempt and start re-planning.
    Returns why the run fails instead (fewer than min_nodes left), or None."""
    note_lost(r, lost)
    note_progress(r, progress)
    last = r.attempts[-1]
    lost_nodes = last["lost_nodes"] or sorted(lost)
    left = last["num_nodes"] - len(lost_nodes)
    error = detail or f"nodes {lost_nodes} lost"
    _set_last(r, status="failed", error=error)
    need = RunOptions.of(r).min_nodes
    if left < max(need, 1):
        return (f"{error}; {left} node{'s' if left != 1 else ''} left, fewer than "
                f"min_nodes={need}: not re-planned")
    _append_replanning(r, left, progress)
    return None


def _append_replanning(r: RunRow, num_nodes: int, progress: list[ProgressLine]) -> None:
    r.attempts = [*r.attempts, {
        "plan_id": None, "candidate": None, "mapping": None, "num_nodes": num_nodes,
        "start_step": None, "end_step": None, "status": "replanning", "error": None,
        "recovery_s": None, "lost_nodes": [], "failed_at": None, "started_at": None,
        "predicted_step_time_s": None, "first_progress_line": len(progress)}]


def check_growth(r: RunRow, available: int | None, out_dir: Path) -> bool:
    """Whether to stop the running attempt now to grow onto more nodes: the backend offers
    more than it trains on (up to `max_nodes`), and a checkpoint newer than the one there was
    when that was first seen is complete ("at the next checkpoint")."""
    opts = RunOptions.of(r)
    if not opts.max_nodes or available is None or not r.attempts:
        return False
    last = r.attempts[-1]
    if last["status"] != "running" or last.get("grow_to"):
        return False
    target = min(available, opts.max_nodes)
    if target <= last["num_nodes"]:
        if last.get("grow_after") is not None:
            _set_last(r, grow_after=None)  # the nodes went away again
        return False
    ckpt = latest_checkpoint(out_dir) or 0
    if last.get("grow_after") is None:
        _set_last(r, grow_after=ckpt)
        return False
    if ckpt > last["grow_after"]:
        _set_last(r, grow_to=target, stopped_at=iso(utcnow()))
        return True
    return False


def growing(r: RunRow) -> bool:
    """The running attempt was stopped to grow (`check_growth`)."""
    return bool(r.attempts) and r.attempts[-1]["status"] == "running" \
        and bool(r.attempts[-1].get("grow_to"))


def begin_growth(r: RunRow, progress: list[ProgressLine]) -> None:
    """The attempt stopped to grow is over: it ends `stopped`; re-plan for the larger size."""
    note_progress(r, progress)
    grow_to = r.attempts[-1]["grow_to"]
    _set_last(r, status="stopped")
    _append_replanning(r, grow_to, progress)


def replan_request(plan: dict[str, Any], num_nodes: int) -> PlanRequest:
    """The plan request for the nodes left: the same model, training and node shape."""
    return PlanRequest.model_validate({
        "model": plan["model"], "cluster": {**plan["cluster"], "num_nodes": num_nodes},
        "training": plan["training"], "top_k": plan.get("top_k") or 5})


class RecoveryFailed(Exception):
    """The run cannot go on (no mapping fits, nothing runnable); the message says why."""


class Recovery:
    """Re-plans and restarts elastic runs, one thread per recovering run."""

    def __init__(self, manager: RunManager, time_limit_s: float):
        self.m = manager
        self.time_limit_s = time_limit_s
        self._threads: dict[str, threading.Thread] = {}

    def ensure(self, run_id: str) -> None:
        """Recover `run_id` unless a thread already does (called with the manager's lock)."""
        t = self._threads.get(run_id)
        if t is not None and t.is_alive():
            return
        t = threading.Thread(target=self._run, args=(run_id,), name=f"foldplan-recover-{run_id}",
                             daemon=True)
        self._threads[run_id] = t
        t.start()

    def join(self, timeout_s: float) -> None:
        """Wait for recoveries in flight (server shutdown: they stop before starting a job)."""
        for t in list(self._threads.values()):
            t.join(timeout=timeout_s)

    def _run(self, run_id: str) -> None:
        try:
            self._recover(run_id)
        except Exception as exc:  # a failed recovery is the run's error
            if not isinstance(exc, RecoveryFailed):
                log.exception("recovering run %s failed", run_id)
            with self.m._lock, self.m.db.session() as s:
                r = get_run(s, run_id)
                if r is None or r.status != "running" or not recovering(r):
                    return
                prev, n = r.attempts[-2], r.attempts[-1]["num_nodes"]
                if prev["status"] == "stopped":  # growing failed: go on as before, grow no more
                    r.options = {**(r.options or {}), "max_nodes": None}
                    _set_last(r, status="starting", plan_id=prev["plan_id"],
                              num_nodes=prev["num_nodes"], error=f"growing to {n} nodes "
                              f"failed: {exc}")
                    return
                self.m._finish(r, "failed", error=f"{prev['error']}; re-planning for {n} "
                               f"node{'s' if n != 1 else ''} failed: {exc}")

    def _recover(self, run_id: str) -> None:
        m = self.m
        with m._lock, m.db.session() as s:
            r = get_run(s, run_id)
            if r is None or r.status != "running" or not recovering(r):
                return
            last, prev = r.attempts[-1], r.attempts[-2]
            phase, num_nodes = last["status"], last["num_nodes"]
            source = get_plan(s, prev["plan_id"]).answer
            answer = get_plan(s, last["plan_id"]).answer if phase == "starting" else None
            steps, backend_name, opts = r.steps, r.backend, RunOptions.of(r)
            out_dir = Path(r.out_dir)
            init_hf, data = RunInputs.of_options(r.options)  # as the first attempt had them
        backend = m.backends.get(backend_name)
        if backend is None:
            raise RecoveryFailed(f"backend {backend_name!r} is no longer configured")
        if answer is None:  # phase replanning: plan for the nodes left (no lock held)
            req = replan_request(source, num_nodes)
            answer = make_plan(req, self.time_limit_s).model_dump(mode="json")
            if not answer["candidates"]:
                raise RecoveryFailed(f"no mapping fits (search {answer['search']['status']}): "
                                     + "; ".join(answer["search"]["reasons"]))
            with m._lock, m.db.session() as s:
                r = get_run(s, run_id)
                if r is None or r.status != "running" or r.attempts[-1]["status"] != "replanning":
                    return
                insert_plan(s, answer, {"body": req.model_dump(mode="json"),
                                        "replanned_for_run": run_id}, cost_model_constants())
                _set_last(r, status="starting", plan_id=answer["id"])
        job = self._runnable(answer, backend, run_id, steps, out_dir, opts).model_copy(
            update={"init_hf": init_hf, "data": data})
        if m._stop.is_set():
            return  # the server is stopping: the next one starts this attempt
        start_step = (latest_checkpoint(out_dir) or 0) + 1
        with m._lock:
            progress, _ = m._progress.read(run_id, out_dir)
            write_plan_file(out_dir, answer)
            handle = backend.start(job)
            with m.db.session() as s:
                r = get_run(s, run_id)
                cancelled = r.status != "running"
                r.job = handle
                if not cancelled:
                    attempts = [dict(a) for a in r.attempts]
                    attempts[-1] = {**_attempt(answer, answer["id"], job.candidate, start_step,
                                               len(progress)),
                                    "error": attempts[-1].get("error")}  # e.g. a failed grow
                    r.attempts = attempts
        if cancelled:  # cancelled while starting: stop what just started
            m._stop_job(run_id, backend, handle)

    @staticmethod
    def _runnable(answer: dict[str, Any], backend: Any, run_id: str, steps: int, out_dir: Path,
                  opts: RunOptions) -> RunJob:
        """The job of the best candidate the executor and the backend can run."""
        from .runner import executor_refusal

        why: list[str] = []
        for k in range(len(answer["candidates"])):
            job = RunJob.from_plan(run_id, answer, k, steps, out_dir, save_every=opts.save_every,
                                   resume=True, seed=opts.seed)
            refusal = executor_refusal(answer, k) or backend.unavailable(job)
            if refusal is None:
                return job
            why.append(f"candidate {k}: {refusal}")
        raise RecoveryFailed("no candidate of the new plan can run here: " + "; ".join(why))
