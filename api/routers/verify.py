"""Verifications: run some of a plan's candidates for a few steps each, one after the other,
and rank them by measured step time; a succeeded one's measured/predicted median as a profile
correction (api/verify.py does the work)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Request

from cost_model.profile_model import Profile

from ..db import VerificationRow
from ..deps import RunAuth, RunnerDep, SessionDep
from ..runner import executor_refusal
from ..schemas import ErrorAnswer, VerificationAnswer, VerifyRequest
from ..service import RequestError
from ..verify import (
    NoCorrection,
    Verifier,
    chosen_candidates,
    correction_profile,
    new_verification,
    verification_answer,
)
from . import BAD_INPUT, NOT_FOUND
from .plans import load_plan
from .runs import AUTH

router = APIRouter(tags=["verifications"])
EXAMPLE = {"three candidates, three steps": {
    "summary": "The first three candidates, three steps each, on this host",
    "value": {"candidates": [0, 1, 2], "steps": 3, "backend": "local"}}}


def _verifier(request: Request) -> Verifier:
    return request.app.state.verifier


@router.post("/v1/plans/{plan_id}/verify", status_code=202, response_model=VerificationAnswer,
             summary="Verify the top-k: run candidates one after the other, rank by measured "
             "step time", dependencies=[RunAuth], responses={**BAD_INPUT, **NOT_FOUND, **AUTH})
def create_verification(
    plan_id: str, req: Annotated[VerifyRequest, Body(openapi_examples=EXAMPLE)],
    s: SessionDep, runner: RunnerDep, request: Request,
) -> VerificationAnswer:
    """Every candidate is checked before anything runs: it exists, the executor can run it,
    and the backend can take it here; then the answer (202) comes at once and the runs follow,
    one at a time (GET /v1/verifications/{id} follows them)."""
    plan = load_plan(s, plan_id)
    num = len(plan.answer["candidates"])
    candidates = chosen_candidates(req, num)
    for k in candidates:
        if k >= num:
            raise RequestError(("candidates",), f"candidate {k} but the plan has {num} "
                               "candidates")
        refusal = executor_refusal(plan.answer, k)
        if refusal:
            raise RequestError(("candidates",), f"candidate {k} uses what foldplan's executor "
                               f"cannot run: {refusal}")
        why = runner.unavailable(req.backend, runner.job("verify", plan.answer, k, req.steps))
        if why:
            raise RequestError(("backend",), why)
    if not candidates:
        raise RequestError(("candidates",), "the plan has no candidates to verify")
    row = new_verification(plan, req, candidates, runner)
    s.add(row)
    s.commit()
    _verifier(request).wake()
    return verification_answer(row)


@router.get("/v1/verifications/{verification_id}", response_model=VerificationAnswer,
            summary="A verification: predicted and measured ranking, Spearman",
            responses=NOT_FOUND)
def get_verification(verification_id: str, s: SessionDep) -> VerificationAnswer:
    v = s.get(VerificationRow, verification_id)
    if v is None:
        raise HTTPException(404, f"no verification with id {verification_id!r}")
    return verification_answer(v)


@router.get("/v1/verifications/{verification_id}/profile", response_model=Profile,
            response_model_exclude_none=True,
            summary="The measured step times as a profile correction for the next plan",
            responses={**NOT_FOUND, 409: {"model": ErrorAnswer, "description": "The "
                       "verification has not succeeded (yet): nothing measured to correct by."}})
def get_verification_profile(verification_id: str, s: SessionDep) -> Profile:
    """A profile to put in `cluster.profile` of the next plan on these machines: the profile
    the verification's predictions were made with, plus `step_time_scale`, the median of
    measured / predicted step time (api/verify.py `correction_profile`). Every predicted step
    time of that plan is multiplied by it; the ranking stays the same (a uniform factor cannot
    change which mapping is fastest), only the predicted numbers move."""
    v = s.get(VerificationRow, verification_id)
    if v is None:
        raise HTTPException(404, f"no verification with id {verification_id!r}")
    try:
        return correction_profile(v)
    except NoCorrection as exc:
        raise HTTPException(409, str(exc)) from None


@router.delete("/v1/verifications/{verification_id}", response_model=VerificationAnswer,
               summary="Cancel a verification and its run in progress",
               dependencies=[RunAuth], responses={**NOT_FOUND, **AUTH})
def cancel_verification(verification_id: str, s: SessionDep,
                        request: Request) -> VerificationAnswer:
    if not _verifier(request).cancel(verification_id):
        raise HTTPException(404, f"no verification with id {verification_id!r}")
    v = s.get(VerificationRow, verification_id)
    s.refresh(v)
    return verification_answer(v)
