"""Rank entry point: `python -m executor.train --plan P --candidate K --steps N --out DIR`.

Started by torchrun (see launch.py), one process per rank. Builds the process groups of the
plan's folded layout, trains; rank 0 appends one `ProgressLine` per step to DIR/progress.jsonl
and at the end writes DIR/metrics.json (`RunMetrics`); both models, with a description of
every field, live in executor/run_files.py, which the service reads them back through.
--save-every K checkpoints into DIR every K steps; --resume continues from the latest
complete checkpoint up to --steps in total (metrics then hold only the steps run now).
--init-hf DIR starts from a Hugging Face checkpoint (each rank reads its slices) instead of
random weights; --export-hf DIR writes the trained model back as one (executor/hf_checkpoint.py);
--steps 0 with both converts without training.
Without GPUs every rank is a CPU process on gloo in fp32; with GPUs NCCL and the plan's
precision (bf16: Megatron-style mixed precision with the distributed optimizer, autocast
without it; fp8 falls back to bf16).
Failures: a rank that raises prints "rank <r> failed: ..." and exits non-zero; torchrun then
stops the other ranks. Collectives time out after FOLDPLAN_DIST_TIMEOUT_S seconds (default 300)
so a hung peer cannot block the job forever. Test hook: FOLDPLAN_FAIL_RANK=r and
FOLDPLAN_FAIL_STEP=k make rank r exit with code 17 at step k (simulates a dying rank).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cost_model.flops import mfu, model_flops_per_step, tflops_per_gpu
from cost_model.hardware import hardware

from . import checkpoint
from .comm import CommCounter
from .config import load_run
from .data import IndexedDataset, bundled_corpus_tokens
from .parallel_dims import build_parallel_dims
from .run_files import (
    PROGRESS_FILE,
    ProgressLine,
    RunMetrics,
    append_progress,
    median_step_time,
    write_metrics,
)
from .trainer import OptimConfig, Trainer


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of one rank."""
    p = argparse.ArgumentParser(prog="executor.train", description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True, help="plan JSON file")
    p.add_argument("--candidate", type=int, default=0)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True, help="directory for metrics.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="Megatron indexed dataset prefix (default: bundled corpus)")
    p.add_argument("--lr", type=float, default=OptimConfig.lr)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0 = never)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init-hf", default=None, help="Hugging Face model folder to start from")
    p.add_argument("--export-hf", default=None, help="write the trained model here as a Hugging Face checkpoint")
    return p.parse_args(argv)


def comm_summary(counter: CommCounter, world) -> dict[str, float]:
    """Bytes per rank per step for each collective key, averaged over steps and ranks."""
    steps = max(len(counter.per_step), 1)
    mine: dict[str, int] = {}
    for d in counter.per_step:
        for k, v in d.items():
            mine[k] = mine.get(k, 0) + v
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    keys = sorted({k for g in gathered for k in g})
    n = len(gathered)
    return {k: sum(g.get(k, 0) for g in gathered) / (n * steps) for k in keys}


def main(argv=None) -> int:
    """Train one rank of the plan's candidate; rank 0 writes metrics.json."""
    args = parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    run = load_run(plan, args.candidate, init_hf=args.init_hf)
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("FOLDPLAN_DIST_TIMEOUT_S", "300")))
    dist.init_process_group(backend, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        return _train(args, run, rank, world, backend, use_cuda)
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            print(f"rank {rank} failed: {exc!r}\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise


def _train(args, run, rank: int, world: int, backend: str, use_cuda: bool) -> int:
    """Everything after the process group exists (see main)."""
    if world != run.world_size:
        raise SystemExit(f"launched {world} ranks but the plan's cluster has {run.world_size} GPUs")
    if args.export_hf and not args.init_hf:
        raise SystemExit("--export-hf needs --init-hf (the checkpoint's config.json is written back)")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    autocast = None
    if use_cuda and run.training.precision != "fp32":
        autocast = torch.bfloat16
    dims = build_parallel_dims(run.mapping, world, run.cluster.gpus_per_node, device)
    counter = CommCounter()
    tokens = IndexedDataset(args.data).tokens() if args.data else bundled_corpus_tokens()
    if len(tokens) and int(tokens.max()) >= run.model.vocab_size:
        raise SystemExit(f"--data {args.data}: token id {int(tokens.max())} >= the model's "
                         f"vocab_size={run.model.vocab_size} (tokenized for another model?)")
    ckpt = None
    if args.init_hf:  # safetensors is needed only here
        from .hf_checkpoint import HFCheckpoint

        ckpt = HFCheckpoint(args.init_hf)
    trainer = Trainer(run.model, run.training, dims, tokens, seed=args.seed, counter=counter,
                      optim=OptimConfig(lr=args.lr), kernel_backend="triton" if use_cuda else "torch",
                      autocast_dtype=autocast, arch=run.arch, init_hf=ckpt)
    meta = {"world_size": world, "mapping": run.mapping.model_dump(mode="json"), "seed": args.seed}
    start = 0
    if args.resume and (last := checkpoint.latest_complete(Path(args.out))) is not None:
        resharded = checkpoint.load(Path(args.out), last, rank, trainer, meta)
        start = last
        if rank == 0:
            print(f"resumed from step {last}" + (" (resharded to this mapping)" if resharded else ""), flush=True)
    if args.steps == 0 and args.export_hf and not args.resume:  # a pure conversion
        _export(args, run, trainer, ckpt, rank)
        dist.barrier()
        dist.destroy_process_group()
        return 0
    if start >= args.steps:
        raise SystemExit(f"checkpoint is at step {start}, nothing to do for --steps {args.steps}")
    results = []
    out = Path(args.out)
    if rank == 0 and not args.resume:
        (out / PROGRESS_FILE).unlink(missing_ok=True)
    fail_rank, fail_step = os.environ.get("FOLDPLAN_FAIL_RANK"), os.environ.get("FOLDPLAN_FAIL_STEP")
    for step in range(start, args.steps):
        if fail_rank is not None and int(fail_rank) == rank and int(fail_step or "0") == step:
            print(f"rank {rank} failed: injected failure at step {step}", file=sys.stderr, flush=True)
            os._exit(17)
        r = trainer.step(step)
        counter.end_step()
        results.append(r)
        if rank == 0:
            print(f"step {step + 1}/{args.steps} loss {r.loss:.4f} aux {r.aux_loss:.4f} "
                  f"grad_norm {r.grad_norm:.3f} dropped {r.num_dropped} time {r.time_s:.3f}s", flush=True)
            append_progress(out, ProgressLine(  # read by the service while the run goes on
                step=step + 1, loss=r.loss, time_s=r.time_s,
                expert_load_imbalance=r.expert_load_imbalance, aux_loss=r.aux_loss,
                grad_norm=r.grad_norm, num_dropped=r.num_dropped))
        if args.save_every and (step + 1) % args.save_every == 0:
            checkpoint.save(out, step + 1, rank, trainer, meta)
    comm = comm_summary(counter, world)
    if args.export_hf:
        _export(args, run, trainer, ckpt, rank)
    if rank == 0:
        times = [r.time_s for r in results]
        step_time = median_step_time(times)
        precision = "fp32" if autocast is None else "bf16"
        flops = model_flops_per_step(run.model, run.training)
        # against the peak of the plan's GPU (the service re-bases it on its prediction)
        peak = hardware(run.cluster).mfu_peak_flops(precision)
        write_metrics(out, RunMetrics(
            loss=[r.loss for r in results],
            steps=[r.step + 1 for r in results],
            step_times_s=times,
            step_time_s=step_time,
            tokens_per_s=run.training.tokens_per_step / step_time,
            model_flops_per_step=flops,
            tflops_per_gpu=tflops_per_gpu(flops, step_time, world),
            mfu=mfu(flops, step_time, world, peak),
            comm_bytes=comm,
            aux_loss=[r.aux_loss for r in results],
            grad_norm=[r.grad_norm for r in results],
            num_dropped=[r.num_dropped for r in results],
            expert_load_imbalance=[r.expert_load_imbalance for r in results],
            world_size=world,
            backend=backend,
            device=device.type,
            precision=precision,
            peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if use_cuda else None,
            mapping=run.mapping.model_dump(mode="json"),
        ))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _export(args, run, trainer: Trainer, ckpt, rank: int) -> None:
    """Collective: the model as a Hugging Face checkpoint in --export-hf (the config and dtype
    of --init-hf's checkpoint, which _train checked is given)."""
    from . import hf_checkpoint

    hf_checkpoint.export(trainer, Path(args.export_hf), run.model, ckpt.config, run.arch, rank, ckpt.dtype)
    if rank == 0:
        print(f"exported a Hugging Face checkpoint to {args.export_hf}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
