"""Storage of plans and runs: SQLAlchemy 2 tables, engine setup, and the few queries we need.

These tables are not the API schemas (see `schemas.py`): a plan row keeps the answer as JSON
plus its provenance (the resolved request, the foldplan version, the cost-model constants in
use), and a few columns for listing. The schema is created and upgraded by Alembic
(`migrations/`), run at startup by `init_db`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class Base(DeclarativeBase):
    pass


class PlanRow(Base):
    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    foldplan_version: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(256))
    num_gpus: Mapped[int] = mapped_column(Integer)
    gpu: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    best_step_time_s: Mapped[float | None] = mapped_column(Float)
    best_mfu: Mapped[float | None] = mapped_column(Float)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, doc="The validated request as sent.")
    answer: Mapped[dict[str, Any]] = mapped_column(JSON, doc="The plan answer, returned as is.")
    constants: Mapped[dict[str, Any]] = mapped_column(
        JSON, doc="Cost-model data files (gpus.json, efficiency.json) used for this plan."
    )


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), index=True)
    candidate: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    predicted: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    job: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, doc="The backend's handle of the job (pid, Slurm job id): how a restarted server "
        "finds it again.")
    out_dir: Mapped[str | None] = mapped_column(Text, doc="The run's folder (absolute).")
    options: Mapped[dict[str, Any] | None] = mapped_column(
        JSON, doc="What the run body asked for beyond candidate, steps and backend "
        "(save_every, on_failure, min_nodes, init_hf, data, ...).")
    attempts: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JSON, doc="An elastic run's attempts, one per mapping it trained on.")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:  # SQLite drops the zone; we only ever store UTC
        t = t.replace(tzinfo=UTC)
    return t.isoformat(timespec="seconds")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; crash-safe
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """Engine for any SQLAlchemy URL; SQLite files get WAL mode and their folder created."""
    u = make_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False}
    engine = create_engine(u, **kwargs)
    if u.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Database:
    """Engine plus session factory; one per app."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def init(self) -> None:
        migrate(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s:
            with s.begin():
                yield s

    def dispose(self) -> None:
        self.engine.dispose()


# --- queries ---------------------------------------------------------------------------------


class VerificationRow(Base):
    """A measured re-ranking of a plan's top candidates (runs one after the other)."""

    __tablename__ = "verifications"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def insert_plan(s: Session, answer: dict[str, Any], request: dict[str, Any],
                constants: dict[str, Any]) -> PlanRow:
    best = answer["candidates"][0]["estimate"] if answer["candidates"] else None
    gpu = answer["cluster"].get("gpu", "h100")
    row = PlanRow(
        id=answer["id"],
        created_at=datetime.fromisoformat(answer["created_at"]),
        foldplan_version=answer["foldplan_version"],
        model_name=answer["model"].get("name"),
        num_gpus=answer["cluster"]["num_nodes"] * answer["cluster"]["gpus_per_node"],
        gpu=gpu if isinstance(gpu, str) else gpu.get("name", "custom"),
        status=answer["search"]["status"],
        best_step_time_s=best["step_time_s"] if best else None,
        best_mfu=best["mfu"] if best else None,
        request=request,
        answer=answer,
        constants=constants,
    )
    s.add(row)
    return row


def get_plan(s: Session, plan_id: str) -> PlanRow | None:
    return s.get(PlanRow, plan_id)


def list_plans(s: Session, limit: int, offset: int) -> tuple[list[PlanRow], int]:
    total = s.scalar(select(func.count()).select_from(PlanRow)) or 0
    rows = s.scalars(
        select(PlanRow).order_by(PlanRow.created_at.desc(), PlanRow.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def get_run(s: Session, run_id: str) -> RunRow | None:
    return s.get(RunRow, run_id)


def runs_of_plan(s: Session, plan_id: str, statuses: list[str] | None = None) -> list[RunRow]:
    """The plan's runs, newest first; only those in `statuses` when given."""
    q = select(RunRow).where(RunRow.plan_id == plan_id)
    if statuses:
        q = q.where(RunRow.status.in_(statuses))
    return list(s.scalars(q.order_by(RunRow.created_at.desc(), RunRow.id)).all())


def unfinished_runs(s: Session) -> list[RunRow]:
    """Queued and running runs, oldest request first (the order queued runs start in)."""
    return list(s.scalars(
        select(RunRow).where(RunRow.status.in_(("queued", "running")))
        .order_by(RunRow.created_at, RunRow.id)
    ).all())
