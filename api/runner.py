"""Runs of plan candidates: a queue in the database, jobs through backends, one scheduler thread.

A run row moves queued -> running -> succeeded | failed, or to cancelled by DELETE. The
scheduler thread wakes every `poll_s` seconds (or at once when a run is requested or
cancelled) and, under one lock:
  1. polls every job that has started (row has a `job` handle) through its backend, copies the
     steps finished so far from out_dir/progress.jsonl into `metrics` (with `partial: true`),
     and when the job is over records succeeded (metrics.json exists) or failed (with the
     backend's detail and the log tail);
  2. starts queued runs, oldest request first, while fewer than `max_concurrent_runs` jobs are
     active.
Backends do the process work (`api/backends/`); every state change is a database write, so
the database alone says what is going on. After a server restart the new scheduler finds the
unfinished rows and polls their jobs by handle: a job still alive is reattached (it keeps
reporting progress), one that ended while the server was down is finished from its files,
and a row marked running without a job (the server died between the two writes) is failed as
lost. Stopping the server does not stop jobs; DELETE does.

A job that loses a node (the backend's `JobState.lost_nodes`) cannot go on: its other nodes
are stopped. A run with `on_failure: "replan"` then re-plans for the nodes left and resumes
from its latest checkpoint (api/elastic.py); every run keeps its `attempts`, one per mapping.

A run folder's files are read only through executor/run_files.py; api/run_progress.py turns
them into a run's `metrics`, api/prediction.py makes its `predicted`.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy.orm import object_session

from cost_model.specs import TrainingSpec
from executor.run_files import (
    LOG_FILE,
    METRICS_FILE,
    RunFileError,
    read_metrics,
    write_plan_file,
)

from . import elastic
from .backends import Backend, BackendUnavailable, JobState, RunJob
from .db import Database, RunRow, get_plan, get_run, unfinished_runs, utcnow
from .prediction import load_profile, machine_prediction
from .run_inputs import RunInputs
from .run_progress import (
    LOG_TAIL_CHARS,
    ProgressReader,
    log_tail,
    merged_metrics,
    partial_metrics,
    with_rates,
)

log = logging.getLogger("foldplan.runs")


def run_passes(tick, stop: threading.Event, wake: threading.Event, poll_s: float,
               logger: logging.Logger, what: str) -> None:
    """A service thread's body: `tick()` every `poll_s` seconds, or at once when `wake` is
    set, until `stop` is; a pass that fails is logged and the next one runs (the thread must
    outlive a bad row or a database blip)."""
    while not stop.is_set():
        try:
            tick()
        except Exception:
            logger.exception("%s pass failed", what)
        wake.wait(poll_s)
        wake.clear()


class RunManager:
    """Owns the scheduler thread; every state change goes through the database."""

    def __init__(self, db: Database, run_dir: Path, backends: dict[str, Backend],
                 max_concurrent: int = 1, poll_s: float = 1.0, profile: Path | None = None,
                 replan_time_limit_s: float = 60.0):
        self.db = db
        self.run_dir = Path(run_dir).resolve()
        self.backends = backends
        self.max_concurrent = max_concurrent
        self.poll_s = poll_s
        self.profile_path = profile
        # read and checked once, at start: a bad file stops the server, not a run request
        self.profile = load_profile(profile) if profile is not None else None
        self._lock = threading.Lock()  # one writer of run rows at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = ProgressReader()
        self._log_sizes: dict[str, int] = {}  # run id -> train.log size at the last tail read
        self.recovery = elastic.Recovery(self, replan_time_limit_s)

    # --- called by the API ------------------------------------------------------------------

    def job(self, run_id: str, plan: dict[str, Any], candidate: int, steps: int,
            save_every: int = 0) -> RunJob:
        """The backends' description of run `run_id` of a stored plan answer (folder
        FOLDPLAN_RUN_DIR/<run id>)."""
        return RunJob.from_plan(run_id, plan, candidate, steps, self.run_dir / run_id,
                                save_every=save_every)

    def unavailable(self, backend: str, job: RunJob) -> str | None:
        """Why `backend` cannot run this job here (None: it can)."""
        b = self.backends.get(backend)
        if b is None:
            return (f"backend={backend!r} is not configured on this server; configured: "
                    f"{sorted(self.backends)}")
        return b.unavailable(job)

    def predict(self, plan: dict[str, Any], candidate: int) -> dict[str, Any]:
        return machine_prediction(plan, candidate, self.profile, self.profile_path)

    def start(self) -> None:
        """Start the scheduler (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="foldplan-runs", daemon=True)
            self._thread.start()

    def submit(self, run_id: str) -> None:
        """A queued row was committed: schedule it now rather than at the next tick."""
        self._wake.set()

    def cancel(self, run_id: str) -> str | None:
        """Cancel a queued or running run and stop its job; return its status afterwards
        (None: unknown id)."""
        with self._lock, self.db.session() as s:
            r = get_run(s, run_id)
            if r is None:
                return None
            job = None
            if r.status in ("queued", "running"):
                r.status, r.finished_at = "cancelled", utcnow()
                elastic.end_attempt(r, "cancelled", None, None)
                job = r.job
                if r.out_dir:
                    r.log_tail = log_tail(Path(r.out_dir)) or r.log_tail
            status, backend = r.status, self.backends.get(r.backend)
        if job is not None and backend is not None:
            self._stop_job(run_id, backend, job)
        return status

    def _stop_job(self, run_id: str, backend: Backend, job: dict[str, Any]) -> None:
        """Stop a cancelled run's job; if the backend cannot, say so in the run's error."""
        try:
            backend.cancel(job)
        except Exception as exc:  # noqa: BLE001 - any failure is reported on the run
            log.warning("stopping the job of run %s failed: %s", run_id, exc)
            with self._lock, self.db.session() as s:
                r = get_run(s, run_id)
                if r is not None:
                    r.error = (f"cancelled, but stopping its job failed ({exc}); the job may "
                               f"still be running: {job}")

    def shutdown(self) -> None:
        """Stop the scheduler; jobs keep running and a later server reattaches to them."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.recovery.join(timeout_s=self.recovery.time_limit_s + 10)

    def tick(self) -> None:
        """One scheduling pass (the loop calls this; tests may too)."""
        with self._lock:
            with self.db.session() as s:
                rows = unfinished_runs(s)
                active = 0
                for r in rows:
                    if r.job is not None or r.status == "running":
                        try:
                            done = self._poll(r)
                        except Exception:  # one bad row must not stall the others
                            log.exception("following run %s failed", r.id)
                            done = False
                        active += 0 if done else 1
                queued = [r.id for r in rows if r.status == "queued" and r.job is None]
            for run_id in queued[: max(0, self.max_concurrent - active)]:
                self._start(run_id)

    # --- the scheduler ----------------------------------------------------------------------

    def _loop(self) -> None:
        run_passes(self.tick, self._stop, self._wake, self.poll_s, log, "run scheduler")

    def _poll(self, r: RunRow) -> bool:
        """Bring one started run up to date; return True when it is over."""
        backend = self.backends.get(r.backend)
        if r.job is None and elastic.recovering(r):  # between two attempts of an elastic run
            self.recovery.ensure(r.id)
            return False
        if r.job is None:  # marked running, but the job handle was never stored
            self._finish(r, "failed", error="lost: the server stopped while starting this run; "
                         "no job was recorded")
            return True
        if backend is None:
            self._finish(r, "failed", error=f"lost: backend {r.backend!r} is no longer "
                         "configured on this server, so its job cannot be followed")
            return True
        try:
            state = backend.poll(r.job)
        except Exception as exc:  # noqa: BLE001 - a scheduler hiccup: try again next pass
            log.warning("polling run %s failed: %s", r.id, exc)
            return False
        out_dir = Path(r.out_dir)
        if state.state == "pending":
            return False
        if r.status == "queued":
            r.status, r.started_at = "running", r.started_at or utcnow()
        if state.lost_nodes and elastic.note_lost(r, state.lost_nodes) \
                and state.state == "running":
            self._stop_nodes(r, backend)  # the job cannot go on without the lost nodes
        progress, new = self._progress.read(r.id, out_dir)
        if state.state == "running":
            if new and progress:
                r.metrics = self._rates(r, partial_metrics(progress))
                elastic.note_progress(r, progress)
            self._refresh_log_tail(r, out_dir)
            if not state.lost_nodes and elastic.check_growth(r, backend.available_nodes(),
                                                             out_dir):
                self._stop_nodes(r, backend)  # nodes came back: grow at this checkpoint
            return False
        if state.lost_nodes and not (out_dir / METRICS_FILE).is_file() \
                and elastic.RunOptions.of(r).on_failure == "replan":
            if progress:
                r.metrics = self._rates(r, partial_metrics(progress))
            why = elastic.begin_recovery(r, state.detail, state.lost_nodes, progress)
            r.job = None
            if why is None:
                self.recovery.ensure(r.id)
                return False
            self._finish(r, "failed", error=why)
            return True
        if elastic.growing(r) and not (out_dir / METRICS_FILE).is_file():
            elastic.begin_growth(r, progress)
            r.job = None
            self.recovery.ensure(r.id)
            return False
        self._complete(r, out_dir, state)
        return True

    def _stop_nodes(self, r: RunRow, backend: Backend) -> None:
        """Stop a job that cannot or should not go on (called with the lock held)."""
        try:
            backend.cancel(r.job)
        except Exception as exc:  # noqa: BLE001 - tried again on a later pass
            log.warning("stopping the nodes of run %s failed: %s", r.id, exc)

    def _complete(self, r: RunRow, out_dir: Path, state: JobState) -> None:
        progress, _ = self._progress.read(r.id, out_dir)
        if (out_dir / METRICS_FILE).is_file():
            try:
                metrics = read_metrics(out_dir)
            except RunFileError as exc:
                self._finish(r, "failed", error=f"metrics.json unreadable: {exc}")
                return
            # a resumed attempt's file holds its own steps: the earlier ones come from progress
            merged = merged_metrics(metrics.model_dump(mode="json"), progress)
            self._finish(r, "succeeded", metrics=self._rates(r, merged))
            return
        if progress:
            r.metrics = self._rates(r, partial_metrics(progress))
        why = "the job ended without writing metrics.json"
        self._finish(r, "failed",
                     error=f"{state.detail}; {why}" if state.detail else f"{why}; see the log tail")

    def _refresh_log_tail(self, r: RunRow, out_dir: Path) -> None:
        """Keep the log tail of a running job current (written only when the log grew)."""
        try:
            size = (out_dir / LOG_FILE).stat().st_size
        except OSError:
            return
        if self._log_sizes.get(r.id) != size:
            self._log_sizes[r.id] = size
            r.log_tail = log_tail(out_dir)

    def _rates(self, r: RunRow, metrics: dict[str, Any]) -> dict[str, Any]:
        tr = get_plan(object_session(r), r.plan_id).answer["training"]
        return with_rates(metrics, TrainingSpec.model_validate(tr).tokens_per_step, r.predicted)

    def _finish(self, r: RunRow, status: str, error: str | None = None,
                metrics: dict[str, Any] | None = None) -> None:
        r.status, r.finished_at = status, utcnow()
        if r.out_dir:
            elastic.end_attempt(r, status, error, self._progress.read(r.id, Path(r.out_dir))[0])
        self._progress.forget(r.id)
        self._log_sizes.pop(r.id, None)
        if metrics is not None:
            r.metrics = metrics
        if error is not None:
            r.error = error
        if r.out_dir:
            r.log_tail = log_tail(Path(r.out_dir)) or r.log_tail

    def _start(self, run_id: str) -> None:
        """Start one queued run (called with the lock held)."""
        with self.db.session() as s:
            r = get_run(s, run_id)
            if r is None or r.status != "queued" or r.job is not None:
                return
            plan = get_plan(s, r.plan_id).answer
            candidate, steps, backend_name = r.candidate, r.steps, r.backend
            opts = elastic.RunOptions.of(r)
            r_options = dict(r.options or {})
            r.out_dir = r.out_dir or str(self.run_dir / run_id)  # preset by `foldplan run`
            out_dir = Path(r.out_dir)
        backend = self.backends.get(backend_name)
        try:
            init_hf, data = RunInputs.of_options(r_options)
            job = RunJob.from_plan(run_id, plan, candidate, steps, out_dir,
                                   save_every=opts.save_every, seed=opts.seed).model_copy(
                update={"init_hf": init_hf, "data": data})
            if backend is None:
                raise BackendUnavailable(f"backend {backend_name!r} is not configured on this "
                                         "server")
            why = backend.unavailable(job)  # checked again: the server may differ from the
            if why:  # one that accepted the request (restart, other settings)
                raise BackendUnavailable(why)
            job.out_dir.mkdir(parents=True, exist_ok=True)
            _check_executor(plan, candidate, job.init_hf)
            write_plan_file(job.out_dir, plan)
            handle = backend.start(job)
            state = _safe_poll(backend, handle)
        except Exception as exc:  # noqa: BLE001 - a run that cannot start is data, shown
            detail = "" if isinstance(exc, (BackendUnavailable, RuntimeError, ValueError)) \
                else "\n" + traceback.format_exc()[-LOG_TAIL_CHARS:]
            with self.db.session() as s:
                r = get_run(s, run_id)
                if r is not None and r.status == "queued":
                    self._finish(r, "failed", error=f"{type(exc).__name__}: {exc}{detail}")
            return
        with self.db.session() as s:
            r = get_run(s, run_id)
            r.job = handle
            elastic.first_attempt(r, plan)
            if r.status == "queued" and state != "pending":  # a Slurm job may wait for nodes
                r.status, r.started_at = "running", utcnow()
            cancelled = r.status == "cancelled"
        if cancelled:  # cancelled while starting: stop what just started
            threading.Thread(target=self._stop_job, args=(run_id, backend, handle),
                             daemon=True).start()


def _safe_poll(backend: Backend, job: dict[str, Any]) -> str:
    """The state of a job just started; "running" if the backend cannot tell yet."""
    try:
        return backend.poll(job).state
    except Exception:  # noqa: BLE001 - the next scheduler pass asks again
        return "running"


def executor_refusal(plan: dict[str, Any], candidate: int) -> str | None:
    """Why foldplan's executor cannot run this candidate (naming the option), or None."""
    try:
        _check_executor(plan, candidate)
    except ValueError as exc:  # executor.config.UnsupportedPlan
        return str(exc)
    return None


def _check_executor(plan: dict[str, Any], candidate: int, init_hf: str | None = None) -> None:
    """Refuse, before any process starts, a plan the executor cannot run (names the reason).

    Skipped where the executor is not installed (a service without torch that submits to
    Slurm): the job's own first step then says it; the local backend cannot start at all and
    says so itself."""
    try:
        from executor.config import load_run
    except ImportError:
        return
    load_run(plan, candidate, init_hf=init_hf)
