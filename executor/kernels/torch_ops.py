"""Plain torch permute / unpermute with explicit backward (gathers and index_add only).

Legend: T tokens, D model dim, K top-k, N permuted rows.

With src_pair_N (the (token, k) pair of each permuted row, from `routing_index`):
permute:   x_ND = x_TD[token(n)],  probs_N = probs_TK[pair(n)]
unpermute: out_TD[t] = sum over rows n of token t of w_N[n] * y_ND[n]      (index_add)
"""

from __future__ import annotations

import torch

from .index import RoutingIndex


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, probs_TK, src_pair_N, K: int):
        tok_N = src_pair_N // K
        ctx.save_for_backward(src_pair_N, tok_N)
        ctx.shape = (x_TD.shape[0], K)
        return x_TD.index_select(0, tok_N), probs_TK.reshape(-1).index_select(0, src_pair_N)

    @staticmethod
    def backward(ctx, g_ND, g_N):
        src_pair_N, tok_N = ctx.saved_tensors
        T, K = ctx.shape
        g_x_TD = g_probs_TK = None
        if g_ND is not None:
            g_x_TD = g_ND.new_zeros(T, g_ND.shape[1]).index_add_(0, tok_N, g_ND)
        if g_N is not None:
            g_probs_TK = g_N.new_zeros(T * K).index_copy_(0, src_pair_N, g_N).view(T, K)
        return g_x_TD, g_probs_TK, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, w_N, tok_N, T: int):
        ctx.save_for_backward(y_ND, w_N, tok_N)
        return y_ND.new_zeros(T, y_ND.shape[1]).index_add_(0, tok_N, y_ND * w_N[:, None].to(y_ND.dtype))

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_N, tok_N = ctx.saved_tensors
        g_rows_ND = g_TD.index_select(0, tok_N)
        g_y_ND = g_rows_ND * w_N[:, None].to(g_rows_ND.dtype)
        g_w_N = (g_rows_ND * y_ND).sum(-1).to(w_N.dtype)
        return g_y_ND, g_w_N, None, None


def permute(x_TD: torch.Tensor, probs_TK: torch.Tensor, index: RoutingIndex):
    """Rows of `x_TD` and `probs_TK` in expert-sorted order: (x_ND, probs_N)."""
    return _Permute.apply(x_TD, probs_TK, index.src_pair_N, index.dest_TK.shape[1])


def unpermute(y_ND: torch.Tensor, w_N: torch.Tensor, index: RoutingIndex):
    """Weighted scatter-add of expert outputs back to token order: out_TD."""
    return _Unpermute.apply(y_ND, w_N, index.src_token_N, index.dest_TK.shape[0])
