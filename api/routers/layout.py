from typing import Annotated

from fastapi import APIRouter, Body

from ..schemas import LayoutAnswer, LayoutRequest
from ..service import run_layout
from . import BAD_INPUT
from .examples import LAYOUT_EXAMPLES

router = APIRouter(tags=["layout"])


@router.post("/v1/layout", summary="Rank groups of a mapping (Megatron-Core's rule)",
             response_model=LayoutAnswer, responses=BAD_INPUT)
def post_layout(
    req: Annotated[LayoutRequest, Body(openapi_examples=LAYOUT_EXAMPLES)],
) -> LayoutAnswer:
    return run_layout(req)
