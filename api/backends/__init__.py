"""Where runs execute: a backend starts a run's processes, reports their state, stops them.

The run manager (`api/runner.py`) owns every state change in the database; a backend only
touches processes or a scheduler and the run's folder. Everything a backend needs to find its
job again after a server restart is in the JSON `handle` that `start` returns (stored in the
run row), so a restarted server can reattach to a run that is still going.

A backend gets each run as a `RunJob`: the run's shape (nodes, GPUs per node, candidate,
steps, folder) built once from the stored plan and the request, and the ranks' command line
(`RunJob.rank_argv`, the same one `foldplan run` uses). The run's folder (`out_dir`, under
FOLDPLAN_RUN_DIR) holds plan.json (written by the runner before `start`), train.log,
progress.jsonl and metrics.json; executor/run_files.py describes them. Backends whose machines
are elsewhere (Slurm) need `out_dir` on a file system those machines share with the server.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cost_model.specs import ClusterSpec
from executor.run_files import LOG_FILE, PLAN_FILE, rank_argv


@dataclass(frozen=True)
class JobState:
    """What a backend knows of a job: waiting for machines, running, or over.

    `detail` is shown to the user when the run fails (e.g. "slurm job 42: FAILED, exit 1:0").
    `lost_nodes`: the nodes (0-based) whose processes were killed from outside (a node that
    died), as far as the backend can tell; the job cannot go on once one is lost, also while
    its other nodes still run (`state` "running": the run manager then stops them)."""

    state: Literal["pending", "running", "finished"]
    detail: str | None = None
    lost_nodes: tuple[int, ...] = ()


class BackendUnavailable(Exception):
    """This backend cannot run the request on this server; the message says why."""


class RunJob(BaseModel):
    """One run as a backend starts it, built once from the stored plan and the run request."""

    model_config = ConfigDict(frozen=True)

    run_id: str = Field(description="The run's id (names the Slurm job, the run folder).")
    candidate: int = Field(ge=0, description="Index of the plan candidate to train.")
    steps: int = Field(ge=1, description="Steps to train.")
    out_dir: Path = Field(description="The run folder, absolute (see executor/run_files.py).")
    num_nodes: int = Field(ge=1, description="Nodes of the plan's cluster.")
    gpus_per_node: int = Field(ge=1, description="Ranks per node (one per GPU).")
    world_size: int = Field(ge=1, description="Ranks in all: the plan cluster's world size.")
    peak_gib_per_rank: float = Field(ge=0, description="The plan's memory estimate per rank "
                                     "(worst pipeline stage) in GiB; 0 when the plan has none.")
    seed: int = Field(default=0, description="Data and initialisation seed of the ranks.")
    save_every: int = Field(default=0, ge=0, description="Checkpoint into out_dir every K "
                            "steps (0: never).")
    resume: bool = Field(default=False, description="Continue from the latest complete "
                         "checkpoint in out_dir (an elastic run's later attempts).")
    init_hf: str | None = Field(default=None, description="Hugging Face model folder to start "
                                "from, absolute (api/run_inputs.py checked it).")
    data: str | None = Field(default=None, description="Megatron indexed dataset prefix, "
                             "absolute; None: the bundled corpus.")

    @classmethod
    def from_plan(cls, run_id: str, plan: dict[str, Any], candidate: int, steps: int,
                  out_dir: Path, save_every: int = 0, resume: bool = False,
                  seed: int = 0) -> RunJob:
        """The job of candidate `candidate` of a stored plan answer (its `cluster` and the
        candidate's `estimate`), written into `out_dir`."""
        cluster = ClusterSpec.model_validate(plan["cluster"])
        est = plan["candidates"][candidate].get("estimate") or {}
        return cls(run_id=run_id, candidate=candidate, steps=steps,
                   out_dir=Path(out_dir).resolve(), num_nodes=cluster.num_nodes,
                   gpus_per_node=cluster.gpus_per_node, world_size=cluster.world_size,
                   peak_gib_per_rank=float((est.get("memory") or {}).get("peak_gib") or 0.0),
                   save_every=save_every, resume=resume, seed=seed)

    @property
    def plan_file(self) -> Path:
        return self.out_dir / PLAN_FILE

    @property
    def log_file(self) -> Path:
        return self.out_dir / LOG_FILE

    def rank_argv(self) -> list[str]:
        """What every rank runs after its launcher (torchrun)."""
        return rank_argv(self.out_dir, self.candidate, self.steps, seed=self.seed,
                         save_every=self.save_every, resume=self.resume, init_hf=self.init_hf,
                         data=self.data)


class Backend(ABC):
    """One way of running a plan's candidate; subclasses in this package."""

    name: str
    # whether `poll` reports `lost_nodes`, which an elastic run (on_failure='replan') needs
    reports_lost_nodes: bool = False

    def available_nodes(self) -> int | None:
        """How many nodes this backend offers now (an elastic run with `max_nodes` grows back
        when it rises), or None where it does not say."""
        return None

    def unavailable(self, job: RunJob) -> str | None:
        """Why this server cannot run the job with this backend, or None if it can.

        Checked when the run is requested (answered as 422 naming `backend`)."""
        return None

    @abstractmethod
    def start(self, job: RunJob) -> dict[str, Any]:
        """Start the job (plan.json is already in its out_dir); return its JSON handle."""

    @abstractmethod
    def poll(self, handle: dict[str, Any]) -> JobState:
        """The job's state now; must work on a handle from a previous server process."""

    @abstractmethod
    def cancel(self, handle: dict[str, Any]) -> None:
        """Stop every process of the job; idempotent; returns without waiting long."""
