"""Background runs of plan candidates.

A run row moves queued -> running -> succeeded | failed, or to cancelled by DELETE. Runs execute
one at a time on a worker thread, through `executor.launch.run_plan` (imported lazily, so the
service works without the executor installed; a run then fails with that reason).

Cancelling a running run stops torchrun and every rank (they share one process group).
Limits of this first version (a later issue grows it): a server restart marks runs it left
queued or running as failed instead of reattaching; only the `local` backend.
"""

from __future__ import annotations

import inspect
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .db import Database, get_plan, get_run, unfinished_runs, utcnow

RunFn = Callable[..., dict[str, Any]]
LOG_TAIL_CHARS = 4000


def default_run_fn(plan: dict, candidate: int, steps: int, out_dir: Path, seed: int = 0,
                   on_start: Callable | None = None) -> dict:
    try:
        from executor.launch import run_plan
    except ImportError as exc:
        raise RuntimeError(f"the executor is not available here: {exc}") from exc
    kwargs: dict[str, Any] = {"seed": seed, "on_start": on_start}
    if "echo" in inspect.signature(run_plan).parameters:
        kwargs["echo"] = False  # the ranks' output goes to out_dir/train.log, not the server log
    return run_plan(plan, candidate, steps, out_dir, **kwargs)


def _log_tail(out_dir: Path) -> str | None:
    if not out_dir.is_dir():
        return None
    logs = sorted(out_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    return logs[-1].read_text(errors="replace")[-LOG_TAIL_CHARS:]


class RunManager:
    """Owns the worker thread; every state change goes through the database."""

    def __init__(self, db: Database, run_dir: Path, run_fn: RunFn | None = None):
        self.db = db
        self.run_dir = Path(run_dir)
        self.run_fn = run_fn or default_run_fn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foldplan-run")
        self._lock = threading.Lock()  # serialises status read-modify-write across threads
        self._procs: dict[str, Any] = {}  # run id -> its torchrun process (group leader)

    def recover(self) -> int:
        """Mark runs a previous server left unfinished as failed; return how many."""
        with self._lock, self.db.session() as s:
            rows = unfinished_runs(s)
            for r in rows:
                r.error = f"the server stopped while the run was {r.status}; not reattached"
                r.status = "failed"
                r.finished_at = utcnow()
        return len(rows)

    def submit(self, run_id: str) -> Future:
        return self._pool.submit(self._execute, run_id)

    def cancel(self, run_id: str) -> str | None:
        """Cancel a queued or running run; return its status afterwards (None: unknown id)."""
        with self._lock, self.db.session() as s:
            r = get_run(s, run_id)
            if r is None:
                return None
            if r.status in ("queued", "running"):
                r.status = "cancelled"
                r.finished_at = utcnow()
            status = r.status
            proc = self._procs.get(run_id)
        if proc is not None:  # stop torchrun and every rank (one process group)
            from executor.launch import stop_process_group

            stop_process_group(proc)
        return status

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _execute(self, run_id: str) -> None:
        with self._lock, self.db.session() as s:
            r = get_run(s, run_id)
            if r is None or r.status != "queued":
                return  # cancelled before it started
            plan_row = get_plan(s, r.plan_id)
            plan, candidate, steps = plan_row.answer, r.candidate, r.steps
            r.status, r.started_at = "running", utcnow()
        out_dir = self.run_dir / run_id
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = {"seed": 0}
            if "on_start" in inspect.signature(self.run_fn).parameters:
                kwargs["on_start"] = lambda proc: self._procs.__setitem__(run_id, proc)
            metrics = self.run_fn(plan, candidate, steps, out_dir, **kwargs)
            update: dict[str, Any] = {"status": "succeeded", "metrics": metrics, "error": None}
            if isinstance(metrics, dict) and isinstance(metrics.get("predicted"), dict):
                update["predicted"] = metrics["predicted"]
        except Exception as exc:  # a failed run is data, shown to the user
            tb = traceback.format_exc()
            update = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                      "log_tail": tb[-LOG_TAIL_CHARS:]}
        self._procs.pop(run_id, None)
        tail = _log_tail(out_dir)
        with self._lock, self.db.session() as s:
            r = get_run(s, run_id)
            if r is None or r.status != "running":
                return  # cancelled while running: keep 'cancelled', drop the result
            for k, v in update.items():
                setattr(r, k, v)
            if tail:
                r.log_tail = tail
            r.finished_at = utcnow()
