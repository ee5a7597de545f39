from typing import Annotated

from fastapi import APIRouter, Body

from ..schemas import Estimate, EstimateError, EstimateRequest
from ..service import run_estimate
from . import BAD_INPUT
from .examples import ESTIMATE_EXAMPLES

router = APIRouter(tags=["estimate"])


@router.post(
    "/v1/estimate",
    summary="Predict one training step of a mapping (or a batch of mappings)",
    response_model=Estimate | list[Estimate | EstimateError],
    responses=BAD_INPUT,
)
def post_estimate(
    req: Annotated[EstimateRequest, Body(openapi_examples=ESTIMATE_EXAMPLES)],
) -> Estimate | list[Estimate | EstimateError]:
    """An invalid single `mapping` is a 422 with `reasons`; in a `mappings` batch an invalid
    entry is answered in its place by `{"error": "<reason>"}`."""
    return run_estimate(req)
