"""Tensor and sequence parallelism (Megatron-style) over the `tp` group.

Legend: B sequences, S sequence length (this rank's, after context parallelism), s = S / tp the
sequence-parallel shard, T tokens, D model dim, V vocabulary, Vl = V / tp local vocabulary.

Sequence parallelism is always on with TP (the config refuses sequence_parallel=false, tp>1):
between layers each tp rank holds x_BsD, positions [tp_rank * s, (tp_rank + 1) * s) of its
sequence. Attention and dense MLPs all-gather to the full sequence, run column-parallel
(output features split) then row-parallel (input features split) linears, and reduce-scatter
the partial sums back to x_BsD:
    x_BsD -> all-gather(tp) -> column-parallel -> local heads / FFN shard -> row-parallel
          -> reduce-scatter(tp) -> x_BsD
The MoE layer consumes x_BsD directly (B*s local tokens), so the attention -> MoE transition
needs no communication. Vocab-parallel embedding: rank r owns rows [r*Vl, (r+1)*Vl) and the
partial lookups are reduce-scattered over the sequence. Output layer and loss: all-gather x,
column-parallel logits [B, S, Vl], vocab-parallel cross-entropy (max, sum-exp and target logit
all-reduced over tp): every tp rank gets the full per-token loss.

Sharded parameters carry `tp_dim` (split dimension) and `tp_chunks` (fused blocks split one by
one, e.g. 2 for SwiGLU's [gate; up]); init draws the full tensor and keeps `shard(...)` of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .comm import CommCounter, all_gather_v, all_reduce_, reduce_scatter_v
from .linear import accumulation_target
from .parallel_dims import Group


def mark_tp(p: nn.Parameter, dim: int, chunks: int, group: Group) -> nn.Parameter:
    """Tag `p` as this rank's tp shard along `dim` (`chunks` fused blocks)."""
    p.tp_dim, p.tp_chunks, p.tp_size, p.tp_rank = dim, chunks, group.size, group.index
    return p


def shard(full: torch.Tensor, dim: int, chunks: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s slice of each of `chunks` equal blocks of `full` along `dim`, concatenated.

    Example: full rows [g0 g1 g2 g3 | u0 u1 u2 u3] (chunks 2), size 2, rank 1 -> [g2 g3 u2 u3].
    """
    return torch.cat([c.chunk(size, dim)[rank] for c in full.chunk(chunks, dim)], dim)


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Unsharded shape of a (possibly tp-sharded) parameter."""
    shape = list(p.shape)
    if hasattr(p, "tp_dim"):
        shape[p.tp_dim] *= p.tp_size
    return tuple(shape)


def shard_of_full(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the unsharded tensor `full` of parameter `p` (identity if unsharded)."""
    if not hasattr(p, "tp_dim"):
        return full
    return shard(full, p.tp_dim, p.tp_chunks, p.tp_rank, p.tp_size)


def sp_gather(x_BsD: torch.Tensor, group: Group, counter: CommCounter | None) -> torch.Tensor:
    """All-gather the sequence shards over tp: x_BSD (backward reduce-scatters)."""
    if group.size == 1:
        return x_BsD
    s = x_BsD.shape[1]
    x_SBD = all_gather_v(x_BsD.transpose(0, 1), [s] * group.size, group, counter, "tp")
    return x_SBD.transpose(0, 1)


def sp_scatter(x_BSD: torch.Tensor, group: Group, counter: CommCounter | None) -> torch.Tensor:
    """Sum partial x_BSD over tp and keep this rank's sequence shard x_BsD."""
    if group.size == 1:
        return x_BSD
    s = x_BSD.shape[1] // group.size
    x_sBD = reduce_scatter_v(x_BSD.transpose(0, 1), [s] * group.size, group, counter, "tp")
    return x_sBD.transpose(0, 1)


def token_gather(x_TD: torch.Tensor, group: Group, counter: CommCounter | None) -> torch.Tensor:
    """All-gather token rows over tp (for per-token blocks: MLPs, shared experts)."""
    return all_gather_v(x_TD, [x_TD.shape[0]] * group.size, group, counter, "tp")


def token_scatter(x_TD: torch.Tensor, group: Group, counter: CommCounter | None) -> torch.Tensor:
    """Reduce-scatter token rows over tp (inverse of token_gather)."""
    return reduce_scatter_v(x_TD, [x_TD.shape[0] // group.size] * group.size, group, counter, "tp")


class _EmbeddingFunction(torch.autograd.Function):
    """Rows of the table for flat tokens, whose backward adds the gradient rows into the
    optimizer's gradient buffer with one `index_add_` (gradient-accumulation fusion, linear.py)
    where autograd would run the embedding backward and accumulate its output (two ops)."""

    @staticmethod
    def forward(ctx, tokens_T, weight_VD, wgrad_VD):
        ctx.save_for_backward(tokens_T)
        ctx.wgrad_VD = wgrad_VD
        return F.embedding(tokens_T, weight_VD)

    @staticmethod
    def backward(ctx, g_TD):
        (tokens_T,) = ctx.saved_tensors
        ctx.wgrad_VD.index_add_(0, tokens_T, g_TD)
        return None, None, None


class VocabParallelEmbedding(nn.Module):
    """Embedding rows [tp_rank * Vl, ...) on each tp rank; output is the sequence shard x_BsD."""

    def __init__(self, vocab_size: int, hidden_size: int, group: Group, counter: CommCounter | None):
        super().__init__()
        if vocab_size % group.size:
            raise ValueError(f"tp={group.size} does not divide vocab_size={vocab_size}")
        self.num_local = vocab_size // group.size
        self.start = group.index * self.num_local
        self.weight = mark_tp(nn.Parameter(torch.empty(self.num_local, hidden_size)), 0, 1, group)
        self.group, self.counter = group, counter

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            wgrad_VD = accumulation_target([self.weight]) if tokens_BS.dim() == 1 else None
            if wgrad_VD is not None and wgrad_VD.dtype == self.weight.dtype:
                return _EmbeddingFunction.apply(tokens_BS, self.weight, wgrad_VD)
            return F.embedding(tokens_BS, self.weight)
        local_BS = tokens_BS - self.start
        mine_BS = (local_BS >= 0) & (local_BS < self.num_local)
        x_BSD = F.embedding(local_BS.clamp(0, self.num_local - 1), self.weight)
        x_BSD = x_BSD * mine_BS.unsqueeze(-1).to(x_BSD.dtype)
        return sp_scatter(x_BSD, self.group, self.counter)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of logits split over the vocabulary (Megatron's formulation)."""

    @staticmethod
    def forward(ctx, logits_TVl, targets_T, start, group, counter):
        logits_TVl = logits_TVl.float()
        max_T = logits_TVl.max(-1).values
        if group.size > 1:
            dist.all_reduce(max_T, op=dist.ReduceOp.MAX, group=group.pg)
        shifted_TVl = logits_TVl - max_T[:, None]
        local_T = targets_T - start
        mine_T = (local_T >= 0) & (local_T < logits_TVl.shape[1])
        idx_T = local_T.clamp(0, logits_TVl.shape[1] - 1)
        exp_TVl = shifted_TVl.exp()
        sums_2T = torch.stack([exp_TVl.sum(-1), shifted_TVl.gather(1, idx_T[:, None])[:, 0] * mine_T])
        all_reduce_(sums_2T, group, counter, "tp.cross_entropy")
        ctx.save_for_backward(exp_TVl / sums_2T[0][:, None], idx_T, mine_T)
        return sums_2T[0].log() - sums_2T[1]

    @staticmethod
    def backward(ctx, g_T):
        softmax_TVl, idx_T, mine_T = ctx.saved_tensors
        grad_TVl = softmax_TVl.clone()
        grad_TVl.scatter_add_(1, idx_T[:, None], -mine_T[:, None].to(grad_TVl.dtype))
        return grad_TVl * g_T[:, None], None, None, None, None


def vocab_parallel_cross_entropy(logits_TVl: torch.Tensor, targets_T: torch.Tensor, group: Group,
                                 counter: CommCounter | None = None, reduction: str = "none") -> torch.Tensor:
    """Per-token loss [T] (fp32) from this rank's vocabulary slice of the logits; their sum
    with reduction="sum" (without tp the loss kernel's own sum: no separate reduction op)."""
    if group.size == 1:
        return F.cross_entropy(logits_TVl.float(), targets_T, reduction=reduction)
    start = group.index * logits_TVl.shape[1]
    ce_T = _VocabParallelCE.apply(logits_TVl, targets_T, start, group, counter)
    return ce_T.sum() if reduction == "sum" else ce_T
