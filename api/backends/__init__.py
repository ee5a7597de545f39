"""Where runs execute: a backend starts a run's processes, reports their state, stops them.

The run manager (`api/runner.py`) owns every state change in the database; a backend only
touches processes or a scheduler and the run's folder. Everything a backend needs to find its
job again after a server restart is in the JSON `handle` that `start` returns (stored in the
run row), so a restarted server can reattach to a run that is still going.

The run's folder (`out_dir`, under FOLDPLAN_RUN_DIR) holds, for every backend:
  plan.json       the plan answer (written by the runner before `start`)
  train.log       everything the job printed
  progress.jsonl  one line per finished step from rank 0: {"step", "loss", "time_s"}
  metrics.json    rank 0's final metrics; its presence after the job ends means success
Backends whose machines are elsewhere (Slurm) need `out_dir` on a file system those machines
share with the server.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class JobState:
    """What a backend knows of a job: waiting for machines, running, or over.

    `detail` is shown to the user when the run fails (e.g. "slurm job 42: FAILED, exit 1:0")."""

    state: Literal["pending", "running", "finished"]
    detail: str | None = None


class BackendUnavailable(Exception):
    """This backend cannot run the request on this server; the message says why."""


def rank_args(out_dir: Path, candidate: int, steps: int, seed: int = 0) -> list[str]:
    """Arguments after `torchrun ...`: the module every rank runs and its options."""
    return ["-m", "executor.train", "--plan", str(out_dir / "plan.json"),
            "--candidate", str(candidate), "--steps", str(steps), "--out", str(out_dir),
            "--seed", str(seed)]


class Backend(ABC):
    """One way of running a plan's candidate; subclasses in this package."""

    name: str

    def unavailable(self, plan: dict[str, Any], candidate: int) -> str | None:
        """Why this server cannot run the candidate with this backend, or None if it can.

        Checked when the run is requested (answered as 422 naming `backend`)."""
        return None

    @abstractmethod
    def start(self, run_id: str, plan: dict[str, Any], candidate: int, steps: int,
              out_dir: Path) -> dict[str, Any]:
        """Start the job (plan.json is already in out_dir); return its JSON handle."""

    @abstractmethod
    def poll(self, handle: dict[str, Any]) -> JobState:
        """The job's state now; must work on a handle from a previous server process."""

    @abstractmethod
    def cancel(self, handle: dict[str, Any]) -> None:
        """Stop every process of the job; idempotent; returns without waiting long."""


PYTHON = sys.executable
