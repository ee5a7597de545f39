"""Launch a plan's candidate on this machine with torchrun and return its metrics.

    run_plan(plan, candidate, steps, out_dir) -> metrics dict (the metrics.json of rank 0)

Runs `python -m torch.distributed.run --nproc-per-node N --master-port <free port>
<rank_argv(...)>` (executor/run_files.py: the rank command line the service's backends use
too) with N = the plan's world size (num_nodes * gpus_per_node), streams the ranks' output,
and raises RuntimeError with the tail of the log when a rank fails.
On a machine without GPUs every rank is a CPU process on gloo (GLOO_SOCKET_IFNAME=lo,
MASTER_ADDR=127.0.0.1). `run_plan` starts the whole world as one torchrun; `torchrun_argv`
also writes the line of one node of several on this host (the service's local backend starts
one agent per plan node with it, so a node can die alone); real clusters use the exported
scripts or the slurm backend.
A rank that dies makes torchrun stop the others; the error names the rank that failed first
(torchrun's root cause) and every rank that reported a failure.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections import deque
from pathlib import Path

from .config import load_run
from .run_files import LOG_FILE, METRICS_FILE, rank_argv, read_metrics, write_plan_file

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(nproc: int, ranks: list[str], num_nodes: int = 1, node_rank: int = 0,
                  master_port: int | None = None) -> list[str]:
    """torchrun for node `node_rank` of `num_nodes` on this host: `nproc` ranks running `ranks`
    (see `rank_argv`). The nodes meet at a static rendezvous on loopback: node 0's agent hosts
    the c10d store on `master_port` (default: a free port, enough for one node), the others
    connect to it; global ranks node_rank*nproc .. node_rank*nproc+nproc-1 run on node
    `node_rank`. Example: torchrun_argv(2, ranks, 2, 1, 29500) -> [python, -m,
    torch.distributed.run, --nproc-per-node, 2, --nnodes, 2, --node-rank, 1, --master-addr,
    127.0.0.1, --master-port, 29500, *ranks]."""
    port = master_port if master_port is not None else free_port()
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--nnodes", str(num_nodes), "--node-rank", str(node_rank),
            "--master-addr", "127.0.0.1", "--master-port", str(port), *ranks]


def rank_env() -> dict[str, str]:
    """Environment of a one-host launch: gloo on loopback, one thread per CPU rank unless
    the caller set OMP_NUM_THREADS, and this repository importable."""
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def stop_process_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop torchrun and every rank it started (they share its process group): SIGTERM,
    then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_plan(plan: dict, candidate: int, steps: int, out_dir: Path, seed: int = 0,
             data: str | None = None, echo: bool = True, save_every: int = 0,
             resume: bool = False, init_hf: str | None = None, export_hf: str | None = None) -> dict:
    """Train `steps` steps of candidate `candidate` with the plan's whole world on this
    machine; return metrics.json as a dict (read through `RunMetrics`: a malformed file
    raises `RunFileError`).

    `data`: Megatron indexed dataset prefix (default: the bundled corpus). `save_every`:
    checkpoint into out_dir every K steps. `resume`: continue from the latest complete
    checkpoint in out_dir up to `steps` in total. `init_hf`: a Hugging Face model folder to
    start from (checked against the plan here, before any rank starts); `export_hf`: write
    the trained model there as one. `steps` 0 with both converts without training (no
    metrics.json; returns {}).
    """
    # refuses unsupported plans (and a checkpoint that is not the plan's model) before any
    # process starts
    run = load_run(plan, candidate, init_hf=init_hf)
    if export_hf and not init_hf:
        raise ValueError("export_hf needs init_hf (the checkpoint's config.json is written back)")
    convert = steps == 0 and init_hf is not None and export_hf is not None
    if steps < 1 and not convert:
        raise ValueError(f"steps={steps} must be >= 1 (0 only with init_hf and export_hf)")
    # the ranks run in REPO_ROOT: every path they get is absolute
    init_hf = str(Path(init_hf).resolve()) if init_hf else None
    export_hf = str(Path(export_hf).resolve()) if export_hf else None
    if data:
        data = str(Path(data).resolve())
        missing = [s for s in (".bin", ".idx") if not Path(data + s).is_file()]
        if missing:
            raise ValueError(f"data={data}: no {' and '.join(missing)} file (a Megatron indexed "
                             "dataset, e.g. from `foldplan tokenize`)")
    out_dir = Path(out_dir).resolve()  # the ranks run in REPO_ROOT, not in the caller's cwd
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plan_file(out_dir, plan)
    metrics_file = out_dir / METRICS_FILE
    metrics_file.unlink(missing_ok=True)
    ranks = rank_argv(out_dir, candidate, steps, seed=seed, data=data, save_every=save_every,
                      resume=resume, init_hf=init_hf, export_hf=export_hf)
    cmd = torchrun_argv(run.world_size, ranks)
    env = rank_env()
    tail: deque[str] = deque(maxlen=60)
    log_file = out_dir / LOG_FILE
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if echo:
                    print(line, end="", flush=True)
            rc = proc.wait()
        finally:  # Ctrl-C or any error here: leave no rank behind (own session, no SIGINT)
            stop_process_group(proc)
    if rc == 0 and convert:
        return {}
    if rc != 0 or not metrics_file.exists():
        text = log_file.read_text(errors="replace")
        failed = sorted({int(r) for r in re.findall(r"rank (\d+) failed", text)}
                        | {int(r) for r in re.findall(r"rank\s*:\s*(\d+) \(local_rank", text)})
        root = re.search(r"Root Cause.*?rank\s*:\s*(\d+)", text, re.DOTALL)
        first = f"rank {root.group(1)} failed first (torchrun's root cause); " if root else ""
        raise RuntimeError(f"training failed (exit {rc}); {first}ranks reporting failure: {failed}; "
                           "last lines:\n" + "".join(tail))
    return read_metrics(out_dir).model_dump(mode="json")
