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
    run_dir: Path = Field(
        Path("./runs"),
        description="Where runs write their files (FOLDPLAN_RUN_DIR). With the slurm backend it "
        "must be on a file system the compute nodes share with the server.",
    )
    max_concurrent_runs: int = Field(
        1, ge=1, le=1024,
        description="Runs executing at the same time (FOLDPLAN_MAX_CONCURRENT_RUNS); further runs "
        "wait in the queue and start in the order they were requested.",
    )
    run_poll_s: float = Field(
        1.0, gt=0, le=60, description="How often the run manager checks running jobs."
    )
    run_profile: Path | None = Field(
        None,
        description="Profile of the machines runs use (`foldplan profile --out FILE`, "
        "FOLDPLAN_RUN_PROFILE). When set, a run's `predicted` is the estimate for those machines "
        "instead of the plan's cluster.",
    )
    local_nodes_file: Path | None = Field(
        None,
        description="A file holding how many nodes the local backend offers now, as an integer "
        "(FOLDPLAN_LOCAL_NODES_FILE), read while runs go: an elastic run with `max_nodes` grows "
        "back when it rises; unset: no run grows.",
    )
    slurm_partition: str | None = Field(None, description="sbatch --partition (FOLDPLAN_SLURM_PARTITION).")
    slurm_account: str | None = Field(None, description="sbatch --account (FOLDPLAN_SLURM_ACCOUNT).")
    slurm_time_limit: str | None = Field(
        None, description="sbatch --time, e.g. '04:00:00' (FOLDPLAN_SLURM_TIME_LIMIT)."
    )
    slurm_python: str | None = Field(
        None,
        description="Python on the compute nodes that has torch and this repository importable "
        "(FOLDPLAN_SLURM_PYTHON); default: the server's own interpreter.",
    )
    slurm_extra_args: list[str] = Field(
        default_factory=list,
        description="More #SBATCH options, e.g. [\"--qos=high\"] (FOLDPLAN_SLURM_EXTRA_ARGS, JSON list).",
    )
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
    models_dir: Path | None = Field(
        None,
        description="Folder of Hugging Face model folders that a run body's `init_hf` names "
        "(FOLDPLAN_MODELS_DIR); unset: runs cannot start from a checkpoint.",
    )
    data_dir: Path | None = Field(
        None,
        description="Folder of Megatron indexed datasets (`foldplan tokenize` output) that a run "
        "body's `data` prefix names (FOLDPLAN_DATA_DIR); unset: runs train on the bundled corpus.",
    )
