from fastapi import APIRouter
from sqlalchemy import text

from ..deps import DatabaseDep
from ..service import foldplan_version

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness and database check")
def healthz(db: DatabaseDep) -> dict[str, str]:
    with db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok", "version": foldplan_version(), "db": db.engine.dialect.name}
