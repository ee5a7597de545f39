"""Start the profiling ranks and write the profile: `nproc` processes spawned on this host
(`run_profile`), or one rank of a torchrun job across hosts (`torchrun_worker`).

Spawned ranks rendezvous on 127.0.0.1 at a free port (GLOO_SOCKET_IFNAME=lo), each writes its
measurements to a JSON file in a temporary directory, and the parent fits them
(fit.profile_from_ranks) and writes the profile.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cost_model.profile_model import Profile

from ..launch import free_port
from .fit import profile_from_ranks
from .measure import machine_info, measure_rank

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_profile(profile: Profile, out: Path) -> None:
    """Write `profile` as the JSON that `cost_model.profile_model.load_profile` reads."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(profile.model_dump_json(indent=2))


def spawned_worker(rank: int, world: int, port: int, result: Path, quick: bool,
                   backend: str | None) -> None:
    """One rank started by `run_profile`: measure, write this rank's numbers to `result`."""
    out, _ = measure_rank(rank, world, rank, world, f"tcp://127.0.0.1:{port}", quick, backend)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(result)


def torchrun_worker(out: Path, quick: bool, backend: str | None) -> None:
    """One rank started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*
    set); rank 0 writes the profile. Ranks on different hosts measure the network."""
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    t0 = time.perf_counter()
    _, ranks = measure_rank(rank, world, local_rank, local_world, "env://", quick, backend)
    if rank == 0:
        assert ranks is not None
        write_profile(profile_from_ranks(ranks, time.perf_counter() - t0, machine_info(world),
                                         ranks_per_host=local_world), out)


def run_profile(out: Path, nproc: int = 2, backend: str | None = None, quick: bool = False,
                timeout_s: float = 300.0) -> Profile:
    """Measure this machine with `nproc` ranks, write the profile JSON to `out`, return it."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend={backend!r} must be gloo, nccl or None (auto)")
    if backend != "gloo":
        import torch

        if torch.cuda.is_available() and nproc > torch.cuda.device_count():
            raise ValueError(f"nproc={nproc} but this host has {torch.cuda.device_count()} CUDA "
                             "devices: one rank per GPU (or --backend gloo)")
    out = Path(out)
    port = free_port()
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foldplan-profile-") as tmp:
        files = [Path(tmp) / f"rank{r}.json" for r in range(nproc)]
        # closed in the finally below
        logs = [open(Path(tmp) / f"rank{r}.log", "w") for r in range(nproc)]  # noqa: SIM115
        procs = []
        try:
            for r in range(nproc):
                cmd = [sys.executable, "-m", "executor.profile", "--worker", "--rank", str(r),
                       "--nproc", str(nproc), "--port", str(port), "--result", str(files[r])]
                cmd += ["--quick"] if quick else []
                cmd += ["--backend", backend] if backend else []
                procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=logs[r],
                                              stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"profile ranks did not finish within {timeout_s:.0f} s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for f in logs:
                f.close()
        bad = [r for r, p in enumerate(procs) if p.returncode != 0 or not files[r].exists()]
        if bad:
            tail = (Path(tmp) / f"rank{bad[0]}.log").read_text()[-3000:]
            raise RuntimeError(f"profile rank {bad[0]} failed "
                               f"(exit {procs[bad[0]].returncode}):\n{tail}")
        ranks = [json.loads(f.read_text()) for f in files]
    prof = profile_from_ranks(ranks, time.perf_counter() - t0, machine_info(nproc))
    write_profile(prof, out)
    return prof
