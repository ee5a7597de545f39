"""Our permute + unpermute against Megatron-Core's: speed per shape, outputs bit for bit.

    .venv/bin/python benchmarks/dispatch_kernels.py --megatron-path DIR [--tokens 4096]
        [--reps 40] [--warmup 3] [--threads 1] [--modes fwd fwd+bwd] [--capacity-factor 1.0]

Same inputs for both: x_TD, top-k expert ids indices_TK, probabilities probs_TK.
  ours      what the executor runs: the stable sort into the static buffer (routing_index:
            T*K rows dropless, E*C rows with --capacity-factor) + permute + unpermute (torch
            kernels on CPU, Triton kernels with --backend triton on a GPU)
  megatron  Megatron-Core's `moe_utils.permute` / `unpermute` (the unfused torch path; the fused
            one on a GPU where Transformer Engine imports; `drop_and_pad` with capacity), fed
            the routing map [T, E] and the dense probabilities [T, E] its router produces
            (built outside the timed call, as our indices are). Install as a user would:
            `pip download megatron-core --no-deps`, unzip the wheel into DIR (its pure-Python
            files; `triton` must be importable) and pass --megatron-path DIR or put DIR on
            PYTHONPATH. Without it the peer is `baseline` (argsort, x[order // K], index_add of
            probs * y), dropless only, with a message.
Capacity (--capacity-factor C): the router's drop rule (router.drop_by_capacity) picks the
dropped pairs outside the timed call; ours takes indices -1 there, Megatron the routing map
without them.

Measurement (a shared machine: other processes come and go): one torch thread; every shape
warms both up, then runs `--reps` pairs, ours and the peer back to back, the order flipped
every pair (AB BA AB ...) so both see the same load. Each call is timed with
time.process_time, the CPU time of this process: with one thread it is the call's own work
(page faults included, as system time) and leaves out the time other processes hold the
core, which perf_counter counts and which made one shape measure 0.48x to 1.63x from run to
run. Per shape: median ms of each, the median of the per-pair ratios peer / ours (> 1 = ours
faster) with their interquartile range, the ratio of the fastest calls, the share of pairs
ours won, and the median per-pair ratio of wall time (perf_counter) for comparison.
Forward runs under no_grad; forward + backward seeds the backward with a fixed dense
gradient (what a layer above hands back; `.sum()` would hand back a stride-0 tensor).
Bit-identity per shape (checked once, outside the timing): the outputs and the gradients
of x and of the kept pairs' probabilities equal Megatron's exactly (torch.equal).
Legend: T tokens, D model dim, K top-k, E experts, C capacity per expert.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from executor.kernels import get_ops, routing_index
from executor.router import drop_by_capacity, expert_capacity

SHAPES = [(256, 2, 8), (1024, 2, 8), (1024, 8, 64), (4096, 2, 16), (2048, 8, 128)]  # (D, K, E)


def ours_fn(backend: str):
    permute, unpermute = get_ops(backend)

    def run(x_TD, probs_TK, indices_TK, E, capacity):
        ri = routing_index(indices_TK, E, static=True, capacity=capacity, dropless=capacity is None)
        x_ND, p_N = permute(x_TD, probs_TK, ri)
        return unpermute(x_ND, p_N, ri)

    return run


def baseline(x_TD, probs_TK, indices_TK, E, capacity):
    """Dropless reference without our kernels (the peer when Megatron is absent)."""
    K = indices_TK.shape[1]
    order_N = torch.argsort(indices_TK.reshape(-1), stable=True)
    tok_N = order_N // K
    p_N = probs_TK.reshape(-1)[order_N]
    return torch.zeros_like(x_TD).index_add(0, tok_N, x_TD[tok_N] * p_N[:, None])


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

    def run(x_TD, probs_TE, routing_map_TE, num_out, drop_and_pad):
        permuted, _, sorted_indices = mc_permute(x_TD, routing_map_TE, num_out_tokens=num_out,
                                                 fused=fused, drop_and_pad=drop_and_pad)
        return mc_unpermute(permuted, sorted_indices, x_TD.shape, probs=probs_TE,
                            routing_map=routing_map_TE, fused=fused, drop_and_pad=drop_and_pad)

    return run


def _once(fn, args, g_out):
    """One timed call: forward (no_grad) when g_out is None, else forward + backward."""
    if g_out is None:
        with torch.no_grad():
            fn(*args)
    else:
        x, p = args[0].detach().requires_grad_(), args[1].detach().requires_grad_()
        fn(x, p, *args[2:]).backward(g_out)
    if args[0].is_cuda:
        torch.cuda.synchronize()


def bench_pair(fns, per_fn_args, g_out, reps: int, warmup: int):
    """Per-call (cpu, wall) seconds of each fn over `reps` interleaved pairs (ABBA order)."""
    for _ in range(warmup):
        for fn, a in zip(fns, per_fn_args):
            _once(fn, a, g_out)
    cpu, wall = [[], []], [[], []]
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                c0, w0 = time.process_time(), time.perf_counter()
                _once(fns[i], per_fn_args[i], g_out)
                w1, c1 = time.perf_counter(), time.process_time()
                cpu[i].append(c1 - c0)
                wall[i].append(w1 - w0)
    finally:
        gc.enable()
    return cpu, wall


def summarize(cpu, wall) -> dict:
    """Medians, per-pair ratios peer / ours (> 1 = ours faster) and their spread."""
    ratios = sorted(p / o for o, p in zip(*cpu))
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {
        "ours_ms": 1e3 * statistics.median(cpu[0]), "peer_ms": 1e3 * statistics.median(cpu[1]),
        "ratio": statistics.median(ratios), "q1": q1, "q3": q3,
        "best": min(cpu[1]) / min(cpu[0]),
        "wins": sum(r > 1 for r in ratios) / len(ratios),
        "wall": statistics.median(p / o for o, p in zip(*wall)),
    }


def _out_and_grads(fn, args, g_out):
    x, p = args[0].detach().requires_grad_(), args[1].detach().requires_grad_()
    out = fn(x, p, *args[2:])
    out.backward(g_out)
    return out.detach(), x.grad, p.grad


def make_case(T, D, K, E, cf, device, mc):
    """Inputs of ours and of the peer for one shape, and the kept pairs' mask."""
    x = torch.randn(T, D, device=device)
    probs = torch.rand(T, K, device=device)
    idx = torch.rand(T, E, device=device).topk(K, dim=1).indices
    cap = None if cf is None else expert_capacity(cf, T, K, E)
    if cap is not None:  # the router's drop rule, outside the timed call
        probs, idx, _ = drop_by_capacity(probs, idx, E, cap)
    kept = idx >= 0
    ours_args = (x, probs, idx, E, cap)
    if mc is None:
        return ours_args, ours_args, kept
    rows = torch.arange(T, device=device)[:, None].expand(T, K)[kept]
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=device)
    routing_map[rows, idx[kept]] = True
    probs_TE = torch.zeros(T, E, device=device)
    probs_TE[rows, idx[kept]] = probs[kept]
    peer_args = (x, probs_TE, routing_map, T * K if cap is None else E * cap, cap is not None)
    return ours_args, peer_args, kept


def identical(ours, peer, ours_args, peer_args, g_out, kept, mc) -> bool:
    """Output, x gradient and the kept pairs' probability gradients equal bit for bit."""
    a, b = _out_and_grads(ours, ours_args, g_out), _out_and_grads(peer, peer_args, g_out)
    g_probs_b = b[2] if mc is None else b[2].gather(1, ours_args[2].clamp(min=0))
    return (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
            and torch.equal(a[2][kept], g_probs_b[kept]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=40, help="timed pairs per shape and mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: process_time is the call's own time)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--capacity-factor", type=float, default=None, help="drop by capacity (default dropless)")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--megatron-path", default=None, help="folder holding megatron/ (unzipped wheel)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if args.backend == "triton" else "cpu"
    mc = load_megatron(args.megatron_path)
    fused = mc is not None and mc[2] and device == "cuda"
    if mc is None and args.capacity_factor is not None:
        raise SystemExit("the baseline peer is dropless only: pass --megatron-path for capacity")
    ours = ours_fn(args.backend)
    peer = baseline if mc is None else megatron_fn(mc, fused)
    peer_name = "baseline" if mc is None else "megatron-" + ("fused" if fused else "unfused")
    T = args.tokens
    print(f"device={device} backend={args.backend} threads={torch.get_num_threads()} T={T} "
          f"capacity_factor={args.capacity_factor} peer={peer_name} reps={args.reps} clock=process_time")
    print(f"{'mode':>7} {'D':>5} {'K':>2} {'E':>4} {'ours ms':>8} {'peer ms':>8} {'ratio':>6} "
          f"{'IQR':>11} {'best':>5} {'wins':>5} {'wall':>5}  bit-identical")
    worst = {}
    for mode in args.modes:
        for D, K, E in SHAPES:
            torch.manual_seed(0)
            ours_args, peer_args, kept = make_case(T, D, K, E, args.capacity_factor, device, mc)
            g_out = torch.randn(T, D, device=device)
            same = identical(ours, peer, ours_args, peer_args, g_out, kept, mc)
            cpu, wall = bench_pair([ours, peer], [ours_args, peer_args],
                                   None if mode == "fwd" else g_out, args.reps, args.warmup)
            s = summarize(cpu, wall)
            worst[mode] = min(worst.get(mode, float("inf")), s["ratio"])
            print(f"{mode:>7} {D:>5} {K:>2} {E:>4} {s['ours_ms']:>8.2f} {s['peer_ms']:>8.2f} "
                  f"{s['ratio']:>5.2f}x {s['q1']:>5.2f}-{s['q3']:<5.2f} {s['best']:>5.2f} "
                  f"{s['wins']:>5.0%} {s['wall']:>5.2f}  {'yes' if same else 'NO'}", flush=True)
            del ours_args, peer_args, g_out
    print("ratio = median over pairs of peer time / ours (process_time; > 1 = ours faster); "
          "lowest per mode: " + ", ".join(f"{m} {r:.2f}x" for m, r in worst.items()))


if __name__ == "__main__":
    main()
