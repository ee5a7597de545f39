"""Plain torch permute / unpermute with explicit backward.

Legend: T tokens, D model dim, K top-k, N permuted rows.

permute:   x_ND[dest[t, k]] = x_TD[t],  probs_N[dest[t, k]] = probs_TK[t, k]   (kept pairs)
unpermute: out_TD[t] = sum_k w_N[dest[t, k]] * y_ND[dest[t, k]]                  (kept pairs)
"""

from __future__ import annotations

import torch


def _pairs(dest_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token id, destination row) of every kept pair."""
    keep = dest_TK >= 0
    tok = torch.arange(dest_TK.shape[0], device=dest_TK.device)[:, None].expand_as(dest_TK)
    return tok[keep], dest_TK[keep]


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, probs_TK, dest_TK, num_rows: int):
        tok_N, row_N = _pairs(dest_TK)
        x_ND = x_TD.new_empty(num_rows, x_TD.shape[1])
        x_ND[row_N] = x_TD[tok_N]
        probs_N = probs_TK.new_empty(num_rows)
        probs_N[row_N] = probs_TK[dest_TK >= 0]
        ctx.save_for_backward(dest_TK)
        ctx.num_tokens = x_TD.shape[0]
        return x_ND, probs_N

    @staticmethod
    def backward(ctx, g_ND, g_N):
        (dest_TK,) = ctx.saved_tensors
        keep_TK = dest_TK >= 0
        safe_TK = dest_TK.clamp(min=0)
        g_x_TD = None
        if g_ND is not None and g_ND.shape[0] == 0:
            g_x_TD = g_ND.new_zeros(ctx.num_tokens, g_ND.shape[1])
        elif g_ND is not None:
            g_TKD = g_ND[safe_TK] * keep_TK[..., None]
            g_x_TD = g_TKD.sum(1)
        g_probs_TK = None
        if g_N is not None and g_N.shape[0] == 0:
            g_probs_TK = g_N.new_zeros(dest_TK.shape)
        elif g_N is not None:
            g_probs_TK = g_N[safe_TK] * keep_TK
        return g_x_TD, g_probs_TK, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, w_N, dest_TK, num_tokens: int):
        ctx.save_for_backward(y_ND, w_N, dest_TK)
        if y_ND.shape[0] == 0:
            return y_ND.new_zeros(num_tokens, y_ND.shape[1])
        keep_TK = dest_TK >= 0
        safe_TK = dest_TK.clamp(min=0)
        w_TK = w_N[safe_TK] * keep_TK
        return torch.einsum("tk,tkd->td", w_TK.to(y_ND.dtype), y_ND[safe_TK])

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_N, dest_TK = ctx.saved_tensors
        tok_N, row_N = _pairs(dest_TK)
        g_rows = g_TD[tok_N]
        g_y_ND = torch.zeros_like(y_ND)
        g_y_ND[row_N] = g_rows * w_N[row_N, None].to(g_rows.dtype)
        g_w_N = torch.zeros_like(w_N)
        g_w_N[row_N] = (g_rows * y_ND[row_N]).sum(-1).to(w_N.dtype)
        return g_y_ND, g_w_N, None, None


def permute(x_TD: torch.Tensor, probs_TK: torch.Tensor, dest_TK: torch.Tensor, num_rows: int):
    """Rows of `x_TD` and `probs_TK` in expert-sorted order: (x_ND, probs_N)."""
    return _Permute.apply(x_TD, probs_TK, dest_TK, num_rows)


def unpermute(y_ND: torch.Tensor, w_N: torch.Tensor, dest_TK: torch.Tensor, num_tokens: int):
    """Weighted scatter-add of expert outputs back to token order: out_TD."""
    assert dest_TK.shape[0] == num_tokens
    return _Unpermute.apply(y_ND, w_N, dest_TK, num_tokens)
