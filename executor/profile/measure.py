"""What one profiling rank measures, with torch and torch.distributed.

All ranks run every measurement at the same time, each with the thread count the executor
gives its ranks (cpu_count // ranks per host, at least 1; executor/train.py), so the numbers
include the contention of ranks that share cores, caches and memory: a profile describes a
host of `nproc` ranks (profile with --nproc = gpus_per_node).

- GEMM: for each shape (square ones and the skinny token x hidden x ffn GEMMs of a layer, its
  dgrad and its wgrad) every rank multiplies for a fixed time split into windows; rate of a
  window = 2*m*n*k*count / seconds. fp32 on CPU; on CUDA fp32 (TF32 allowed), bf16 and, where
  `torch._scaled_mm` works, fp8. A sweep over k (m = n fixed) for the short-k law.
- Memory: `dst.copy_(src)` of a large buffer, counted as read + write bytes.
- Op overhead: an out-of-place add on an 8-element tensor in a tight loop, microseconds per op
  (also an in-place add and a forward+backward through a tiny autograd chain).
- Collectives with the real backend (gloo on CPU over 127.0.0.1, NCCL on GPUs): all_reduce,
  all_gather and all_to_all_single at several sizes; each timed call starts after a barrier;
  every rank reports its seconds per call (fit.py takes the slowest rank of each call).
- For `training.runtime: foldplan` (cost_model/foldplan_runtime.py): GEMMs over a grid of
  small shapes (`SMALL_GEMM_GRID`: the rate falls with small m, n and k; fit.py fits
  `cost_model.foldplan_runtime.gemm_shape_rate` to them), an elementwise op (out-of-place
  multiply, output allocated as the executor's ops do) at tensor sizes from 64 KiB to 64 MiB
  (the rate at a size: caches, page faults of fresh allocations), causal SDPA forward +
  backward at one shape, and what the executor itself does per micro-batch and per step
  (executor_ops.py). These are timed in CPU time on CPU ranks (`executor_ops.work_clock`;
  the profile's `executor.cpu_share` turns them into wall time), the rest in wall time.

`measure_rank` returns one rank's numbers as a JSON-ready dict; fit.py reduces the ranks'
dicts to a `Profile`.
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cost_model.kernels import CollectiveOp

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
COLL_OPS: tuple[CollectiveOp, ...] = ("all_reduce", "all_gather", "all_to_all")
# Short-k sweep: (m = n, k values). The rate of a GEMM falls with its inner dimension k.
K_SWEEP_CPU = (512, (64, 128, 256, 512, 1024))
K_SWEEP_GPU = (8192, (128, 256, 512, 1024, 4096))
# Small GEMMs (m tokens of one expert, n and k widths): (m values, n values, k values).
SMALL_GEMM_GRID = ((16, 64, 256, 1024), (64, 256, 1024), (32, 128, 512))
SMALL_GEMM_GRID_QUICK = ((16, 256, 1024), (64, 1024), (32, 512))
# Elementwise op sizes, bytes per tensor.
ELEMENTWISE_BYTES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
ELEMENTWISE_BYTES_QUICK = [64 << 10, 1 << 20, 16 << 20]
# Causal attention measured: (batch, heads, sequence, head dim).
SDPA_SHAPE = (1, 4, 256, 32)


class _Timer:
    """Runs `fn` on all ranks for `seconds` of `clock`, in `windows` equal windows;
    per-window rates."""

    def __init__(self, sync: Callable[[], None], clock: Callable[[], float] = time.perf_counter):
        self.sync, self.clock = sync, clock

    def rates(self, fn: Callable[[], Any], work: float, seconds: float,
              windows: int = 5) -> list[float]:
        """`work` units per call of `fn`; returns work/s of each window."""
        fn()
        self.sync()
        out = []
        per = seconds / windows
        for _ in range(windows):
            count, t0 = 0, self.clock()
            while True:
                fn()
                count += 1
                if count % 4 == 0 or count < 4:
                    self.sync()
                    dt = self.clock() - t0
                    if dt >= per:
                        break
            self.sync()
            out.append(work * count / max(self.clock() - t0, 1e-9))
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
        r = timer.rates(lambda a=a, b=b: torch.mm(a, b), 2.0 * mn * mn * k / 1e12, seconds,
                        windows=3)
        res[str(k)] = statistics.median(r)
    return {"m": mn, "n": mn, "tflops_by_k": res}


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
        res[name] = {"us_per_op_windows": [1e6 / v for v in r],
                     "us_per_op": 1e6 / statistics.median(r)}
    return res


def _small_gemm(torch, timer: _Timer, device, dtype, grid, seconds: float) -> dict:
    """{"m x n x k": TFLOP/s} over the grid (median of 3 windows each)."""
    res = {}
    for m in grid[0]:
        for n in grid[1]:
            for k in grid[2]:
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                r = timer.rates(lambda a=a, b=b: torch.mm(a, b), 2.0 * m * n * k / 1e12,
                                seconds, windows=3)
                res[f"{m}x{n}x{k}"] = statistics.median(r)
    return res


def _elementwise(torch, timer: _Timer, device, sizes, seconds: float) -> dict:
    """{bytes per tensor: GB/s} of `torch.mul(x, y)` (two read, one written and allocated)."""
    res = {}
    for size in sizes:
        x = torch.ones(size // 4, device=device)
        y = torch.ones(size // 4, device=device)
        r = timer.rates(lambda x=x, y=y: torch.mul(x, y), 3.0 * size / 1e9, seconds, windows=3)
        res[str(size)] = statistics.median(r)
    return res


def _sdpa(torch, timer: _Timer, device, dtype, shape, seconds: float) -> dict:
    """Causal SDPA forward + backward; TFLOP/s counted as the cost model counts attention:
    forward 2 * b * (s^2 / 2) * heads * (2 * head dim), backward 2.5x that."""
    import torch.nn.functional as F

    b, h, s, d = shape
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))

    def fn():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    flops = 3.5 * 2.0 * b * (s * s / 2) * h * (2 * d)
    r = timer.rates(fn, flops / 1e12, seconds, windows=3)
    return {"shape_bhsd": list(shape), "tflops": statistics.median(r)}


def _collectives(torch, dist, device, world: int, sizes, iters: int) -> dict:
    """{op: {buffer bytes: this rank's seconds of each timed call}}."""
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


def measure_rank(rank: int, world: int, local_rank: int, local_world: int, init_method: str,
                 quick: bool, backend: str | None) -> tuple[dict, list[dict] | None]:
    """Run every measurement on this rank; returns (this rank's results, all ranks' results
    when gathered to every rank in torchrun mode (init_method env://), else None)."""
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

    from .executor_ops import work_clock

    timer = _Timer(sync)
    work_timer = _Timer(sync, work_clock(device))  # the foldplan runtime's rates: CPU time
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
        except (RuntimeError, AttributeError, TypeError) as exc:
            # fp8 needs Hopper or newer and torch support for it: recorded, not fatal.
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
    out["small_gemm"] = {"precision": "bf16" if use_cuda else "fp32", "tflops": _small_gemm(
        torch, work_timer, device, dtype, SMALL_GEMM_GRID_QUICK if quick else SMALL_GEMM_GRID,
        0.06 * scale)}
    dist.barrier()
    out["elementwise_GBps"] = _elementwise(
        torch, work_timer, device, ELEMENTWISE_BYTES_QUICK if quick else ELEMENTWISE_BYTES, 0.3 * scale)
    dist.barrier()
    out["sdpa"] = _sdpa(torch, work_timer, device, dtype, SDPA_SHAPE, 0.3 * scale)
    dist.barrier()
    from .executor_ops import measure_executor

    out["executor"] = measure_executor(dist, world, device, quick)
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


def machine_info(world: int) -> dict[str, Any]:
    """Host, CPU model, memory, Python and torch versions, CUDA devices."""
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "nproc": world}
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
            info["cuda_devices"] = [torch.cuda.get_device_name(i)
                                    for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info
