"""Tokens/s of our permute + unpermute against an argsort/index baseline and Megatron-Core.

    .venv/bin/python benchmarks/dispatch_kernels.py [--tokens 4096] [--repeat 20] [--backward]
        [--megatron-path DIR]

Same inputs for all: x_TD, top-k expert ids indices_TK, probabilities probs_TK (dropless).
  ours      what the executor runs: a stable sort into the static T*K-row buffer
            (routing_index(..., static=True, dropless=True)) + permute + unpermute (torch
            kernels on CPU, Triton kernels with --backend triton on a GPU)
  baseline  argsort(indices) (stable) -> x[order // K] -> index_add of probs * y into tokens
  megatron  Megatron-Core's `moe_utils.permute` / `unpermute` (the unfused torch path; the fused
            one on a GPU where Transformer Engine imports), fed the routing map [T, E] and the
            dense probabilities [T, E] its router produces (built outside the timed call).
            Install as a user would: `pip download megatron-core --no-deps`, unzip the wheel
            into DIR (its pure-Python files; `triton` must be importable) and pass
            --megatron-path DIR or put DIR on PYTHONPATH; skipped with a message without it.
Each case checks that ours equals the baseline and reports the largest difference from
Megatron's output (and gradients with --backward). Legend: T tokens, D model dim, K top-k,
E experts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.kernels import get_ops, routing_index


def ours(x_TD, probs_TK, indices_TK, E, backend):
    permute, unpermute = get_ops(backend)
    ri = routing_index(indices_TK, E, static=True, dropless=True)
    x_ND, p_N = permute(x_TD, probs_TK, ri)
    return unpermute(x_ND, p_N, ri)


def load_megatron(path: str | None):
    """(permute, unpermute, fused available) of Megatron-Core, or None with a message."""
    if path:
        sys.path.insert(0, path)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.transformer.moe import moe_utils
    except ImportError as exc:
        print(f"megatron peer skipped: megatron-core does not import ({exc}); see the docstring")
        return None
    return moe_utils.permute, moe_utils.unpermute, bool(getattr(moe_utils, "HAVE_TE", False))


def megatron_fn(mc, fused: bool):
    """Megatron's dispatch of one layer: permute by routing map, unpermute merging probs."""
    mc_permute, mc_unpermute, _ = mc

    def run(x_TD, probs_TE, routing_map_TE, num_out, backend):
        permuted, _, sorted_indices = mc_permute(x_TD, routing_map_TE, num_out_tokens=num_out, fused=fused)
        return mc_unpermute(permuted, sorted_indices, x_TD.shape, probs=probs_TE,
                            routing_map=routing_map_TE, fused=fused)

    return run


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
    """Fastest time of each fn, runs interleaved so all see the same machine load.
    `args` is one tuple for all, or a list with one tuple per fn."""
    per_fn = args if isinstance(args, list) else [args] * len(fns)
    for fn, a in zip(fns, per_fn):
        _once(fn, a, backward)
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, (fn, a) in enumerate(zip(fns, per_fn)):
            t0 = time.perf_counter()
            _once(fn, a, backward)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _out_and_grads(fn, args):
    x = args[0].detach().requires_grad_()
    p = args[1].detach().requires_grad_()
    out = fn(x, p, *args[2:])
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), x.grad, p.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--megatron-path", default=None, help="folder holding megatron/ (unzipped wheel)")
    args = ap.parse_args()
    device = "cuda" if args.backend == "triton" else "cpu"
    mc = load_megatron(args.megatron_path)
    fused = mc is not None and mc[2] and device == "cuda"
    torch.manual_seed(0)
    print(f"device={device} backend={args.backend} threads={torch.get_num_threads()} "
          f"T={args.tokens} {'fwd+bwd' if args.backward else 'fwd'}"
          + ("" if mc is None else f" megatron={'fused' if fused else 'unfused'}"))
    print(f"{'D':>5} {'K':>2} {'E':>4} {'ours tok/s':>12} {'baseline tok/s':>15} {'speedup':>8}"
          + ("" if mc is None else f" {'megatron tok/s':>15} {'ours/megatron':>13} {'max |diff|':>10}"))
    ratios = []
    for D, K, E in [(256, 2, 8), (1024, 2, 8), (1024, 8, 64), (4096, 2, 16), (2048, 8, 128)]:
        T = args.tokens
        x = torch.randn(T, D, device=device)
        probs = torch.rand(T, K, device=device)
        idx = torch.rand(T, E, device=device).topk(K, dim=1).indices
        ref = baseline(x, probs, idx, E, args.backend)
        got = ours(x, probs, idx, E, args.backend)
        assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4), "mismatch"
        fns, fn_args = [ours, baseline], [(x, probs, idx, E, args.backend)] * 2
        if mc is not None:
            routing_map = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, idx, True)
            probs_TE = torch.zeros(T, E, device=device).scatter_(1, idx, probs)
            fns.append(megatron_fn(mc, fused))
            fn_args.append((x, probs_TE, routing_map, T * K, args.backend))
        times = bench_pair(fns, fn_args, args.repeat, args.backward)
        line = f"{D:>5} {K:>2} {E:>4} {T / times[0]:>12,.0f} {T / times[1]:>15,.0f} {times[1] / times[0]:>8.2f}x"
        if mc is not None:
            a, b = _out_and_grads(ours, fn_args[0]), _out_and_grads(fns[2], fn_args[2])
            # gradients: x alike; probs [T, K] against Megatron's [T, E] at the chosen experts
            diffs = [(a[0] - b[0]).abs().max(), (a[1] - b[1]).abs().max(),
                     (a[2] - b[2].gather(1, idx)).abs().max()]
            ratios.append(times[2] / times[0])
            line += f" {T / times[2]:>15,.0f} {ratios[-1]:>12.2f}x {float(max(diffs)):>10.2e}"
        print(line, flush=True)
    if ratios:
        print(f"ours/megatron speed: mean {sum(ratios) / len(ratios):.2f}, min {min(ratios):.2f} "
              f"(> 1 = ours faster)")

if __name__ == "__main__":
    main()
