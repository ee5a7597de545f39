"""The FastAPI application: `create_app(settings)` wires settings, database, runner, routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .backends import Backend
from .db import Database
from .errors import BodyLimitMiddleware, install_error_handlers
from .routers import docs, estimate, health, layout, pages, plans, presets, runs, verify
from .runner import RunManager
from .service import foldplan_version
from .settings import Settings
from .verify import Verifier

STATIC_DIR = Path(__file__).parent / "static"

DESCRIPTION = """Automatic parallelism planner for Mixture-of-Experts training with
MoE Parallel Folding. Send a model (preset, spec or Hugging Face config.json) and a cluster;
get ranked mappings with predicted step time, memory and Megatron-LM arguments.
Human-readable plan pages at `/plans/{id}`; recent plans at `/`."""


def default_backends(settings: Settings) -> dict[str, Backend]:
    """The run backends this server offers: `local` (torchrun here) and `slurm` (sbatch)."""
    from .backends.local import LocalBackend
    from .backends.slurm import SlurmBackend

    return {"local": LocalBackend(nodes_file=settings.local_nodes_file),
            "slurm": SlurmBackend(settings)}


def create_app(settings: Settings | None = None,
               backends: dict[str, Backend] | None = None) -> FastAPI:
    """Build the app. The database schema is migrated here, before the first request.

    `backends` replaces the default run backends (tests use ones that run small scripts).
    The run scheduler starts with the app (and reattaches to jobs a previous server left).
    """
    settings = settings or Settings()
    db = Database(settings.db)
    db.init()
    runner = RunManager(db, settings.run_dir, backends or default_backends(settings),
                        max_concurrent=settings.max_concurrent_runs, poll_s=settings.run_poll_s,
                        profile=settings.run_profile,
                        replan_time_limit_s=settings.plan_time_limit_s)

    verifier = Verifier(db, runner, settings, poll_s=settings.run_poll_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runner.start()
        verifier.start()
        yield
        verifier.shutdown()
        runner.shutdown()
        db.dispose()

    app = FastAPI(title="foldplan", version=foldplan_version(), description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.db = db
    app.state.runner = runner
    app.state.verifier = verifier
    app.state.plan_limiter = anyio.CapacityLimiter(settings.plan_workers)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    for module in (health, estimate, plans, layout, presets, runs, verify, pages, docs):
        app.include_router(module.router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
