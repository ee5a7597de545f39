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

No large [N, D] temporary on the CPU, which is what makes this path fast there: a large tensor
is fresh memory from the OS, page-faulted in on first write, so an [N, D] temporary costs
about as much as the gather that fills it. The gradient of y is the gathered output gradient
scaled in place, and the products g * y of the probability gradient and (above
FORWARD_SPLIT_BYTES) the weighted rows w * y of unpermute are formed BLOCK_BYTES of rows at a
time in one reused buffer (`_row_blocks`); below those sizes the plain single ops run, as on
the GPU. Megatron-Core's unfused path allocates three more [N, D] tensors per forward +
backward (y * probs, the gathered gradient and its two products). Blocks change no bit: CPU
index_add adds a token's rows one after the other in row order, accumulating in the dtype
itself for fp32 / fp64 (the only dtypes split), and a block boundary keeps that order; a
row's product sum does not depend on the other rows.
"""

from __future__ import annotations

import torch

from .index import RoutingIndex

BLOCK_BYTES = 1 << 20  # rows of w * y or g * y formed at a time: about the L2 cache
# Unpermute's forward splits only above this: each index_add call has a fixed cost (it sorts
# its index), which a spared temporary repays once it is large (fresh pages from the OS).
# Measured on a 2-core EPYC (T = 4096, fp32, one thread): blocks lose 15% at 8 MiB, break
# even at 16 MiB and win 2x from 32 MiB; the backward's blocks (no index_add) win from 2 MiB.
FORWARD_SPLIT_BYTES = 16 << 20


def _row_blocks(t_ND: torch.Tensor, split_above: int) -> list[tuple[int, int]]:
    """(start, end) row ranges of BLOCK_BYTES each when t_ND is larger than `split_above`,
    else one range. Never split off the CPU (a caching allocator: no fresh pages to spare)
    nor for dtypes whose index_add accumulates in a wider type (bf16, fp16: CPU index_add sums
    a token's rows in fp32 and rounds once per call, so a block boundary would round twice)."""
    N, D = t_ND.shape
    row_bytes = max(D * t_ND.element_size(), 1)
    if (N * row_bytes <= split_above or t_ND.device.type != "cpu"
            or t_ND.dtype not in (torch.float32, torch.float64)):
        return [(0, N)]
    step = max(1, BLOCK_BYTES // row_bytes)
    return [(s, min(s + step, N)) for s in range(0, N, step)]


def _weighted_index_add(out_TD, tok_N, y_ND, w_N1):
    """out_TD[tok_N[n]] += w_N1[n] * y_ND[n] for every row n, in row order."""
    blocks = _row_blocks(y_ND, FORWARD_SPLIT_BYTES)
    if len(blocks) == 1:
        return out_TD.index_add_(0, tok_N, y_ND * w_N1)
    buf = y_ND.new_empty(blocks[0][1], y_ND.shape[1])
    for s, e in blocks:
        out_TD.index_add_(0, tok_N[s:e], torch.mul(y_ND[s:e], w_N1[s:e], out=buf[: e - s]))
    return out_TD


def _row_dots(a_ND, b_ND):
    """(a_ND * b_ND).sum(-1), bit for bit, without an [N, D] temporary when N * D is large."""
    blocks = _row_blocks(a_ND, BLOCK_BYTES)
    if len(blocks) == 1:
        return (a_ND * b_ND).sum(-1)
    out_N = a_ND.new_empty(a_ND.shape[0])
    buf = a_ND.new_empty(blocks[0][1], a_ND.shape[1])
    for s, e in blocks:
        torch.sum(torch.mul(a_ND[s:e], b_ND[s:e], out=buf[: e - s]), -1, out=out_N[s:e])
    return out_N


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
        w_N1 = w_N[:, None].to(y_ND.dtype)
        ctx.save_for_backward(y_ND, w_N1, tok_N)
        ctx.w_dtype = w_N.dtype
        return _weighted_index_add(y_ND.new_zeros(T, y_ND.shape[1]), tok_N, y_ND, w_N1)

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_N1, tok_N = ctx.saved_tensors
        g_ND = g_TD.index_select(0, tok_N)  # a fresh tensor: becomes the gradient of y in place
        g_w_N = _row_dots(g_ND, y_ND).to(ctx.w_dtype)
        return g_ND.mul_(w_N1.to(g_ND.dtype)), g_w_N, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, tokens_EC):
        ctx.save_for_backward(tokens_EC)
        ctx.num_tokens = x_TD.shape[0]
        return x_TD[tokens_EC]

    @staticmethod
    def backward(ctx, g_ECD):
        (tokens_EC,) = ctx.saved_tensors
        g_TD = g_ECD.new_zeros(ctx.num_tokens, g_ECD.shape[-1])
        if _flat_path(g_ECD):  # CPU index_add is vectorised, the accumulating index_put is not
            return g_TD.index_add_(0, tokens_EC.view(-1), g_ECD.view(-1, g_ECD.shape[-1])), None
        return g_TD.index_put_((tokens_EC,), g_ECD, accumulate=True), None


def _flat_path(t: torch.Tensor) -> bool:
    """Whether rows [E, C, D] take the flat `index_add_` path (a few views more): reduced
    precision (CPU index_add sums a token's rows in fp32 and rounds once, as the flat layout
    always did, where an accumulating index_put would round each addition), or fp32 / fp64
    rows on the CPU above FORWARD_SPLIT_BYTES (row blocks, vectorised; `_row_blocks`' rule)."""
    if t.dtype not in (torch.float32, torch.float64):
        return True
    return t.device.type == "cpu" and t.numel() * t.element_size() > FORWARD_SPLIT_BYTES


class _UnpermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ECD, w_EC1, tokens_EC, T: int):
        ctx.save_for_backward(y_ECD, w_EC1, tokens_EC)
        out_TD = y_ECD.new_zeros(T, y_ECD.shape[-1])
        if _flat_path(y_ECD):
            D = y_ECD.shape[-1]
            return _weighted_index_add(out_TD, tokens_EC.view(-1), y_ECD.view(-1, D), w_EC1.view(-1, 1))
        return out_TD.index_put_((tokens_EC,), y_ECD * w_EC1, accumulate=True)

    @staticmethod
    def backward(ctx, g_TD):
        y_ECD, w_EC1, tokens_EC = ctx.saved_tensors
        g_ECD = g_TD[tokens_EC]  # a fresh tensor: becomes the gradient of y in place
        if _flat_path(y_ECD):
            D = y_ECD.shape[-1]
            g_w_EC1 = _row_dots(g_ECD.view(-1, D), y_ECD.view(-1, D)).view(w_EC1.shape)
        else:
            g_w_EC1 = (g_ECD * y_ECD).sum(-1, keepdim=True)
        return g_ECD.mul_(w_EC1), g_w_EC1, None, None


def gather_rows(x_TD: torch.Tensor, tokens_EC: torch.Tensor) -> torch.Tensor:
    """Rows x_TD[tokens_EC] as a batch [E, C, D]: the permute of the pad-to-capacity layout
    that brings its own row probabilities (router.choose_by_expert)."""
    return _GatherRows.apply(x_TD, tokens_EC)


def unpermute_rows(y_ECD: torch.Tensor, w_EC1: torch.Tensor, tokens_EC: torch.Tensor, num_tokens: int):
    """`gather_rows`' unpermute: out_TD[tokens_EC[e, c]] += w_EC1[e, c] * y_ECD[e, c], rows
    in (e, c) order, as CPU index_add adds them in the flat layout: one `index_put_` with
    accumulation, which takes the [E, C] index as it is (no flattening views); in reduced
    precision and above FORWARD_SPLIT_BYTES on the CPU the flat path (`_flat_path`,
    `_weighted_index_add`: the same additions in the same order). Padding rows (w = 0) add exactly nothing to a finite sum."""
    return _UnpermuteRows.apply(y_ECD, w_EC1, tokens_EC, num_tokens)


def permute(x_TD: torch.Tensor, probs_TK: torch.Tensor, index: RoutingIndex):
    """Rows of `x_TD` and `probs_TK` in expert-sorted order: (x_ND, probs_N)."""
    return _Permute.apply(x_TD, probs_TK, index.src_pair_N, index.src_token_N, index.padded)


def unpermute(y_ND: torch.Tensor, w_N: torch.Tensor, index: RoutingIndex):
    """Weighted scatter-add of expert outputs back to token order: out_TD."""
    return _Unpermute.apply(y_ND, w_N, index.src_token_N, index.num_tokens)
