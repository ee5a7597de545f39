from fastapi import APIRouter

from ..schemas import PresetsAnswer
from ..service import presets

router = APIRouter(tags=["presets"])


@router.get("/v1/presets", summary="Built-in models (spec and source) and GPU presets",
            response_model=PresetsAnswer)
def get_presets() -> PresetsAnswer:
    return presets()
