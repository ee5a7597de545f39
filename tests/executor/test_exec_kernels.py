"""Permute / unpermute kernels against a plain reference, forward and backward.

The torch kernels run in-process; the Triton kernels run under TRITON_INTERPRET=1 in a
subprocess (the variable must be set before triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from executor.kernels import get_ops, routing_index

REPO = Path(__file__).resolve().parents[2]


def reference(x_TD, probs_TK, indices_TK, num_experts, y_fn):
    """Loop reference: rows sorted by (expert, token, k), outputs weighted and summed back."""
    rows = [(int(e), t, k) for t in range(indices_TK.shape[0]) for k in range(indices_TK.shape[1])
            if (e := indices_TK[t, k]) >= 0]
    rows.sort(key=lambda r: (r[0], r[1], r[2]))  # stable: token order inside an expert
    x_ND = torch.stack([x_TD[t] for _, t, _ in rows]) if rows else x_TD[:0]
    p_N = torch.stack([probs_TK[t, k] for _, t, k in rows]) if rows else probs_TK.reshape(-1)[:0]
    y_ND = y_fn(x_ND)
    out = torch.zeros_like(x_TD)
    for i, (_, t, k) in enumerate(rows):
        out = out.index_add(0, torch.tensor([t]), (p_N[i] * y_ND[i])[None])
    return x_ND, p_N, out


def run_case(backend, T, D, K, E, seed, drop=0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    p = torch.rand(T, K, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    idx = torch.where(torch.rand(T, K, generator=g) < drop, torch.full_like(idx, -1), idx)
    w_y = torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5
    g_out = torch.randn(T, D, generator=g, dtype=torch.float64)
    results = []
    for which in ("ref", backend):
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        if which == "ref":
            x_ND, p_N, out = reference(xr, pr, idx, E, lambda h: torch.tanh(h @ w_y))
        else:
            permute, unpermute = get_ops(which)
            ri = routing_index(idx, E)
            x_ND, p_N = permute(xr, pr, ri)
            out = unpermute(torch.tanh(x_ND @ w_y), p_N, ri)
        loss = (out * g_out).sum() + (p_N ** 2).sum()
        gx, gp = torch.autograd.grad(loss, [xr, pr], allow_unused=True)
        gx = torch.zeros_like(x) if gx is None else gx
        gp = torch.zeros_like(p) if gp is None else gp
        results.append([x_ND.detach(), p_N.detach(), out.detach(), gx, gp])
    return results


CASES = [(13, 40, 3, 5, 0), (64, 32, 2, 8, 1), (7, 200, 1, 4, 2), (1, 16, 2, 2, 3), (20, 24, 4, 16, 4)]


@pytest.mark.parametrize("T,D,K,E,seed", CASES)
def test_torch_kernels_match_reference(T, D, K, E, seed):
    ref, got = run_case("torch", T, D, K, E, seed)
    for name, a, b in zip(["x_ND", "probs_N", "out", "grad_x", "grad_probs"], ref, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=name)


def test_routing_index_counting_sort():
    idx = torch.tensor([[1, 0], [1, 1], [-1, 0]])
    ri = routing_index(idx, 3)
    assert ri.tokens_per_expert_E.tolist() == [2, 3, 0]
    assert ri.dest_TK.tolist() == [[2, 0], [3, 4], [-1, 1]]
    assert ri.num_rows == 5


def test_all_dropped_gives_zero_output_and_grads():
    permute, unpermute = get_ops("torch")
    x = torch.randn(4, 8, requires_grad=True)
    p = torch.rand(4, 2, requires_grad=True)
    ri = routing_index(torch.full((4, 2), -1), 4)
    x_ND, p_N = permute(x, p, ri)
    out = unpermute(x_ND * 2, p_N, ri)
    assert x_ND.shape == (0, 8) and torch.equal(out, torch.zeros(4, 8))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    sys.path.insert(0, {tests!r})
    from test_exec_kernels import run_case, CASES
    worst = 0.0
    for case in CASES:
        ref, got = run_case("triton", *case)
        for a, b in zip(ref, got):
            if a.numel():
                worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1.0)))
    print("WORST", worst)
""")


@pytest.mark.timeout(300)
def test_triton_kernels_match_reference_interpreted():
    script = TRITON_SCRIPT.format(tests=str(Path(__file__).parent))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[1])
    # Triton accumulates in fp32, the reference in fp64.
    assert worst < 1e-5, worst


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_torch_on_gpu():
    T, D, K, E = 4096, 1024, 2, 64
    x = torch.randn(T, D, device="cuda", requires_grad=True)
    p = torch.rand(T, K, device="cuda", requires_grad=True)
    idx = torch.randint(0, E, (T, K), device="cuda")
    ri = routing_index(idx, E)
    outs = []
    for backend in ("torch", "triton"):
        permute, unpermute = get_ops(backend)
        x_ND, p_N = permute(x, p, ri)
        out = unpermute(x_ND * 2, p_N, ri)
        gx, gp = torch.autograd.grad(out.square().sum(), [x, p])
        outs.append((x_ND, p_N, out, gx, gp))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_routing_index_matches_a_loop_over_experts():
    """Every layout against a plain loop: expert e's kept pairs in token order."""
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(-1, 16, (300, 4), generator=g)
    P, E = idx.numel(), 16
    flat = idx.reshape(-1).tolist()
    kept_E = [[p for p in range(P) if flat[p] == e] for e in range(E)]
    kept = [p for pairs in kept_E for p in pairs]
    C = max(len(pairs) for pairs in kept_E)
    exact, static = routing_index(idx, E), routing_index(idx, E, static=True)
    cap = routing_index(idx, E, capacity=C)
    assert exact.src_pair_N.tolist() == kept
    assert static.src_pair_N.tolist() == kept + [P] * (P - len(kept))
    assert cap.src_pair_N.tolist() == [p for pairs in kept_E for p in pairs + [P] * (C - len(pairs))]
    assert exact.tokens_per_expert_E.tolist() == [len(pairs) for pairs in kept_E]
    dest = [-1] * P
    for row, p in enumerate(kept):
        dest[p] = row
    assert exact.dest_TK.reshape(-1).tolist() == dest == static.dest_TK.reshape(-1).tolist()
    assert torch.equal(exact.src_token_N, exact.src_pair_N // 4)


@pytest.mark.timeout(300)
def test_triton_kernels_compile_for_h100_without_gpu(monkeypatch, tmp_path):
    """Ahead-of-time compile every kernel to an sm_90 cubin (catches typing errors that the
    interpreter lets through) with the dtypes the GPU path uses: bf16 rows, fp32 probs."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, leave no cache
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget API")
    from executor.kernels import triton_ops

    def sig(names, kinds):
        return dict(zip(names, kinds)) | {"D": "i32", "K": "constexpr", "BLOCK": "constexpr"}

    kernels = {
        "_permute_fwd": sig(["x_ptr", "p_ptr", "dest_ptr", "out_ptr", "outp_ptr"],
                            ["*bf16", "*fp32", "*i64", "*bf16", "*fp32"]),
        "_permute_bwd": sig(["g_ptr", "gp_ptr", "dest_ptr", "gx_ptr", "gprob_ptr"],
                            ["*bf16", "*fp32", "*i64", "*bf16", "*fp32"]),
        "_unpermute_fwd": sig(["y_ptr", "w_ptr", "dest_ptr", "out_ptr"], ["*bf16", "*fp32", "*i64", "*bf16"]),
        "_unpermute_bwd": sig(["g_ptr", "y_ptr", "w_ptr", "dest_ptr", "gy_ptr", "gw_ptr"],
                              ["*bf16", "*bf16", "*fp32", "*i64", "*bf16", "*fp32"]),
    }
    for name, signature in kernels.items():
        names = list(signature)
        constexprs = {(names.index("K"),): 8, (names.index("BLOCK"),): 1024}
        src = ASTSource(fn=getattr(triton_ops, name), signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["dropless", "capacity"])
def test_torch_kernel_row_blocks_change_no_bit(monkeypatch, dtype, layout):
    """The CPU path forms w * y and g * y in row blocks when they are large: outputs and
    gradients equal the one-block result bit for bit (blocks forced here by tiny sizes)."""
    from executor.kernels import torch_ops

    g = torch.Generator().manual_seed(3)
    T, D, K, E = 300, 24, 4, 8
    x = torch.randn(T, D, generator=g, dtype=dtype)
    p = torch.rand(T, K, generator=g, dtype=dtype)
    idx = torch.rand(T, E, generator=g).topk(K, dim=1).indices
    cap = None
    if layout == "capacity":  # keep at most C pairs per expert, in token order
        cap = T * K // E - 10
        rank_P = (idx.reshape(-1, 1) == torch.arange(E)).cumsum(0).gather(1, idx.reshape(-1, 1))
        idx = torch.where(rank_P.view(T, K) > cap, -1, idx)
    g_out = torch.randn(T, D, generator=g, dtype=dtype)
    results = []
    for block, split in [(1 << 30, 1 << 30), (7 * D * x.element_size(), 0)]:
        monkeypatch.setattr(torch_ops, "BLOCK_BYTES", block)
        monkeypatch.setattr(torch_ops, "FORWARD_SPLIT_BYTES", split)
        ri = routing_index(idx, E, static=True, capacity=cap, dropless=cap is None)
        xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
        x_ND, p_N = torch_ops.permute(xr, pr, ri)
        out = torch_ops.unpermute(torch.tanh(x_ND), p_N, ri)
        out.backward(g_out)
        results.append((out.detach(), xr.grad, pr.grad))
    assert len(torch_ops._row_blocks(x_ND, 0)) > 1  # the second run did split
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_capacity_rows_equal_the_flat_capacity_kernels(monkeypatch, dtype, blocks):
    """The router's pad-to-capacity rows (router.choose_by_expert -> gather_rows ->
    unpermute_rows, rows best first within an expert) against the pair drop with the
    token-ordered capacity buffer (routing_index -> permute -> unpermute): the same output,
    x gradient and probability gradient, bit for bit, for a row-wise expert function. A
    token's rows are added in expert order in both, and padding rows add exactly zero.
    `blocks`: the large-row paths of both, forced by tiny thresholds; bf16 rows always take
    the flat path (index_add's fp32 accumulation)."""
    from executor.kernels import (
        gather_rows,
        permute,
        torch_ops,
        unpermute,
        unpermute_rows,
    )
    from executor.router import choose_by_expert, drop_by_capacity

    if blocks:
        monkeypatch.setattr(torch_ops, "BLOCK_BYTES", 7 * 16 * torch.finfo(dtype).bits // 8)
        monkeypatch.setattr(torch_ops, "FORWARD_SPLIT_BYTES", 0)

    g = torch.Generator().manual_seed(5)
    T, D, K, E, C = 120, 16, 2, 8, 24
    x = torch.randn(T, D, generator=g, dtype=dtype)
    logits = torch.randn(T, E, generator=g, dtype=dtype)
    idx = logits.topk(K, dim=1).indices
    p = torch.softmax(logits.gather(1, idx), -1)
    g_out = torch.randn(T, D, generator=g, dtype=dtype)

    xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
    kept_p, kept_i, _ = drop_by_capacity(pa, idx, E, C)
    ri = routing_index(kept_i, E, static=True, capacity=C)
    x_ND, p_N = permute(xa, kept_p, ri)
    out_a = unpermute(torch.tanh(x_ND), p_N, ri)
    out_a.backward(g_out)

    xb, pb = x.clone().requires_grad_(), p.clone().requires_grad_()
    choice = choose_by_expert(pb, idx, E, C)
    x_ECD = gather_rows(xb, choice.tokens_EC)
    assert x_ECD.shape == (E, C, D)
    out_b = unpermute_rows(torch.tanh(x_ECD), choice.probs_EC1, choice.tokens_EC, T)
    out_b.backward(g_out)

    assert int(choice.num_dropped) > 0  # the capacity really dropped pairs
    assert torch_ops._flat_path(x_ECD) == (blocks or dtype == torch.bfloat16)  # bf16: always flat
    assert torch.equal(out_a, out_b)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(pa.grad, pb.grad)
