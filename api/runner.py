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
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy.orm import object_session

from .backends import Backend, BackendUnavailable, JobState
from .db import Database, RunRow, get_plan, get_run, unfinished_runs, utcnow

LOG_TAIL_CHARS = 4000
PARTIAL_POINTS = 2000
log = logging.getLogger("foldplan.runs")


def log_tail(out_dir: Path) -> str | None:
    """The last LOG_TAIL_CHARS of the run's train.log, if any."""
    path = out_dir / "train.log"
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 4 * LOG_TAIL_CHARS))
        text = f.read().decode(errors="replace")
    return text[-LOG_TAIL_CHARS:] or None


class ProgressReader:
    """Reads rank 0's progress.jsonl of each run incrementally (a long run's file is not
    re-read every pass); a half-written last line waits for the next pass."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # run id -> (offset, steps)

    def read(self, run_id: str, out_dir: Path) -> tuple[list[dict[str, Any]], bool]:
        """All steps so far and whether any arrived since the last call."""
        offset, steps = self._seen.get(run_id, (0, []))
        path = out_dir / "progress.jsonl"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return steps, False
        end = chunk.rfind(b"\n") + 1  # only whole lines
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                steps.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a garbled line is skipped, not fatal
        self._seen[run_id] = (offset + end, steps)
        return steps, end > 0

    def forget(self, run_id: str) -> None:
        self._seen.pop(run_id, None)


def with_rates(metrics: dict[str, Any], tokens_per_step: float,
               predicted: dict[str, Any] | None) -> dict[str, Any]:
    """Add tokens/s and MFU from the measured step time. MFU uses the same model FLOPs and
    peak as the prediction (predicted mfu x predicted time / measured time), so measured and
    predicted MFU compare like for like."""
    t = metrics.get("step_time_s")
    if not t:
        return metrics
    metrics.setdefault("tokens_per_s", tokens_per_step / t)
    if predicted and predicted.get("mfu") and predicted.get("step_time_s"):
        metrics["mfu"] = predicted["mfu"] * predicted["step_time_s"] / t
    return metrics


def partial_metrics(progress: list[dict[str, Any]]) -> dict[str, Any]:
    """Metrics of a run still going, from its progress lines: at most PARTIAL_POINTS evenly
    spaced steps (always the first and the latest), so a long run's row stays small while it is
    rewritten every pass; the final metrics.json holds every step. The step time is the median
    over the kept steps after the first."""
    n = len(progress)
    if n > PARTIAL_POINTS:
        idx = sorted({round(i * (n - 1) / (PARTIAL_POINTS - 1)) for i in range(PARTIAL_POINTS)})
        progress = [progress[i] for i in idx]
    times = [p.get("time_s", 0.0) for p in progress]
    return {
        "loss": [p.get("loss") for p in progress],
        "steps": [p.get("step") for p in progress],
        "step_times_s": times,
        "step_time_s": statistics.median(times[1:] if len(times) > 1 else times),
        "expert_load_imbalance": [p.get("expert_load_imbalance") for p in progress],
        "partial": True,
    }


def load_profile(path: Path) -> dict[str, Any]:
    """A `foldplan profile` JSON, checked as the cost model will read it; ValueError naming the
    file and the problem otherwise (the server refuses to start with a bad profile)."""
    from cost_model.specs import ClusterSpec

    try:
        profile = json.loads(Path(path).read_text())
        ClusterSpec(num_nodes=1, gpus_per_node=1, gpu="cpu", profile=profile)
    except (OSError, json.JSONDecodeError, ValueError) as exc:
        why = "; ".join(e["msg"] for e in exc.errors()) if hasattr(exc, "errors") else str(exc)
        raise ValueError(f"run_profile={str(path)!r} is not a usable profile: {why}") from None
    return profile


def machine_prediction(plan: dict[str, Any], candidate: int, profile: dict[str, Any] | None,
                       profile_path: Path | None = None) -> dict[str, Any]:
    """The estimate for the machine the run uses: the plan's own cluster, or, when the server
    has a profile of its run machines (read from `profile_path`), the same cluster shape with
    the profile's numbers."""
    est = dict(plan["candidates"][candidate]["estimate"])
    cl = plan["cluster"]
    gpu = cl.get("gpu")
    gpu_name = gpu if isinstance(gpu, str) else (gpu or {}).get("name", "custom GPU")
    if profile is None:
        est["machine"] = (f"the plan's cluster: {cl['num_nodes']} x {cl['gpus_per_node']} "
                          f"{gpu_name}")
        return est
    from cost_model.estimate import estimate
    from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec

    on_cpu = profile.get("backend") == "gloo" or not profile.get("machine", {}).get("cuda_devices")
    cluster = ClusterSpec.model_validate(  # a CPU profile: CPU ranks, whatever the plan's GPU
        {**cl, "profile": profile, **({"gpu": "cpu"} if on_cpu else {})})
    mapping = Mapping.model_validate(plan["candidates"][candidate]["mapping"])
    est = estimate(ModelSpec.model_validate(plan["model"]), cluster,
                   TrainingSpec.model_validate(plan["training"]), mapping).model_dump(mode="json")
    est["machine"] = f"this server's run machines, profiled in {profile_path}"
    return est


class RunManager:
    """Owns the scheduler thread; every state change goes through the database."""

    def __init__(self, db: Database, run_dir: Path, backends: dict[str, Backend],
                 max_concurrent: int = 1, poll_s: float = 1.0, profile: Path | None = None):
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

    # --- called by the API ------------------------------------------------------------------

    def unavailable(self, backend: str, plan: dict[str, Any], candidate: int) -> str | None:
        """Why `backend` cannot run this candidate here (None: it can)."""
        b = self.backends.get(backend)
        if b is None:
            return (f"backend={backend!r} is not configured on this server; configured: "
                    f"{sorted(self.backends)}")
        return b.unavailable(plan, candidate)

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
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the scheduler must outlive a bad row or a database blip
                log.exception("run scheduler pass failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _poll(self, r: RunRow) -> bool:
        """Bring one started run up to date; return True when it is over."""
        backend = self.backends.get(r.backend)
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
        if state.state == "running":
            progress, new = self._progress.read(r.id, out_dir)
            if new:
                r.metrics = self._rates(r, partial_metrics(progress))
            self._refresh_log_tail(r, out_dir)
            return False
        self._complete(r, out_dir, state)
        return True

    def _complete(self, r: RunRow, out_dir: Path, state: JobState) -> None:
        metrics_file = out_dir / "metrics.json"
        if metrics_file.is_file():
            try:
                metrics = json.loads(metrics_file.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                self._finish(r, "failed", error=f"metrics.json unreadable: {exc}")
                return
            self._finish(r, "succeeded", metrics=self._rates(r, metrics))
            return
        progress, _ = self._progress.read(r.id, out_dir)
        if progress:
            r.metrics = self._rates(r, partial_metrics(progress))
        why = state.detail or "the job ended without writing metrics.json"
        self._finish(r, "failed", error=f"{why}; see the log tail")

    def _refresh_log_tail(self, r: RunRow, out_dir: Path) -> None:
        """Keep the log tail of a running job current (written only when the log grew)."""
        try:
            size = (out_dir / "train.log").stat().st_size
        except OSError:
            return
        if self._log_sizes.get(r.id) != size:
            self._log_sizes[r.id] = size
            r.log_tail = log_tail(out_dir)

    def _rates(self, r: RunRow, metrics: dict[str, Any]) -> dict[str, Any]:
        tr = get_plan(object_session(r), r.plan_id).answer["training"]
        return with_rates(metrics, tr["global_batch_size"] * tr["seq_length"], r.predicted)

    def _finish(self, r: RunRow, status: str, error: str | None = None,
                metrics: dict[str, Any] | None = None) -> None:
        r.status, r.finished_at = status, utcnow()
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
            out_dir = self.run_dir / run_id
            r.out_dir = str(out_dir)
        backend = self.backends.get(backend_name)
        try:
            if backend is None:
                raise BackendUnavailable(f"backend {backend_name!r} is not configured on this "
                                         "server")
            why = backend.unavailable(plan, candidate)  # checked again: the server may differ
            if why:  # from the one that accepted the request (restart, other settings)
                raise BackendUnavailable(why)
            out_dir.mkdir(parents=True, exist_ok=True)
            _check_executor(plan, candidate)
            (out_dir / "plan.json").write_text(json.dumps(plan))
            job = backend.start(run_id, plan, candidate, steps, out_dir)
            state = _safe_poll(backend, job)
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
            r.job = job
            if r.status == "queued" and state != "pending":  # a Slurm job may wait for nodes
                r.status, r.started_at = "running", utcnow()
            cancelled = r.status == "cancelled"
        if cancelled:  # cancelled while starting: stop what just started
            threading.Thread(target=self._stop_job, args=(run_id, backend, job), daemon=True).start()


def _safe_poll(backend: Backend, job: dict[str, Any]) -> str:
    """The state of a job just started; "running" if the backend cannot tell yet."""
    try:
        return backend.poll(job).state
    except Exception:  # noqa: BLE001 - the next scheduler pass asks again
        return "running"


def _check_executor(plan: dict[str, Any], candidate: int) -> None:
    """Refuse, before any process starts, a plan the executor cannot run (names the reason).

    Skipped where the executor is not installed (a service without torch that submits to
    Slurm): the job's own first step then says it; the local backend cannot start at all and
    says so itself."""
    try:
        from executor.config import load_run
    except ImportError:
        return
    load_run(plan, candidate)
