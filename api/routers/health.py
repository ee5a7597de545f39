from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ..deps import DatabaseDep
from ..service import foldplan_version

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness and database check",
            responses={503: {"description": "The database cannot be reached."}})
def healthz(db: DatabaseDep) -> Any:
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return JSONResponse({"status": "unavailable", "version": foldplan_version(),
                             "db": db.engine.dialect.name, "error": type(exc).__name__},
                            status_code=503)
    return {"status": "ok", "version": foldplan_version(), "db": db.engine.dialect.name}
