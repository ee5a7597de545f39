"""Executor overhead on one rank: its training step against a plain PyTorch loop.

Run: .venv/bin/python benchmarks/executor_overhead.py [--steps N] [--seq S] [--gbs G]
Both sides train the same model (executor.model.MoETransformer of the tiny-moe preset, same
initial weights, same micro-batches, fp32, one CPU process): the executor through its
Trainer (micro-batch schedule, gradient bookkeeping, global-norm clipping, its AdamW), the
baseline through `loss.backward()`, `clip_grad_norm_` and `torch.optim.AdamW`. Steps are
interleaved (executor, baseline, executor, ...) so machine noise hits both alike; the medians
excluding the first step are compared. Target (issue 6): overhead under 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cost_model.presets import preset_model  # noqa: E402
from cost_model.specs import Mapping, TrainingSpec  # noqa: E402
from executor.data import BatchOrder, bundled_corpus_tokens  # noqa: E402
from executor.model import MoETransformer  # noqa: E402
from executor.parallel_dims import ParallelDims  # noqa: E402
from executor.router import RouterConfig  # noqa: E402
from executor.trainer import OptimConfig, Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = preset_model("tiny-moe")
    training = TrainingSpec(seq_length=args.seq, global_batch_size=args.gbs, precision="fp32")
    mapping = Mapping(micro_batch_size=args.mbs, distributed_optimizer=False)
    dims = ParallelDims.single(mapping)
    tokens = bundled_corpus_tokens()
    oc = OptimConfig()

    trainer = Trainer(spec, training, dims, tokens, seed=0, optim=oc)

    model = MoETransformer(spec, dims, None, RouterConfig(), "alltoall", "torch", "none")
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=oc.betas, eps=oc.eps,
                            weight_decay=oc.weight_decay)
    order = BatchOrder(tokens, args.seq, args.gbs, 0)
    num_micro = args.gbs // args.mbs

    def plain_step(step: int) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(num_micro):
            x, y = order.micro_batch(step, micro, args.mbs, 1, 0)
            ce_sum, aux, _ = model(x, y)
            loss = ce_sum / (args.gbs * args.seq) + aux / num_micro
            loss.backward()
            total += float(ce_sum.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), oc.clip_grad)
        opt.step()
        return time.perf_counter() - t0

    executor_times, plain_times = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        trainer.step(step)
        executor_times.append(time.perf_counter() - t0)
        plain_times.append(plain_step(step))
    e = statistics.median(executor_times[1:])
    p = statistics.median(plain_times[1:])
    print(f"tiny-moe, one CPU rank, seq {args.seq}, global batch {args.gbs}, micro-batch "
          f"{args.mbs}, {args.steps} steps (median without the first)")
    print(f"executor step:   {e * 1e3:8.1f} ms")
    print(f"plain PyTorch:   {p * 1e3:8.1f} ms")
    print(f"overhead:        {e / p - 1:+8.1%}")


if __name__ == "__main__":
    main()
