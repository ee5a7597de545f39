"""The `slurm` backend: one sbatch job per run, torchrun on every node of the allocation.

`start` writes out_dir/job.sbatch and submits it with `sbatch --parsable`; the handle is
{"job_id": "<id>"}. The job runs `srun --ntasks-per-node=1` torchrun per node, each with
`gpus_per_node` ranks, rendezvous (c10d) on the allocation's first node; all output is
appended to out_dir/train.log, and rank 0 writes progress.jsonl and metrics.json there, so
out_dir must be on a file system the compute nodes share with the server.

`poll` asks `squeue`; once the job has left the queue it reads the final state from
`scontrol show job` (kept MinJobAge seconds after the end) or `sacct` (needs accounting
storage). A failed squeue call (controller busy or unreachable) reports "running" with a
detail rather than ending the run. `cancel` is `scancel`. It does not tell which node of a
failed job was lost (`JobState.lost_nodes` stays empty), so elastic runs (`on_failure:
"replan"`, api/elastic.py) are refused on this backend; `save_every` checkpoints work.

The backend is offered only where a Slurm cluster answers: its tools on PATH and `sinfo`
listing a partition (FOLDPLAN_SLURM_PARTITION, when set); `unavailable` says which is missing.

Options come from the server settings (FOLDPLAN_SLURM_*): partition, account, time limit,
the Python on the compute nodes, and extra #SBATCH lines. Nothing asks Slurm for GPUs by
itself: clusters spell that differently (--gpus-per-node=8, --gres=gpu:8), so put it in
FOLDPLAN_SLURM_EXTRA_ARGS.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.settings import Settings

from . import Backend, JobState, RunJob

log = logging.getLogger(__name__)

# job -> argv that srun starts once per node instead of torchrun
RankCommand = Callable[[RunJob], list[str]]
REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 30.0
POLL_TIMEOUT_S = 20.0
REQUIRED = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
NOT_CONFIGURED = "backend='slurm' is not configured on this server"
SINFO_TIMEOUT_S = 10.0
REACHABLE_TTL_S = 30.0  # how long an answer of `sinfo` stands for `unavailable`

PENDING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
           "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED",
           "STOPPED"}
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED"}


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, settings: Settings, rank_command: RankCommand | None = None):
        """`rank_command` replaces the torchrun line (tests run a small script instead)."""
        self.settings = settings
        self.rank_command = rank_command
        self.python = settings.slurm_python or sys.executable
        self._lock = threading.Lock()
        self._reach: tuple[float, str | None] | None = None  # (when, `_unreachable()`)

    def unavailable(self, job: RunJob) -> str | None:
        """Why runs cannot go to Slurm from here: a tool missing from PATH, or no cluster
        answering `sinfo` (the answer is kept REACHABLE_TTL_S seconds: pages ask often)."""
        for tool in REQUIRED:
            if shutil.which(tool) is None:
                return f"{NOT_CONFIGURED}: {tool} not found on PATH"
        with self._lock:
            if self._reach is not None and time.monotonic() - self._reach[0] < REACHABLE_TTL_S:
                return self._reach[1]
        why = self._unreachable()
        with self._lock:
            self._reach = (time.monotonic(), why)
        return why

    def _unreachable(self) -> str | None:
        """Ask `sinfo` for the partitions (the configured one alone, when set): None when the
        controller answers with at least one, else why not."""
        part = self.settings.slurm_partition
        argv = ["sinfo", "--noheader", "--format=%P %a"] + ([f"--partition={part}"]
                                                            if part else [])
        try:
            r = subprocess.run(argv, check=False, capture_output=True, text=True,
                               timeout=SINFO_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{NOT_CONFIGURED}: sinfo did not answer within {SINFO_TIMEOUT_S:.0f} s"
        except OSError as exc:
            return f"{NOT_CONFIGURED}: sinfo could not be started ({exc})"
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip().splitlines()
            return (f"{NOT_CONFIGURED}: no Slurm cluster answers (sinfo exit {r.returncode}: "
                    f"{err[-1] if err else 'no message'})")
        if not r.stdout.strip():
            return (f"{NOT_CONFIGURED}: sinfo lists no partition "
                    + (f"named {part!r} (FOLDPLAN_SLURM_PARTITION)" if part else "at all"))
        return None

    def start(self, job: RunJob) -> dict[str, Any]:
        script = job.out_dir / "job.sbatch"
        script.write_text(self.job_script(job))
        try:
            r = subprocess.run(["sbatch", "--parsable", str(script)], check=False,
                               capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"sbatch did not answer within {COMMAND_TIMEOUT_S:.0f} s") from exc
        except OSError as exc:
            raise RuntimeError(f"sbatch could not be started: {exc}") from exc
        job_id = r.stdout.strip().split(";")[0]
        if r.returncode != 0 or not job_id.isdigit():
            raise RuntimeError(f"sbatch failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()}")
        log.info("run %s submitted as slurm job %s", job.run_id, job_id)
        return {"job_id": job_id}

    def job_script(self, job: RunJob) -> str:
        """The batch script: #SBATCH options, the ranks' environment, one torchrun per node."""
        s = self.settings
        options = [f"--job-name=foldplan-{job.run_id[:8]}", f"--nodes={job.num_nodes}",
                   "--ntasks-per-node=1",
                   # '%' would be a filename pattern (%j, ...) to Slurm: '%%' is a plain '%'
                   f"--output={str(job.log_file).replace('%', '%%')}",
                   "--open-mode=append", f"--chdir={job.out_dir}"]
        if s.slurm_partition:
            options.append(f"--partition={s.slurm_partition}")
        if s.slurm_account:
            options.append(f"--account={s.slurm_account}")
        if s.slurm_time_limit:
            options.append(f"--time={s.slurm_time_limit}")
        options += s.slurm_extra_args
        q = shlex.quote
        lines = ["#!/bin/bash", *(f"#SBATCH {q(opt)}" for opt in options),
                 (f"# foldplan run {job.run_id}: candidate {job.candidate}, {job.steps} steps "
                  "(written by api/backends/slurm.py)"),
                 "set -eu",
                 'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"',
                 f'export PYTHONPATH={q(str(REPO_ROOT))}"${{PYTHONPATH:+:$PYTHONPATH}}"']
        if job.num_nodes == 1:  # CPU ranks talk over gloo on loopback (see executor/launch.py)
            lines.append('export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"')
        if self.rank_command is not None:
            launch = " ".join(q(a) for a in self.rank_command(job))
        else:
            # The batch script runs on the allocation's first node, the rendezvous host, so
            # a port free here is free there.
            lines += ['head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                      (f"port=$({q(self.python)} -c 'import socket; s = socket.socket(); "
                       "s.bind((\"\", 0)); print(s.getsockname()[1])')"),
                      ('echo "foldplan: slurm job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, '
                       'rendezvous $head:$port"')]
            launch = " ".join([
                q(self.python), "-m", "torch.distributed.run", '--nnodes="$SLURM_NNODES"',
                f"--nproc-per-node={job.gpus_per_node}", "--rdzv-backend=c10d",
                '--rdzv-endpoint="$head:$port"', '--rdzv-id="$SLURM_JOB_ID"',
                *(q(a) for a in job.rank_argv())])
        lines.append(f"srun --kill-on-bad-exit=1 {launch}")
        return "\n".join(lines) + "\n"

    def poll(self, handle: dict[str, Any]) -> JobState:
        job_id = handle["job_id"]
        r = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"])
        if r is None or (r.returncode != 0 and "invalid job id" not in r.stderr.lower()):
            why = "timed out or could not start" if r is None else r.stderr.strip()
            log.warning("squeue for slurm job %s failed: %s", job_id, why)
            return JobState("running", f"slurm job {job_id}: squeue failed ({why}); state unknown")
        state, _, reason = (r.stdout.strip().splitlines() or [""])[0].partition("|")
        if state in PENDING:
            why = f" ({reason})" if reason and reason != "None" else ""
            return JobState("pending", f"slurm job {job_id}: {state}{why}")
        if state in RUNNING:
            detail = None if state == "RUNNING" else f"slurm job {job_id}: {state}"
            return JobState("running", detail)
        if state and state not in FINAL:
            log.warning("slurm job %s in unexpected state %r", job_id, state)
            return JobState("running", f"slurm job {job_id}: {state}")
        return self._final_state(job_id)

    def _final_state(self, job_id: str) -> JobState:
        """The state of a job that left the queue, from scontrol, then sacct."""
        r = _run(["scontrol", "show", "job", job_id])
        if r is not None and r.returncode == 0:
            state = re.search(r"\bJobState=(\S+)", r.stdout)
            code = re.search(r"\bExitCode=(\S+)", r.stdout)
            if state:
                return _finished(job_id, state.group(1), code.group(1) if code else None)
        r = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"])
        if r is not None and r.returncode == 0 and r.stdout.strip():
            state, _, code = r.stdout.strip().splitlines()[0].partition("|")
            return _finished(job_id, state.split()[0], code or None)
        return JobState("finished", f"slurm job {job_id}: no longer known to squeue, scontrol "
                                    "or sacct")

    def cancel(self, handle: dict[str, Any]) -> None:
        job_id = handle["job_id"]
        try:
            r = subprocess.run(["scancel", job_id], check=False, capture_output=True, text=True,
                               timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, OSError) as exc:
            raise RuntimeError(f"scancel {job_id} failed: {exc}") from exc
        err = r.stderr.lower()
        if r.returncode != 0 and not ("already" in err or "invalid job id" in err):
            raise RuntimeError(f"scancel {job_id} failed (exit {r.returncode}): "
                               f"{r.stderr.strip()}")


def _finished(job_id: str, state: str, exit_code: str | None) -> JobState:
    if state == "COMPLETED":
        return JobState("finished")
    if state not in FINAL:  # scontrol raced the queue: the job is still there
        return JobState("pending" if state in PENDING else "running",
                        f"slurm job {job_id}: {state}")
    code = f", exit code {exit_code}" if exit_code else ""
    return JobState("finished", f"slurm job {job_id}: {state}{code}")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
    """A Slurm query; None when it timed out or could not start."""
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True,
                              timeout=POLL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (subprocess.TimeoutExpired, OSError) as exc:
        log.warning("%s failed: %s", argv[0], exc)
        return None
