"""Server settings, read from the environment (FOLDPLAN_*) and overridable by `foldplan serve`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service reads from its environment; names as in CONTRACT.md."""

    model_config = SettingsConfigDict(env_prefix="FOLDPLAN_", extra="ignore")

    db: str = Field(
        "sqlite:///./data/foldplan.db",
        description="SQLAlchemy URL of the plans/runs database (FOLDPLAN_DB).",
    )
    api_token: SecretStr | None = Field(
        None,
        description="Bearer token for the run endpoints (FOLDPLAN_API_TOKEN). Unset: run "
        "endpoints accept loopback clients only.",
    )
    run_dir: Path = Field(Path("./runs"), description="Where runs write their files.")
    host: str = Field("127.0.0.1", description="Address `foldplan serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port `foldplan serve` binds to.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest accepted request body.")
    plan_time_limit_s: float = Field(
        60.0, gt=0, le=600, description="Planner time limit when a request gives none."
    )
    plan_time_cap_s: float = Field(
        600.0, gt=0, le=600, description="Upper bound applied to every request's time_limit_s."
    )
    plan_workers: int = Field(
        2, ge=1, le=64, description="Plans searched at the same time; more requests wait."
    )
    plan_grace_s: float = Field(
        5.0, ge=0, le=600, description="How far past its time limit a plan may run before 504."
    )
