"""Tokens/s of our permute + unpermute against a straightforward argsort/index baseline.

    .venv/bin/python benchmarks/dispatch_kernels.py [--tokens 4096] [--repeat 20] [--backward]

Same inputs for both: x_TD, top-k expert ids indices_TK, probabilities probs_TK.
  ours      counting sort (routing_index) + permute + unpermute (torch kernels on CPU,
            Triton kernels with --backend triton on a GPU)
  baseline  argsort(indices) (stable) -> x[order // K] -> index_add of probs * y into tokens
Legend: T tokens, D model dim, K top-k, E experts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.kernels import get_ops, routing_index  # noqa: E402


def ours(x_TD, probs_TK, indices_TK, E, backend):
    permute, unpermute = get_ops(backend)
    ri = routing_index(indices_TK, E)
    x_ND, p_N = permute(x_TD, probs_TK, ri)
    return unpermute(x_ND, p_N, ri)


def baseline(x_TD, probs_TK, indices_TK, E, backend):
    K = indices_TK.shape[1]
    order_N = torch.argsort(indices_TK.reshape(-1), stable=True)
    tok_N = order_N // K
    x_ND = x_TD[tok_N]
    p_N = probs_TK.reshape(-1)[order_N]
    return torch.zeros_like(x_TD).index_add(0, tok_N, x_ND * p_N[:, None])


def _once(fn, args, backward):
    if backward:
        x = args[0].detach().requires_grad_()
        p = args[1].detach().requires_grad_()
        fn(x, p, *args[2:]).sum().backward()
    else:
        with torch.no_grad():
            fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()


def bench_pair(fns, args, repeat, backward):
    """Fastest time of each fn, runs interleaved so both see the same machine load."""
    for fn in fns:
        _once(fn, args, backward)
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            _once(fn, args, backward)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    args = ap.parse_args()
    device = "cuda" if args.backend == "triton" else "cpu"
    torch.manual_seed(0)
    print(f"device={device} backend={args.backend} threads={torch.get_num_threads()} "
          f"T={args.tokens} {'fwd+bwd' if args.backward else 'fwd'}")
    print(f"{'D':>5} {'K':>2} {'E':>4} {'ours tok/s':>12} {'baseline tok/s':>15} {'speedup':>8}")
    for D, K, E in [(256, 2, 8), (1024, 2, 8), (1024, 8, 64), (4096, 2, 16), (2048, 8, 128)]:
        T = args.tokens
        x = torch.randn(T, D, device=device)
        probs = torch.rand(T, K, device=device)
        idx = torch.rand(T, E, device=device).topk(K, dim=1).indices
        ref = baseline(x, probs, idx, E, args.backend)
        got = ours(x, probs, idx, E, args.backend)
        assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4), "mismatch"
        t_ours, t_base = bench_pair([ours, baseline], (x, probs, idx, E, args.backend),
                                    args.repeat, args.backward)
        print(f"{D:>5} {K:>2} {E:>4} {T / t_ours:>12,.0f} {T / t_base:>15,.0f} {t_base / t_ours:>8.2f}x")


if __name__ == "__main__":
    main()
