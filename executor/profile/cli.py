"""`python -m executor.profile` and `foldplan profile`: options, then launch.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from .launch import run_profile, spawned_worker, torchrun_worker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="foldplan profile",
                                description="Measure this machine for the cost model.")
    p.add_argument("--out", help="profile JSON to write")
    p.add_argument("--nproc", type=int, default=2, help="ranks per host (= gpus_per_node)")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="default: nccl with CUDA, else gloo")
    p.add_argument("--quick", action="store_true", help="shorter measurements (tests)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before the ranks are killed")
    p.add_argument("--worker-from-env", action="store_true",
                   help="run as one torchrun rank (multi-node profiling); rank 0 writes --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spawned_worker(args.rank, args.nproc, args.port, Path(args.result), args.quick,
                       args.backend)
        return 0
    if not args.out:
        p.error("--out is required")
    if args.worker_from_env:
        torchrun_worker(Path(args.out), args.quick, args.backend)
        return 0
    prof = run_profile(Path(args.out), args.nproc, args.backend, args.quick, args.timeout)
    print(prof.model_dump_json(indent=2, exclude={"raw", "machine"}))
    return 0
