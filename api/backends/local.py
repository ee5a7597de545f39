"""The `local` backend: torchrun on the server's own host, one torchrun agent per plan node.

Without GPUs every rank is a CPU process on gloo; with GPUs one rank per GPU on NCCL, so the
plan's world size must not exceed the GPUs this host has. A plan whose cluster has several
nodes gets one agent per node (`--nnodes N --node-rank i`, a static rendezvous on loopback whose
c10d store node 0's agent hosts; executor/launch.py `torchrun_argv`), each agent in its own
process group (session), so one node can die alone, as on a real cluster.

Every agent starts under `/bin/sh -c`, which writes the agent's exit status into
out_dir/node<i>.exit when it ends; `cancel` writes `cancelled` there before it stops a node.
So a node whose processes are all gone and that left no exit status was killed from outside:
it is *lost* (`JobState.lost_nodes`). The agents write straight into out_dir/train.log (no
pipe to the server), so the job survives a server restart, and a new server reattaches to it
through the handle:

    {"pid": <node 0's pgid>, "start_ticks": <its start time>,
     "nodes": [{"node": i, "pgid": <process group id>, "start_ticks": t, "exit_file": path}]}

(the process id plus its start time, so a recycled pid is not mistaken for the run; a handle
of an older server, without `nodes`, is followed as one node). Cancel sends SIGTERM to every
node's process group (agent and ranks), then SIGKILL after a grace period. How many nodes the
host offers now (`available_nodes`, for elastic runs that grow back) is the integer in the
file FOLDPLAN_LOCAL_NODES_FILE names.
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

# job -> argv of a whole single-node job (tests run a small script instead of torchrun)
CommandFn = Callable[[RunJob], list[str]]
# (job, node, master port) -> argv of one node's agent
NodeCommandFn = Callable[[RunJob, int, int], list[str]]
KILL_GRACE_S = 5.0
MAX_CPU_RANKS = 64
CANCELLED = "cancelled"  # what `cancel` writes into a node's exit file
# runs the agent, then records its exit status; "$0" is the exit file, "$@" the agent's argv
_WRAPPER = '"$@"; echo $? > "$0"'


def torchrun_command(job: RunJob, node: int, master_port: int) -> list[str]:
    """torchrun for node `node` of the job's nodes on this host (see executor/launch.py)."""
    try:
        from executor.launch import torchrun_argv
    except ImportError as exc:
        raise RuntimeError(f"the executor is not available here: {exc}") from exc
    return torchrun_argv(job.gpus_per_node, job.rank_argv(), job.num_nodes, node, master_port)


def exit_file(out_dir: Path, node: int) -> Path:
    """Where node `node`'s wrapper records the agent's exit status."""
    return Path(out_dir) / f"node{node}.exit"


def _start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None if gone
    or a zombie."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat after "pid (comm) ": state, ppid, pgrp, ...; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is in process group `pgid` (> 0)."""
    assert pgid > 0, pgid  # group 0 holds the kernel's threads; never one of our jobs
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                return True
    return False


def _nodes(handle: dict[str, Any]) -> list[dict[str, Any]]:
    """The handle's nodes; an older handle ({"pid", "start_ticks"}) is one node."""
    return handle.get("nodes") or [{"node": 0, "pgid": handle["pid"],
                                    "start_ticks": handle.get("start_ticks")}]


class LocalBackend(Backend):
    name = "local"
    reports_lost_nodes = True

    def __init__(self, command: CommandFn | None = None,
                 node_command: NodeCommandFn | None = None, nodes_file: Path | None = None):
        """`command`: one argv for a whole single-node job; `node_command`: one per node
        (default: torchrun, `torchrun_command`); `nodes_file`: holds how many nodes this host
        offers now (FOLDPLAN_LOCAL_NODES_FILE, see `available_nodes`)."""
        self.nodes_file = nodes_file
        if command is not None:
            self.node_command: NodeCommandFn = lambda job, _node, _port: command(job)
        else:
            self.node_command = node_command or torchrun_command
        self._children: dict[int, subprocess.Popen] = {}  # pid -> child we started (to reap)
        self._lock = threading.Lock()

    def available_nodes(self) -> int | None:
        """The integer in `nodes_file` (None: no file set, or unreadable: nothing grows)."""
        if self.nodes_file is None:
            return None
        try:
            return int(Path(self.nodes_file).read_text().strip())
        except (OSError, ValueError):
            return None

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
            from executor.launch import free_port, rank_env
        except ImportError as exc:
            raise RuntimeError(f"the executor is not available here: {exc}") from exc
        port = free_port()
        argvs = [self.node_command(job, i, port) for i in range(job.num_nodes)]
        nodes: list[dict[str, Any]] = []
        try:
            for i, argv in enumerate(argvs):
                record = exit_file(job.out_dir, i)
                record.unlink(missing_ok=True)
                with open(job.log_file, "ab") as log:
                    proc = subprocess.Popen(
                        ["/bin/sh", "-c", _WRAPPER, str(record), *argv], cwd=job.out_dir,
                        env=rank_env(), stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True)
                with self._lock:
                    self._children[proc.pid] = proc
                nodes.append({"node": i, "pgid": proc.pid, "start_ticks": _start_ticks(proc.pid),
                              "exit_file": str(record)})
        except BaseException:  # leave no node of a half-started job behind
            if nodes:
                self.cancel({"pid": nodes[0]["pgid"], "nodes": nodes})
            raise
        return {"pid": nodes[0]["pgid"], "start_ticks": nodes[0]["start_ticks"], "nodes": nodes}

    def _alive(self, node: dict[str, Any]) -> bool:
        """Whether the node's agent (or any process of its group) still runs; reaps our child."""
        pgid = node["pgid"]
        with self._lock:
            child = self._children.get(pgid)
        if child is not None:
            if child.poll() is None:
                return True
            with self._lock:
                self._children.pop(pgid, None)
        elif node.get("start_ticks") is not None and _start_ticks(pgid) == node["start_ticks"]:
            return True  # a job a previous server started: reattached
        return _group_alive(pgid)

    def poll(self, handle: dict[str, Any]) -> JobState:
        nodes = _nodes(handle)
        alive = [n["node"] for n in nodes if self._alive(n)]
        lost, failed = [], []
        for n in nodes:
            if n["node"] in alive or "exit_file" not in n:
                continue
            try:
                status = Path(n["exit_file"]).read_text().strip()
            except OSError:
                lost.append(n["node"])  # gone without an exit status: killed from outside
                continue
            if status not in ("0", CANCELLED):
                failed.append((n["node"], status))
        detail = None
        if lost:
            detail = (f"node{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} lost: "
                      "its processes were killed from outside (no exit status)")
        elif failed:
            node, code = failed[0]
            where = f" of node {node}" if len(nodes) > 1 else ""
            detail = f"torchrun{where} exited with code {code}"
        if alive:
            return JobState("running", detail, tuple(lost))
        return JobState("finished", detail, tuple(lost))

    def cancel(self, handle: dict[str, Any]) -> None:
        running = [n for n in _nodes(handle) if self._alive(n)]
        for n in running:
            if "exit_file" in n:  # stopped by us, not lost
                Path(n["exit_file"]).write_text(CANCELLED)
            try:
                os.killpg(n["pgid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not running:
            return

        def kill_later() -> None:
            for n in running:
                if self._alive(n):
                    try:
                        os.killpg(n["pgid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self._alive(n)  # reap our child

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
