"""Verify a plan's top-k: run each candidate for a few steps, one after the other, and rank them
by measured step time beside the predicted ranking (NeMo's AutoConfigurator ranks by such
short runs; we predict, and this checks the prediction on the user's own machines).

A verification is a row of the `verifications` table (api/db.py): `request` holds the body
(candidates, steps, backend), `result` the answer's per-candidate entries and `spearman`. Its
runs are ordinary runs (api/runner.py), started one at a time so they never share the machine:
the verifier's thread wakes every `poll_s` seconds and, for each unfinished verification,
copies its runs' states into `result`, starts the next candidate's run when none of its runs
is queued or running, and finishes it when every candidate's run is over. Every step is a
database write, so a restarted server goes on where the last one stopped.

A succeeded verification can become the cluster's profile correction (`correction_profile`,
GET /v1/verifications/{id}/profile): the profile its predictions were made with, stored in
`result["base_profile"]` when it was created, with `step_time_scale` times the median
measured / predicted step time. A uniform factor: the next plan ranks the same, its
predicted numbers move to what these machines measured.
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from cost_model.profile_model import Profile, step_time_scale

from .db import Database, PlanRow, VerificationRow, get_run, iso, utcnow
from .runner import RunManager, run_passes
from .schemas import VerificationAnswer, VerifyRequest
from .settings import Settings

log = logging.getLogger("foldplan.verify")
DEFAULT_NUM_CANDIDATES = 3
ACTIVE = ("queued", "running")
RUN_OVER = ("succeeded", "failed", "cancelled")


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho: the Pearson correlation of the ranks (ties get their mean rank); None
    with fewer than two pairs or when either side has no spread.
    Example: spearman([1, 2, 3], [10, 30, 20]) == 0.5."""
    if len(x) != len(y) or len(x) < 2:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var > 0 else None


def ranks(v: list[float]) -> list[float]:
    """1-based ranks, smallest first; ties share their mean rank. [0.3, 0.1, 0.3] -> [2.5, 1,
    2.5]."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2.0 + 1
        i = j + 1
    return r


def chosen_candidates(req: VerifyRequest, num_candidates: int) -> list[int]:
    """The candidates a request verifies: those it names, or the first three."""
    return req.candidates if req.candidates is not None else list(
        range(min(DEFAULT_NUM_CANDIDATES, num_candidates)))


def new_verification(plan: PlanRow, req: VerifyRequest, candidates: list[int],
                     runner: RunManager) -> VerificationRow:
    """The row of a new verification (queued; nothing runs until the verifier's next pass)."""
    predictions = [runner.predict(plan.answer, k) for k in candidates]
    entries = [{"candidate": k, "run_id": None, "status": "waiting",
                "predicted_step_time_s": p["step_time_s"],
                "measured_step_time_s": None, "error": None}
               for k, p in zip(candidates, predictions, strict=True)]
    # What the predictions were made with, for `correction_profile`: the server's run profile
    # when it has one (api/prediction.py), else the plan cluster's own profile.
    base = runner.profile if runner.profile is not None else plan.answer["cluster"].get("profile")
    return VerificationRow(
        id=uuid.uuid4().hex, plan_id=plan.id, status="queued",
        request={"candidates": candidates, "steps": req.steps, "backend": req.backend},
        result=_with_ranks({"candidates": entries, "base_profile": base,
                            "machine": predictions[0].get("machine") if predictions else None}),
        created_at=utcnow())


class NoCorrection(Exception):
    """A verification that cannot give a profile correction (yet); the message says why."""


def correction_profile(v: VerificationRow) -> Profile:
    """The profile to put in `cluster.profile` so that the next plan on these machines predicts
    what this verification measured: the profile its predictions were made with (the server's
    run profile, else the plan cluster's, else none) with `step_time_scale` multiplied by the
    median measured / predicted step time (`measured_over_predicted`).

    A uniform factor leaves the ranking as it is: it corrects the predicted numbers (step
    time, tokens/s, MFU), not the order; `spearman` says how far the order itself is off.
    Raises NoCorrection unless the verification succeeded with a measured step time."""
    result = v.result or {}
    ratio = result.get("measured_over_predicted")
    if v.status != "succeeded" or ratio is None:
        raise NoCorrection(f"verification {v.id} is {v.status}: a profile correction needs a "
                           "succeeded verification with at least one measured step time")
    base = Profile.model_validate(result.get("base_profile") or {})
    measured = [e for e in result["candidates"] if e["measured_step_time_s"] is not None]
    source = {"verification_id": v.id, "plan_id": v.plan_id,
              "machine": result.get("machine"), "previous_step_time_scale": base.step_time_scale,
              "ratios": {str(e["candidate"]): e["measured_step_time_s"]
                         / e["predicted_step_time_s"] for e in measured}}
    try:
        return Profile.model_validate({**(result.get("base_profile") or {}),
                                       "step_time_scale": step_time_scale(base) * ratio,
                                       "step_time_scale_source": source})
    except ValueError as exc:  # a ratio beyond what a correction may be (profile_model)
        raise NoCorrection(f"verification {v.id}: {exc}") from None


def _with_ranks(result: dict[str, Any]) -> dict[str, Any]:
    """Fill predicted/measured ranks, `spearman` and `measured_over_predicted` from the
    entries' step times."""
    entries = result["candidates"]
    predicted = [e["predicted_step_time_s"] for e in entries]
    measured = [e for e in entries if e["measured_step_time_s"] is not None]
    times = [e["measured_step_time_s"] for e in measured]
    for e in entries:  # shown ranks: 1 + how many are faster (ties share the better rank)
        e["predicted_rank"] = 1 + sum(t < e["predicted_step_time_s"] for t in predicted)
        e["measured_rank"] = (None if e["measured_step_time_s"] is None else
                              1 + sum(t < e["measured_step_time_s"] for t in times))
    result["spearman"] = spearman([e["predicted_step_time_s"] for e in measured],
                                  [e["measured_step_time_s"] for e in measured])
    result["measured_over_predicted"] = statistics.median(
        [e["measured_step_time_s"] / e["predicted_step_time_s"] for e in measured]
    ) if measured else None
    return result


def verification_answer(v: VerificationRow) -> VerificationAnswer:
    result = v.result or {"candidates": []}
    return VerificationAnswer(
        id=v.id, plan_id=v.plan_id, status=v.status, steps=v.request["steps"],
        backend=v.request["backend"], candidates=result["candidates"],
        spearman=result.get("spearman"),
        measured_over_predicted=result.get("measured_over_predicted"), error=v.error,
        created_at=iso(v.created_at), finished_at=iso(v.finished_at))


class Verifier:
    """Owns the thread that moves verifications along (see the module docstring)."""

    def __init__(self, db: Database, runner: RunManager, settings: Settings,
                 poll_s: float = 1.0):
        self.db = db
        self.runner = runner
        self.settings = settings
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="foldplan-verify",
                                            daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, verification_id: str) -> bool:
        """Cancel an unfinished verification and the run it has going; False: unknown id."""
        with self._lock, self.db.sessions() as s:
            v = s.get(VerificationRow, verification_id)
            if v is None:
                return False
            active = []
            if v.status in ACTIVE:
                v.status, v.finished_at = "cancelled", utcnow()
                result = copy.deepcopy(v.result)  # a new value: JSON columns compare
                for e in result["candidates"]:
                    if e["status"] == "waiting":
                        e["status"] = "cancelled"
                    elif e["status"] in ACTIVE:
                        active.append(e["run_id"])
                v.result = result
                s.commit()
        for run_id in active:
            self.runner.cancel(run_id)
        self.wake()
        return True

    def _loop(self) -> None:
        run_passes(self.tick, self._stop, self._wake, self.poll_s, log, "verification")

    def tick(self) -> None:
        """One pass over the unfinished verifications (the thread calls this; tests may too)."""
        with self._lock, self.db.sessions() as s:
            rows = list(s.scalars(select(VerificationRow).where(
                VerificationRow.status.in_(ACTIVE)).order_by(VerificationRow.created_at)))
            for v in rows:
                self._advance(s, v)
                s.commit()

    def _advance(self, s: Session, v: VerificationRow) -> None:
        result = copy.deepcopy(v.result)  # never mutate the loaded value (change detection)
        entries = result["candidates"]
        for e in entries:  # copy the runs' states
            if e["run_id"] and e["status"] not in RUN_OVER:
                run = get_run(s, e["run_id"])
                e["status"] = run.status if run is not None else "failed"
                if run is not None and run.status == "succeeded":
                    e["measured_step_time_s"] = (run.metrics or {}).get("step_time_s")
                if run is not None and run.status in ("failed", "cancelled"):
                    e["error"] = run.error
        if not any(e["status"] in ACTIVE for e in entries):
            waiting = next((e for e in entries if e["status"] == "waiting"), None)
            if waiting is not None:
                self._start_run(s, v, waiting)
        v.result = _with_ranks(result)
        if any(e["status"] in ACTIVE for e in entries):
            v.status = "running"
        elif all(e["status"] != "waiting" for e in entries):
            measured = any(e["measured_step_time_s"] is not None for e in entries)
            v.status, v.finished_at = ("succeeded" if measured else "failed"), utcnow()
            if not measured:
                v.error = "no candidate's run measured a step time; see the candidates' errors"

    def _start_run(self, s: Session, v: VerificationRow, entry: dict[str, Any]) -> None:
        """Start the run of one candidate through the runs endpoint's own code (its checks,
        its prediction, its row), or record why it could not start."""
        from fastapi import HTTPException

        from .routers.runs import create_run
        from .schemas import RunRequest
        from .service import RequestError

        req = RunRequest(candidate=entry["candidate"], steps=v.request["steps"],
                         backend=v.request["backend"])
        try:
            run = create_run(plan_id=v.plan_id, req=req, s=s, runner=self.runner,
                             settings=self.settings)
        except (RequestError, HTTPException, ValueError) as exc:
            entry["status"], entry["error"] = "failed", str(getattr(exc, "detail", exc))
            return
        entry["run_id"], entry["status"] = run.id, run.status


def verifications_of_plan(s: Session, plan_id: str, limit: int = 5) -> list[VerificationRow]:
    """The plan's latest verifications, newest first."""
    return list(s.scalars(select(VerificationRow).where(VerificationRow.plan_id == plan_id)
                          .order_by(VerificationRow.created_at.desc()).limit(limit)))
