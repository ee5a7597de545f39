"""Top-k router: scores, top-k choice, capacity drop, load-balancing and z losses.

Legend: T local tokens, D model dim, E experts, K top-k.

Score functions (Megatron-Core names):
  softmax, pre_softmax=False  top-k on logits, softmax over the K chosen logits (default)
  softmax, pre_softmax=True   softmax over all E, then top-k of those probabilities
  sigmoid                     sigmoid scores, top-k, normalised to sum 1 when K > 1
then the routed weights times `topk_scaling_factor` when set (Megatron's
--moe-router-topk-scaling-factor; DeepSeek-V3's routed_scaling_factor).
Capacity (token dropping): on this rank's T local tokens,
  capacity = ceil(capacity_factor * T * K / E)
and each expert keeps the `capacity` routed pairs with the highest probability ("probs" drop
policy); dropped pairs get index -1. capacity_factor None = dropless.
Auxiliary loss (Switch / Megatron `switch_load_balancing_loss_func`) over the tokens of the
whole global micro-batch, so it equals the single-rank value:
  aux = coeff * E / (T_g^2 * K) * sum_e tokens_e * sum_t scores_te
tokens_e (routed pairs per expert) and T_g are summed over the token group (tp_cp_dp: all
ranks of the pipeline stage, which hold distinct tokens of the micro-batch); each rank
adds its own sum_t scores_te term, so the sum over ranks of the local losses is the global loss.
Z-loss: coeff * sum_t logsumexp(logits_t)^2 / T_g, split the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cost_model.specs import ModelSpec, TrainingSpec

from .comm import CommCounter, all_reduce_
from .parallel_dims import ParallelDims


@dataclass(frozen=True)
class RouterConfig:
    """Routing options (Megatron-LM `--moe-router-*` meanings)."""

    score_function: str = "softmax"  # 'softmax' | 'sigmoid'
    pre_softmax: bool = False  # softmax over all experts before top-k
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 1e-3
    capacity_factor: float | None = None  # None = dropless
    topk_scaling_factor: float | None = None  # routed weights times this; None = 1

    def __post_init__(self):
        if self.score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"score_function={self.score_function!r}: use 'softmax' or 'sigmoid'")

    @classmethod
    def for_model(cls, spec: ModelSpec, training: TrainingSpec) -> RouterConfig:
        """The routing the spec asks for, as Megatron runs it (planner/export.py writes the
        same): a top-1 softmax router takes the softmax before the choice (Megatron refuses
        softmax over a single chosen logit, whose gradient is zero)."""
        softmax = spec.moe_router_score_function == "softmax"
        return cls(score_function=spec.moe_router_score_function,
                   pre_softmax=softmax and spec.topk == 1,
                   capacity_factor=training.moe_expert_capacity_factor,
                   topk_scaling_factor=spec.moe_router_topk_scaling_factor)


@dataclass(frozen=True)
class Routing:
    """One layer's routing decision for the local tokens."""

    probs_TK: torch.Tensor  # weight of each chosen expert (0 where dropped)
    indices_TK: torch.Tensor  # expert id per pair, -1 where dropped by capacity
    aux_loss: torch.Tensor  # this rank's share of the load-balancing + z loss
    num_dropped: int  # dropped pairs on this rank


def expert_capacity(capacity_factor: float, num_tokens: int, topk: int, num_experts: int) -> int:
    """Per-rank capacity: ceil(capacity_factor * local_tokens * topk / num_experts)."""
    return math.ceil(capacity_factor * num_tokens * topk / num_experts)


def drop_by_capacity(probs_TK: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, capacity: int):
    """Keep per expert the `capacity` pairs with the highest probability; others -> index -1."""
    T = probs_TK.shape[0]
    probs_TE = torch.zeros(T, num_experts, dtype=probs_TK.dtype, device=probs_TK.device)
    probs_TE.scatter_(1, indices_TK, probs_TK.detach())
    routed_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, indices_TK, True)
    k = min(capacity, T)
    keep_TE = torch.zeros_like(routed_TE)
    if k > 0:
        # Unrouted entries score -1, below every routed probability (>= 0).
        top_kE = torch.topk(torch.where(routed_TE, probs_TE, -1.0), k, dim=0).indices
        keep_TE.scatter_(0, top_kE, True)
        keep_TE &= routed_TE
    keep_TK = keep_TE.gather(1, indices_TK)
    return (
        probs_TK * keep_TK,
        torch.where(keep_TK, indices_TK, torch.full_like(indices_TK, -1)),
        int((~keep_TK).sum()),
    )


class Router(nn.Module):
    """Linear gate D -> E (replicated, a dense parameter) plus the routing rule above."""

    def __init__(self, hidden_size: int, num_experts: int, topk: int, config: RouterConfig):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.num_experts, self.topk, self.config = num_experts, topk, config
        self._load_sum: torch.Tensor | None = None  # sum of busiest/mean over micro-batches
        self._load_count = 0

    def take_load(self) -> tuple[torch.Tensor | None, int]:
        """(sum, count) of the busiest expert's tokens over the mean, one term per micro-batch
        routed since the last call (global over tp_cp_dp, before capacity dropping); resets."""
        out = (self._load_sum, self._load_count)
        self._load_sum, self._load_count = None, 0
        return out

    def forward(self, x_TD: torch.Tensor, dims: ParallelDims, counter: CommCounter | None) -> Routing:
        """Route the local tokens; statistics for the losses are summed over tp_cp_dp."""
        cfg, E, K = self.config, self.num_experts, self.topk
        T = x_TD.shape[0]
        logits_TE = F.linear(x_TD, self.weight_ED).float()
        if cfg.score_function == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            top_TK, indices_TK = torch.topk(scores_TE, K, dim=1)
            probs_TK = top_TK / top_TK.sum(-1, keepdim=True) if K > 1 else top_TK
            aux_scores_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        elif cfg.pre_softmax:
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TK, indices_TK = torch.topk(scores_TE, K, dim=1)
            aux_scores_TE = scores_TE
        else:
            top_TK, indices_TK = torch.topk(logits_TE, K, dim=1)
            probs_TK = torch.softmax(top_TK, dim=-1)
            aux_scores_TE = torch.softmax(logits_TE, dim=-1)
        if cfg.topk_scaling_factor is not None:
            probs_TK = probs_TK * cfg.topk_scaling_factor

        # Global statistics of the micro-batch over the token group (tp_cp_dp): no gradient.
        token_group = dims.group("tp_cp_dp")
        stats = torch.zeros(E + 1, dtype=torch.float32, device=x_TD.device)
        stats[:E] = torch.bincount(indices_TK.reshape(-1), minlength=E).float()
        stats[E] = T
        all_reduce_(stats, token_group, counter, "tp_cp_dp.router")
        tokens_per_expert_E, num_global = stats[:E], stats[E]
        if torch._C._current_graph_task_id() == -1:  # a forward, not a recompute in backward
            ratio = (tokens_per_expert_E.max() / tokens_per_expert_E.mean().clamp_min(1e-9)).detach()
            self._load_sum = ratio if self._load_sum is None else self._load_sum + ratio
            self._load_count += 1
        aux = x_TD.new_zeros((), dtype=torch.float32)
        if cfg.aux_loss_coeff:
            scale = cfg.aux_loss_coeff * E / (num_global * num_global * K)
            aux = aux + scale * (tokens_per_expert_E * aux_scores_TE.sum(0)).sum()
        if cfg.z_loss_coeff:
            aux = aux + cfg.z_loss_coeff * torch.logsumexp(logits_TE, -1).square().sum() / num_global

        num_dropped = 0
        if cfg.capacity_factor is not None:
            cap = expert_capacity(cfg.capacity_factor, T, K, E)
            probs_TK, indices_TK, num_dropped = drop_by_capacity(probs_TK, indices_TK, E, cap)
        return Routing(probs_TK.to(x_TD.dtype), indices_TK, aux, num_dropped)
