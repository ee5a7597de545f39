"""Routed-expert FFN time: grouped GEMM (what executor/experts.py uses) vs the padded bmm
fallback, forward + backward, on uneven expert loads.

    .venv/bin/python benchmarks/expert_gemm.py [--device cuda] [--repeat 20]

Shapes: one rank's local experts of Mixtral-8x7B at EP 8 / ETP 1 scaled to the device
(CPU: a small layer). Loads: every expert gets `tokens * topk / E` rows on average; `skew`
multiplies the busiest expert's share (1.0 = balanced). Padded cost grows with the busiest
expert, grouped cost with the total rows: the ratio shows what padding cost the old executor.
Prints one line per load with ms per fwd+bwd and the model TFLOP/s of each path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.experts import GroupedExperts, grouped_mm_supported  # noqa: E402


def loads(total: int, experts: int, skew: float) -> tuple[int, ...]:
    """Row counts summing to `total`, the first expert `skew` x the mean, the rest equal."""
    first = min(total, round(total / experts * skew))
    rest = total - first
    counts = [first] + [rest // (experts - 1)] * (experts - 1)
    counts[-1] += total - sum(counts)
    return tuple(counts)


def timed(fn, repeat: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        E, D, F, rows, dtype = 8, 4096, 14336, 16384, torch.bfloat16
        sync = torch.cuda.synchronize
    else:
        E, D, F, rows, dtype = 8, 256, 704, 4096, torch.float32
        sync = lambda: None  # noqa: E731
    experts = GroupedExperts(E, D, F, True, ep=1, ep_rank=0, etp=1, etp_rank=0).to(dev, dtype)
    torch.nn.init.normal_(experts.w1_EDF, std=0.02)
    torch.nn.init.normal_(experts.w2_EFD, std=0.02)
    grouped = grouped_mm_supported(dev, dtype)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}), "
          f"{dtype}, E={E} D={D} F={F} rows={rows}; grouped GEMM offered: {grouped}")
    print(f"{'skew':>5} {'busiest':>8} {'grouped ms':>11} {'padded ms':>10} {'padded/grouped':>15} "
          f"{'grouped TF/s':>13} {'padded TF/s':>12}")
    flops = 3 * 2 * rows * D * 3 * F  # fwd + 2x bwd; three D x F matrices (gate, up, down)
    for skew in (1.0, 2.0, 4.0):
        counts = loads(rows, E, skew)
        x = torch.randn(rows, D, device=dev, dtype=dtype, requires_grad=True)

        def run(path, x=x, counts=counts):
            def f():
                y = path(x, counts)
                y.backward(torch.ones_like(y))
            return f

        tg = timed(run(experts._forward_grouped), args.repeat, sync) if grouped else float("nan")
        tp = timed(run(experts._forward_padded), args.repeat, sync)
        print(f"{skew:5.1f} {max(counts):8d} {tg * 1e3:11.2f} {tp * 1e3:10.2f} {tp / tg:15.2f} "
              f"{flops / tg / 1e12:13.1f} {flops / tp / 1e12:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
