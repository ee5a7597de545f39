"""Measure this machine for the cost model: `python -m executor.profile --out FILE --nproc N`.

`foldplan profile --out FILE` calls `main`. The JSON it writes is what `ClusterSpec.profile`
takes; the cost model (cost_model/hardware.py) reads these keys:

  gemm_tflops            {precision: sustained TFLOP/s of one rank in large GEMMs}
  hbm_GBps               one rank's memory bandwidth, GB/s (large copy: read + write bytes)
  kernel_overhead_us     fixed cost of one small op (eager dispatch on CPU, launch on GPU)
  intra_node_GBps        collective bandwidth per rank per direction between ranks of one host
  intra_node_latency_us  latency per collective step between ranks of one host
  inter_node_GBps, inter_node_latency_us
                         the same across hosts; a run on one host cannot see a network, so
                         these are set to the intra-node numbers (see below)
  gemm_k_half            (extra, not read by the cost model yet) k at which a GEMM reaches half
                         its large-k rate, fitted to a sweep over k (raw.gemm.k_sweep)

plus `raw` (every measurement) and `machine`. What is measured, and how:

- All `nproc` ranks run every measurement at the same time, each with the thread count the
  executor gives its ranks (cpu_count // nproc, at least 1; executor/train.py), so the numbers
  include the contention of ranks that share cores, caches and memory. A profile therefore
  describes a cluster of `nproc` ranks per host: profile with --nproc = gpus_per_node.
- GEMM: for each shape (square and skinny ones like the cost model's token x hidden x ffn
  GEMMs) every rank multiplies for a fixed time split into windows; rate of a window =
  2*m*n*k*count / seconds; per shape the median window of the median rank. `gemm_tflops` is
  the median over shapes. fp32 on CPU; on CUDA fp32 (TF32 allowed), bf16 and, where
  `torch._scaled_mm` works, fp8.
- Memory: `dst.copy_(src)` of a large buffer, counted as read + write bytes.
- Op overhead: an out-of-place add on an 8-element tensor in a tight loop, microseconds per op
  (raw also has an in-place add and a forward+backward through a tiny autograd chain).
- Collectives with the real backend (gloo on CPU over 127.0.0.1 with GLOO_SOCKET_IFNAME=lo,
  NCCL on GPUs): all_reduce, all_gather and all_to_all_single at several sizes; each timed
  call starts after a barrier and counts as the slowest rank's time; median over calls.
  Bytes are counted as the cost model counts them (cost_model/kernels.py): bytes sent per rank
  are 2(p-1)/p*S for an all-reduce of S bytes, (p-1)*C for an all-gather of C bytes per rank
  and (p-1)/p*V for an all-to-all of V bytes per rank; latency steps are 2(p-1), p-1 and
  1 + (p-1)/p. One weighted least-squares fit over all points (relative residuals) of
  t = steps * latency + bytes_sent / bandwidth gives `intra_node_GBps` and
  `intra_node_latency_us`; `raw.collectives.fits` has the same fit per collective.

Multi-node clusters: run this script with torchrun across two nodes, one rank per node
(`torchrun --nnodes 2 --nproc-per-node 1 ... -m executor.profile --worker-from-env`), to get
the inter-node numbers; see docs/CALIBRATION.md. Here, on one host, inter_node_* = intra_node_*.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

PROFILE_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent

# (m, n, k): square GEMMs and the skinny ones of a layer (tokens x hidden x ffn, its dgrad
# and its wgrad with the token dimension as k).
CPU_SHAPES = [(512, 512, 512), (1024, 1024, 1024), (2048, 256, 1024), (2048, 1024, 256),
              (256, 1024, 2048)]
CPU_SHAPES_QUICK = [(512, 512, 512), (1024, 256, 512)]
GPU_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 14336), (16384, 14336, 4096),
              (4096, 14336, 16384)]
GPU_SHAPES_QUICK = [(4096, 4096, 4096), (16384, 4096, 14336)]
# Collective message sizes: bytes of each rank's input buffer.
COLL_SIZES = [4 << 10, 32 << 10, 256 << 10, 2 << 20, 16 << 20]
COLL_SIZES_QUICK = [4 << 10, 256 << 10, 4 << 20]
COLL_OPS = ("all_reduce", "all_gather", "all_to_all")
# Short-k sweep: (m = n, k values). The rate of a GEMM falls with its inner dimension k.
K_SWEEP_CPU = (512, (64, 128, 256, 512, 1024))
K_SWEEP_GPU = (8192, (128, 256, 512, 1024, 4096))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- measurements
class _Timer:
    """Runs `fn` on all ranks for `seconds`, in `windows` equal windows; per-window rates."""

    def __init__(self, sync):
        self.sync = sync

    def rates(self, fn, work: float, seconds: float, windows: int = 5) -> list[float]:
        """`work` units per call of `fn`; returns work/s of each window."""
        fn()
        self.sync()
        out = []
        per = seconds / windows
        for _ in range(windows):
            count, t0 = 0, time.perf_counter()
            while True:
                fn()
                count += 1
                if count % 4 == 0 or count < 4:
                    self.sync()
                    dt = time.perf_counter() - t0
                    if dt >= per:
                        break
            self.sync()
            out.append(work * count / (time.perf_counter() - t0))
        return out


def _gemm(torch, timer: _Timer, device, prec: str, shapes, seconds: float) -> dict:
    res = {}
    for m, n, k in shapes:
        if prec == "fp8":
            a = torch.randn(m, k, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, k, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)

            def fn(a=a, b=b, one=one):
                torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        else:
            dtype = torch.bfloat16 if prec == "bf16" else torch.float32
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)

            def fn(a=a, b=b):
                torch.mm(a, b)
        r = timer.rates(fn, 2.0 * m * n * k / 1e12, seconds)
        res[f"{m}x{n}x{k}"] = {"tflops_windows": r, "tflops": statistics.median(r)}
    return res


def _k_sweep(torch, timer: _Timer, device, dtype, sweep, seconds: float) -> dict:
    mn, ks = sweep
    res = {}
    for k in ks:
        a = torch.randn(mn, k, device=device, dtype=dtype)
        b = torch.randn(k, mn, device=device, dtype=dtype)
        r = timer.rates(lambda a=a, b=b: torch.mm(a, b), 2.0 * mn * mn * k / 1e12, seconds, windows=3)
        res[str(k)] = statistics.median(r)
    return {"m": mn, "n": mn, "tflops_by_k": res}


def fit_k_half(tflops_by_k: dict[str, float]) -> tuple[float, float]:
    """Fit rate(k) = R * k / (k + k_half) (the cost model's short-k law, cost_model/kernels.py):
    1/rate = 1/R + (k_half/R) / k is linear in 1/k. Returns (R TFLOP/s, k_half >= 0)."""
    import numpy as np

    k = np.array([float(x) for x in tflops_by_k])
    inv = 1.0 / np.array(list(tflops_by_k.values()))
    slope, icpt = np.polyfit(1.0 / k, inv, 1)
    if icpt <= 0:
        return float(1.0 / inv.min()), 0.0
    return float(1.0 / icpt), float(max(0.0, slope / icpt))


def _memory(torch, timer: _Timer, device, nbytes: int, seconds: float) -> dict:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    r = timer.rates(lambda: dst.copy_(src), 2.0 * nbytes / 1e9, seconds)
    return {"buffer_bytes": nbytes, "GBps_windows": r, "GBps": statistics.median(r)}


def _overhead(torch, timer: _Timer, device, seconds: float) -> dict:
    x = torch.ones(8, device=device)
    y = torch.ones(8, device=device)
    ops = 64

    def oop():
        for _ in range(ops):
            torch.add(x, y)

    def inplace():
        for _ in range(ops):
            x.add_(1e-6)

    w = torch.ones(8, device=device, requires_grad=True)

    def autograd():  # 16 forward ops, about as many backward
        h = w
        for _ in range(16):
            h = h * 1.0001
        h.sum().backward()

    res = {}
    for name, fn, n in (("add", oop, ops), ("add_inplace", inplace, ops),
                        ("autograd_chain_16", autograd, 33)):
        r = timer.rates(fn, n, seconds / 3, windows=3)
        res[name] = {"us_per_op_windows": [1e6 / v for v in r], "us_per_op": 1e6 / statistics.median(r)}
    return res


def _collectives(torch, dist, device, world: int, sizes, iters: int) -> dict:
    """Per op and size: this rank's seconds of each timed call (the parent takes the max)."""
    res: dict[str, dict[str, list[float]]] = {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for op in COLL_OPS:
        res[op] = {}
        for size in sizes:
            numel = max(world, size // 4) // world * world
            x = torch.ones(numel, device=device)
            if op == "all_reduce":
                def fn(x=x):
                    dist.all_reduce(x)
            elif op == "all_gather":
                out = torch.empty(numel * world, device=device)

                def fn(x=x, out=out):
                    dist.all_gather_into_tensor(out, x)
            else:
                out = torch.empty_like(x)

                def fn(x=x, out=out):
                    dist.all_to_all_single(out, x)
            n = iters if size <= (1 << 20) else max(3, iters // 3)
            fn()
            sync()
            times = []
            for _ in range(n):
                dist.barrier()
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t0)
            res[op][str(numel * 4)] = times
    return res


def _measure(rank: int, world: int, local_rank: int, local_world: int, init_method: str,
             quick: bool, backend: str | None) -> tuple[dict, list[dict] | None]:
    """Run every measurement on this rank; returns (this rank's results, all ranks' results
    when gathered to rank 0 in torchrun mode, else None)."""
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and backend != "gloo"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        threads = torch.get_num_threads()
    else:
        device = torch.device("cpu")
        threads = max(1, (os.cpu_count() or 1) // local_world)  # as executor/train.py
        torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))

    def sync():
        if use_cuda:
            torch.cuda.synchronize(device)

    timer = _Timer(sync)
    scale = 0.3 if quick else 1.0
    out: dict = {"rank": rank, "threads": threads, "device": str(device), "backend": backend}
    precs = ["fp32"] + (["bf16", "fp8"] if use_cuda else [])
    out["gemm"] = {}
    for prec in precs:
        dist.barrier()
        shapes = (GPU_SHAPES_QUICK if quick else GPU_SHAPES) if use_cuda else (
            CPU_SHAPES_QUICK if quick else CPU_SHAPES)
        try:
            out["gemm"][prec] = _gemm(torch, timer, device, prec, shapes, 1.5 * scale)
        except (RuntimeError, AttributeError, TypeError) as exc:  # fp8 needs Hopper+ and torch support
            out["gemm"][prec] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    dist.barrier()
    dtype = torch.bfloat16 if use_cuda else torch.float32
    out["k_sweep"] = _k_sweep(torch, timer, device, dtype, K_SWEEP_GPU if use_cuda else K_SWEEP_CPU,
                              0.5 * scale)
    dist.barrier()
    nbytes = (1 << 30) if use_cuda else ((32 << 20) if quick else (128 << 20))
    out["memory"] = _memory(torch, timer, device, nbytes, 2.0 * scale)
    dist.barrier()
    out["overhead"] = _overhead(torch, timer, device, 2.0 * scale)
    dist.barrier()
    if world > 1:
        sizes = COLL_SIZES_QUICK if quick else COLL_SIZES
        out["collectives"] = _collectives(torch, dist, device, world, sizes, 10 if quick else 20)
    out["world"], out["local_world"] = world, local_world
    gathered = None
    if init_method == "env://":
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
    dist.barrier()
    dist.destroy_process_group()
    return out, gathered


def _spawned_worker(rank: int, world: int, port: int, result: Path, quick: bool,
                    backend: str | None) -> None:
    out, _ = _measure(rank, world, rank, world, f"tcp://127.0.0.1:{port}", quick, backend)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(result)


def _torchrun_worker(out: Path, quick: bool, backend: str | None) -> None:
    """One rank started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*
    set); rank 0 writes the profile. Ranks on different hosts measure the network."""
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", 0))
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    t0 = time.perf_counter()
    _, ranks = _measure(rank, world, local_rank, local_world, "env://", quick, backend)
    if rank == 0:
        assert ranks is not None
        prof = _aggregate(ranks, world, time.perf_counter() - t0)
        if local_world < world and world > 1:  # ranks span hosts: the links measured cross them
            prof.update(intra_node_GBps=None, intra_node_latency_us=None)
            prof["notes"] = (f"{world} ranks, {local_world} per host: the collectives crossed "
                             "hosts, so only inter_node_* is measured; take intra_node_* from "
                             "a one-host profile")
        prof["machine"] = _machine(world)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(prof, indent=2))


# --------------------------------------------------------------------------- aggregation
def _coll_bytes_steps(op: str, p: int, size: float) -> tuple[float, float]:
    """(bytes sent per rank, latency steps) as cost_model/kernels.py counts them."""
    if op == "all_reduce":
        return 2.0 * (p - 1) / p * size, 2.0 * (p - 1)
    if op == "all_gather":
        return (p - 1) * size, float(p - 1)
    return (p - 1) / p * size, 1.0 + (p - 1) / p


def fit_latency_bandwidth(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Fit t = steps * L + bytes / B to (bytes, steps, seconds) points, minimizing relative
    residuals; returns (L seconds, B bytes/s), both clamped positive."""
    import numpy as np

    a = np.array([[s / t, b / t] for b, s, t in points])
    y = np.ones(len(points))
    (lat, inv_bw), *_ = np.linalg.lstsq(a, y, rcond=None)
    if inv_bw <= 0:  # latency-bound everywhere: bandwidth from the largest message alone
        b, s, t = max(points)
        inv_bw = max(t - s * max(lat, 0.0), 1e-12) / b
    if lat <= 0:
        b, s, t = min(points)
        lat = max(t - b * inv_bw, 1e-7) / s
    return float(lat), float(1.0 / inv_bw)


def _aggregate(ranks: list[dict], world: int, elapsed: float) -> dict:
    med = statistics.median
    gemm_tflops, gemm_raw = {}, {}
    for prec in ranks[0]["gemm"]:
        per = [r["gemm"][prec] for r in ranks]
        if "error" in per[0]:
            gemm_raw[prec] = per[0]
            continue
        shapes = {s: {"tflops_per_rank": [p[s]["tflops"] for p in per],
                      "tflops": med([p[s]["tflops"] for p in per])} for s in per[0]}
        gemm_raw[prec] = shapes
        gemm_tflops[prec] = med(v["tflops"] for v in shapes.values())
    by_k = {k: med(r["k_sweep"]["tflops_by_k"][k] for r in ranks) for k in ranks[0]["k_sweep"]["tflops_by_k"]}
    rate_inf, k_half = fit_k_half(by_k)
    gemm_raw["k_sweep"] = {"precision": "bf16" if ranks[0]["device"].startswith("cuda") else "fp32",
                           "m": ranks[0]["k_sweep"]["m"], "n": ranks[0]["k_sweep"]["n"],
                           "tflops_by_k": by_k, "fit_tflops": rate_inf, "fit_k_half": k_half}
    mem = [r["memory"]["GBps"] for r in ranks]
    ovh = {k: med(r["overhead"][k]["us_per_op"] for r in ranks) for k in ranks[0]["overhead"]}
    prof: dict = {
        "foldplan_profile_version": PROFILE_VERSION,
        "gemm_tflops": gemm_tflops,
        "hbm_GBps": med(mem),
        "kernel_overhead_us": ovh["add"],
        # Not read by cost_model/hardware.py yet (CPU ranks use k_half = 0 there).
        "gemm_k_half": k_half,
        "intra_node_GBps": None,
        "intra_node_latency_us": None,
        "inter_node_GBps": None,
        "inter_node_latency_us": None,
        "nproc": world,
        "threads_per_rank": ranks[0]["threads"],
        "backend": ranks[0]["backend"],
    }
    raw: dict = {"gemm": gemm_raw,
                 "memory": {"buffer_bytes": ranks[0]["memory"]["buffer_bytes"],
                            "GBps_per_rank": mem},
                 "overhead_us_per_op": ovh, "wall_s": elapsed}
    if world > 1:
        coll: dict = {"points": [], "fits": {}}
        allp = []
        for op in COLL_OPS:
            pts = []
            for size, _ in ranks[0]["collectives"][op].items():
                per_call = list(zip(*(r["collectives"][op][size] for r in ranks)))
                t = med(max(c) for c in per_call)  # a call ends when its slowest rank does
                sent, steps = _coll_bytes_steps(op, world, float(size))
                pts.append((sent, steps, t))
                coll["points"].append({"op": op, "bytes_per_rank_buffer": int(size),
                                       "bytes_sent_per_rank": sent, "latency_steps": steps,
                                       "median_s": t})
            lat, bw = fit_latency_bandwidth(pts)
            coll["fits"][op] = {"latency_us_per_step": lat * 1e6, "GBps": bw / 1e9}
            allp += pts
        lat, bw = fit_latency_bandwidth(allp)
        coll["fits"]["joint"] = {"latency_us_per_step": lat * 1e6, "GBps": bw / 1e9}
        raw["collectives"] = coll
        prof.update(intra_node_GBps=bw / 1e9, intra_node_latency_us=lat * 1e6,
                    inter_node_GBps=bw / 1e9, inter_node_latency_us=lat * 1e6)
        prof["notes"] = ("inter_node_* = intra_node_*: measured with all ranks on one host; "
                         "profile across nodes for real inter-node numbers (docs/CALIBRATION.md)")
    else:
        prof["notes"] = "nproc=1: no collectives measured; link keys are null (preset values apply)"
    prof["raw"] = raw
    return prof


def _machine(world: int) -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "nproc": world}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def run_profile(out: Path, nproc: int = 2, backend: str | None = None, quick: bool = False,
                timeout_s: float = 300.0) -> dict:
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
    port = _free_port()
    env = dict(os.environ)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foldplan-profile-") as tmp:
        files = [Path(tmp) / f"rank{r}.json" for r in range(nproc)]
        logs = [open(Path(tmp) / f"rank{r}.log", "w") for r in range(nproc)]
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
            raise RuntimeError(f"profile rank {bad[0]} failed (exit {procs[bad[0]].returncode}):\n{tail}")
        ranks = [json.loads(f.read_text()) for f in files]
    prof = _aggregate(ranks, nproc, time.perf_counter() - t0)
    prof["machine"] = _machine(nproc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=2))
    return prof


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="foldplan profile", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="profile JSON to write")
    p.add_argument("--nproc", type=int, default=2, help="ranks per host (= gpus_per_node)")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--quick", action="store_true", help="shorter measurements (tests)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")
    p.add_argument("--worker-from-env", action="store_true",
                   help="run as one torchrun rank (multi-node profiling); rank 0 writes --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _spawned_worker(args.rank, args.nproc, args.port, Path(args.result), args.quick, args.backend)
        return 0
    if not args.out:
        p.error("--out is required")
    if args.worker_from_env:
        _torchrun_worker(Path(args.out), args.quick, args.backend)
        return 0
    prof = run_profile(Path(args.out), args.nproc, args.backend, args.quick, args.timeout)
    summary = {k: v for k, v in prof.items() if k not in ("raw", "machine")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
