"""Plain torch permute / unpermute with explicit backward (gathers and index_add only).

Legend: T tokens, D model dim, K top-k, P = T*K pairs, N rows of the permuted buffer.

With src_pair_N (the (token, k) pair of each row, from `routing_index`):
permute:   x_ND = x_TD[token(n)],  probs_N = probs_TK[pair(n)]   (the probabilities move
           with the rows in the same call, so unpermute needs no second gather)
unpermute: out_TD[t] = sum over rows n of token t of w_N[n] * y_ND[n]      (index_add)
A padded buffer (`RoutingIndex.padded`) has padding rows: their pair is the sentinel P, whose
probability reads as zero, and their token is T-1 (any real token would do). Unpermute adds
0 * y for them, exactly nothing for finite y, and their gradients are exact zeros too (the output gradient
of a padding row is 0 * g); only the probability gradient of a padding row is not zero, and it
lands in the sentinel slot, which is cut off. So padding never changes a real token's value.
"""

from __future__ import annotations

import torch

from .index import RoutingIndex


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, probs_TK, src_pair_N, tok_N, padded: bool):
        T, K = probs_TK.shape
        ctx.save_for_backward(src_pair_N, tok_N)
        ctx.shape = (T, K, padded)
        probs_P = probs_TK.reshape(-1)
        if padded:  # the sentinel pair P has probability zero
            probs_P = torch.nn.functional.pad(probs_P, (0, 1))
        return x_TD.index_select(0, tok_N), probs_P.index_select(0, src_pair_N)

    @staticmethod
    def backward(ctx, g_ND, g_N):
        src_pair_N, tok_N = ctx.saved_tensors
        T, K, padded = ctx.shape
        g_x_TD = g_probs_TK = None
        if g_ND is not None:
            g_x_TD = g_ND.new_zeros(T, g_ND.shape[1]).index_add_(0, tok_N, g_ND)
        if g_N is not None:
            g_probs_P = g_N.new_zeros(T * K + (1 if padded else 0)).index_add_(0, src_pair_N, g_N)
            g_probs_TK = (g_probs_P[: T * K] if padded else g_probs_P).view(T, K)
        return g_x_TD, g_probs_TK, None, None, None


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
    return _Permute.apply(x_TD, probs_TK, index.src_pair_N, index.src_token_N, index.padded)


def unpermute(y_ND: torch.Tensor, w_N: torch.Tensor, index: RoutingIndex):
    """Weighted scatter-add of expert outputs back to token order: out_TD."""
    return _Unpermute.apply(y_ND, w_N, index.src_token_N, index.num_tokens)
