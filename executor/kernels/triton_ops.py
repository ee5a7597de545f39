"""Triton permute / unpermute (one program per token, no atomics, deterministic).

Legend: T tokens, D model dim, K top-k, N permuted rows.

Each program handles one token t and loops over its K pairs, reading its destination row
dest[t, k] (-1 = dropped, masked out), so every output element is written by one program:
  permute fwd     x_ND[dest] = x_TD[t]; probs_N[dest] = probs_TK[t, k]
  permute bwd     g_x_TD[t] = sum_k g_ND[dest]; g_probs_TK[t, k] = g_N[dest]
  unpermute fwd   out_TD[t] = sum_k w_N[dest] * y_ND[dest]
  unpermute bwd   g_y_ND[dest] = w_N[dest] * g_TD[t]; g_w_N[dest] = <g_TD[t], y_ND[dest]>
Padding rows of a static or capacity buffer (`RoutingIndex.padded`) are no pair's destination:
permute leaves them zero and the other kernels never read them.
On CPU run it with TRITON_INTERPRET=1 set before triton is imported (tests do, in a subprocess).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _permute_fwd(x_ptr, p_ptr, dest_ptr, out_ptr, outp_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for k in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + k)
        keep = d >= 0
        dd = tl.maximum(d, 0)
        for start in range(0, D, BLOCK):
            m = (start + offs < D) & (offs * 0 + d >= 0)
            row = tl.load(x_ptr + t * D + start + offs, mask=m, other=0.0)
            tl.store(out_ptr + dd * D + start + offs, row, mask=m)
        p = tl.load(p_ptr + t * K + k)
        tl.store(outp_ptr + dd, p, mask=keep)


@triton.jit
def _permute_bwd(g_ptr, gp_ptr, dest_ptr, gx_ptr, gprob_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, D, BLOCK):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + k)
            m = (start + offs < D) & (offs * 0 + d >= 0)
            acc += tl.load(g_ptr + tl.maximum(d, 0) * D + start + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(gx_ptr + t * D + start + offs, acc.to(gx_ptr.dtype.element_ty), mask=start + offs < D)
    for k in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + k)
        gp = tl.load(gp_ptr + tl.maximum(d, 0), mask=d >= 0, other=0.0)
        tl.store(gprob_ptr + t * K + k, gp)


@triton.jit
def _unpermute_fwd(y_ptr, w_ptr, dest_ptr, out_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, D, BLOCK):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + k)
            keep = d >= 0
            dd = tl.maximum(d, 0)
            w = tl.load(w_ptr + dd, mask=keep, other=0.0).to(tl.float32)
            m = (start + offs < D) & (offs * 0 + d >= 0)
            acc += w * tl.load(y_ptr + dd * D + start + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * D + start + offs, acc.to(out_ptr.dtype.element_ty), mask=start + offs < D)


@triton.jit
def _unpermute_bwd(g_ptr, y_ptr, w_ptr, dest_ptr, gy_ptr, gw_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for k in tl.static_range(K):
        d = tl.load(dest_ptr + t * K + k)
        keep = d >= 0
        dd = tl.maximum(d, 0)
        w = tl.load(w_ptr + dd, mask=keep, other=0.0).to(tl.float32)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, D, BLOCK):
            m = (start + offs < D) & (offs * 0 + d >= 0)
            g = tl.load(g_ptr + t * D + start + offs, mask=m, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + dd * D + start + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(gy_ptr + dd * D + start + offs, (g * w).to(gy_ptr.dtype.element_ty), mask=m)
            dot += g * y
        tl.store(gw_ptr + dd, tl.sum(dot, axis=0).to(gw_ptr.dtype.element_ty), mask=keep)


def _block(D: int) -> int:
    return min(1024, triton.next_power_of_2(max(D, 16)))


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, probs_TK, dest_TK, num_rows: int, padded: bool):
        x_TD, probs_TK, dest_TK = x_TD.contiguous(), probs_TK.contiguous(), dest_TK.contiguous()
        T, D = x_TD.shape
        K = dest_TK.shape[1]
        alloc = torch.zeros if padded else torch.empty  # padding rows stay zero
        x_ND = alloc(num_rows, D, dtype=x_TD.dtype, device=x_TD.device)
        probs_N = alloc(num_rows, dtype=probs_TK.dtype, device=probs_TK.device)
        if T and num_rows:
            _permute_fwd[(T,)](x_TD, probs_TK, dest_TK, x_ND, probs_N, D, K=K, BLOCK=_block(D))
        ctx.save_for_backward(dest_TK)
        ctx.shape = (T, D, probs_TK.dtype)
        return x_ND, probs_N

    @staticmethod
    def backward(ctx, g_ND, g_N):
        (dest_TK,) = ctx.saved_tensors
        T, D, pdtype = ctx.shape
        K = dest_TK.shape[1]
        g_ND = torch.zeros(0, D, device=dest_TK.device) if g_ND is None else g_ND.contiguous()
        g_N = torch.zeros(g_ND.shape[0], device=dest_TK.device, dtype=pdtype) if g_N is None else g_N.contiguous()
        g_x_TD = g_ND.new_zeros(T, D)
        g_probs_TK = g_N.new_zeros(T, K)
        if T and g_ND.shape[0]:
            _permute_bwd[(T,)](g_ND, g_N, dest_TK, g_x_TD, g_probs_TK, D, K=K, BLOCK=_block(D))
        return g_x_TD, g_probs_TK, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, w_N, dest_TK, num_tokens: int):
        y_ND, w_N, dest_TK = y_ND.contiguous(), w_N.contiguous(), dest_TK.contiguous()
        D = y_ND.shape[1]
        K = dest_TK.shape[1]
        out_TD = y_ND.new_zeros(num_tokens, D)
        if num_tokens and y_ND.shape[0]:
            _unpermute_fwd[(num_tokens,)](y_ND, w_N, dest_TK, out_TD, D, K=K, BLOCK=_block(D))
        ctx.save_for_backward(y_ND, w_N, dest_TK)
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_N, dest_TK = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        T, K = dest_TK.shape
        D = y_ND.shape[1]
        g_y_ND = torch.zeros_like(y_ND)
        g_w_N = torch.zeros_like(w_N)
        if T and y_ND.shape[0]:
            _unpermute_bwd[(T,)](g_TD, y_ND, w_N, dest_TK, g_y_ND, g_w_N, D, K=K, BLOCK=_block(D))
        return g_y_ND, g_w_N, None, None


def permute(x_TD, probs_TK, index):
    """Triton twin of `torch_ops.permute` (uses index.dest_TK)."""
    return _Permute.apply(x_TD, probs_TK, index.dest_TK, index.num_rows, index.padded)


def unpermute(y_ND, w_N, index):
    """Triton twin of `torch_ops.unpermute` (uses index.dest_TK)."""
    return _Unpermute.apply(y_ND, w_N, index.dest_TK, index.num_tokens)
