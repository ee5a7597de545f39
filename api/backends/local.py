"""The `local` backend: torchrun on the server's own host, one process per rank.

Without GPUs every rank is a CPU process on gloo; with GPUs one rank per GPU on NCCL, so the
plan's world size must not exceed the GPUs this host has. torchrun starts in its own session
and writes straight into out_dir/train.log (no pipe to the server), so the job survives a
server restart and a new server reattaches to it through the handle
{"pid", "start_ticks"}: the process id plus its start time (so a recycled pid is not
mistaken for the run). Cancel sends SIGTERM to the whole process group (torchrun and every
rank), then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import Backend, JobState, RunJob

# job -> argv of the job's leader process
CommandFn = Callable[[RunJob], list[str]]
KILL_GRACE_S = 5.0
MAX_CPU_RANKS = 64


def torchrun_command(job: RunJob) -> list[str]:
    """torchrun on this host with the job's whole world (see executor/launch.py)."""
    try:
        from executor.launch import torchrun_argv
    except ImportError as exc:
        raise RuntimeError(f"the executor is not available here: {exc}") from exc
    return torchrun_argv(job.world_size, job.rank_argv())


def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None if gone
    or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[19])


class LocalBackend(Backend):
    name = "local"

    def __init__(self, command: CommandFn | None = None):
        self.command = command or torchrun_command
        self._children: dict[int, subprocess.Popen] = {}  # pid -> child we started (to reap)
        self._lock = threading.Lock()

    def unavailable(self, job: RunJob) -> str | None:
        world = job.world_size
        gpus = _gpu_count()
        if gpus:
            return None if world <= gpus else (
                f"backend='local' runs the whole world on this host: the plan needs {world} "
                f"GPUs, this host has {gpus}; use backend='slurm' or a smaller cluster")
        if world > MAX_CPU_RANKS:
            return (f"backend='local' on a host without GPUs starts one CPU process per rank: "
                    f"{world} ranks is over the limit of {MAX_CPU_RANKS}")
        # every rank's memory comes out of this host's RAM
        per_rank = job.peak_gib_per_rank
        available = _available_gib()
        if available is not None and per_rank * world > 0.9 * available:
            return (f"backend='local' on a host without GPUs: candidate {job.candidate} needs "
                    f"about {per_rank:.1f} GiB per rank (the plan's estimate) x {world} ranks "
                    f"= {per_rank * world:.0f} GiB, and this host has {available:.0f} GiB "
                    "available; use backend='slurm' or a smaller model")
        return None

    def start(self, job: RunJob) -> dict[str, Any]:
        try:
            from executor.launch import rank_env
        except ImportError as exc:
            raise RuntimeError(f"the executor is not available here: {exc}") from exc
        argv = self.command(job)
        with open(job.log_file, "ab") as log:
            proc = subprocess.Popen(argv, cwd=job.out_dir, env=rank_env(), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with self._lock:
            self._children[proc.pid] = proc
        return {"pid": proc.pid, "start_ticks": _start_ticks(proc.pid)}

    def poll(self, handle: dict[str, Any]) -> JobState:
        pid = handle["pid"]
        with self._lock:
            child = self._children.get(pid)
        if child is not None:
            rc = child.poll()
            if rc is None:
                return JobState("running")
            with self._lock:
                self._children.pop(pid, None)
            return JobState("finished", None if rc == 0 else f"torchrun exited with code {rc}")
        ticks = _start_ticks(pid)
        if ticks is not None and ticks == handle.get("start_ticks"):
            return JobState("running")  # a job a previous server started: reattached
        return JobState("finished")

    def cancel(self, handle: dict[str, Any]) -> None:
        pid = handle["pid"]
        if self.poll(handle).state == "finished":
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill_later() -> None:
            if self.poll(handle).state != "finished":
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.poll(handle)  # reap our child

        timer = threading.Timer(KILL_GRACE_S, kill_later)
        timer.daemon = True
        timer.start()


def _gpu_count() -> int:
    """GPUs visible to this host, without importing torch into the service."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


def _available_gib() -> float | None:
    """MemAvailable of this host in GiB (Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None
