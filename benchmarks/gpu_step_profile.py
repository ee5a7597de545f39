"""Where one executor step goes on a GPU: torch.profiler over a training step of the
benchmarks/gpu_step.py model (one rank, in this process), top operators by GPU time, GPU busy
time against the step's wall time, and the loss over a few steps at two learning rates.

    python benchmarks/gpu_step_profile.py [--mbs 2] [--steps 8] [--out DIR]

The GPU-busy fraction separates "kernels are slow" from "the GPU waits for the host" (Python,
synchronising .item()/.tolist() calls, allocations).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_step import MODEL, TRAINING  # noqa: E402

from cost_model.presets import preset_model  # noqa: E402
from cost_model.specs import Mapping, TrainingSpec  # noqa: E402
from executor.data import bundled_corpus_tokens  # noqa: E402
from executor.parallel_dims import build_parallel_dims  # noqa: E402
from executor.trainer import OptimConfig, Trainer  # noqa: E402


def trainer(mbs: int, lr: float, cuda: bool) -> Trainer:
    """The gpu_step model on one rank (on CPU: tiny-moe, to check this script without a GPU)."""
    mapping = Mapping(micro_batch_size=mbs, dp=1, edp=1)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dims = build_parallel_dims(mapping, 1, 1, device)
    model, training = (MODEL, TRAINING) if cuda else (
        preset_model("tiny-moe"), TrainingSpec(seq_length=64, global_batch_size=4, precision="fp32"))
    return Trainer(model, training, dims, bundled_corpus_tokens(), seed=0,
                   optim=OptimConfig(lr=lr), kernel_backend="triton" if cuda else "torch",
                   autocast_dtype=torch.bfloat16 if cuda else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_profile_"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.set_device(0)
    t = trainer(args.mbs, 1e-3, cuda)
    for step in range(2):
        t.step(step)
    sync()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time.perf_counter()
        t.step(2)
        sync()
        wall = time.perf_counter() - wall
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e6
    print(f"one step (mbs {args.mbs}): wall {wall * 1e3:.1f} ms, GPU kernels {gpu_total * 1e3:.1f} ms "
          f"({gpu_total / wall:.0%} busy)")
    print(events.table(sort_by="self_device_time_total", row_limit=22, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    prof.export_chrome_trace(str(out / "trace.json"))
    del t
    for lr in (1e-3, 3e-4):
        if cuda:
            torch.cuda.empty_cache()
        t = trainer(args.mbs, lr, cuda)
        losses = [round(t.step(s).loss, 3) for s in range(args.steps)]
        print(f"lr {lr:g}: losses {losses}", flush=True)
        del t
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
