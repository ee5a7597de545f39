"""Top-k router: scores, top-k choice, capacity drop, load-balancing and z losses.

Legend: T local tokens, D model dim, E experts, K top-k.

Score functions (Megatron-Core names):
  softmax, pre_softmax=False  top-k on logits, softmax over the K chosen logits (default)
  softmax, pre_softmax=True   softmax over all E, then top-k of those probabilities
  sigmoid                     sigmoid scores, top-k, normalised to sum 1 when K > 1
                              (unless `sigmoid_normalize` is false)
then the routed weights times `topk_scaling_factor` when set (Megatron's
--moe-router-topk-scaling-factor; DeepSeek-V3's routed_scaling_factor).
Expert bias (aux-loss-free balancing, DeepSeek-V3's e_score_correction_bias): the CHOICE of
experts uses scores + bias_E, the weights use the scores alone; after each optimizer step
bias_e += rate * sign(mean load - load_e) over the step's tokens (Megatron's update).
Group-limited routing (moe_router_num_groups G, moe_router_group_topk g): experts form G
equal groups, a group scores the sum of its best `group_score_topk` choice scores, and each
token chooses its top-k among the experts of its best g groups only.
Capacity (token dropping): on this rank's T local tokens,
  capacity = ceil(capacity_factor * T * K / E)
and each expert keeps the `capacity` routed pairs with the highest probability ("probs" drop
policy); dropped pairs get probability 0 and count in `num_dropped`. capacity_factor None =
dropless. Two forms of the same rule (one `topk` over the tokens of each expert's column of
a [T, E] score matrix, unrouted entries -1, in both):
  pairs      (`drop_by_capacity`) dropped pairs get index -1 in `indices_TK`: what the
             dispatchers that move pairs take (all-to-all, all-gather, the Triton kernels)
  by expert  (`choose_by_expert`, `Routing.kept`) the top-k's indices ARE the
             pad-to-capacity layout (expert e's rows e*C .. e*C+C-1 hold its C best tokens)
             and its values clamped at 0 the rows' probabilities (a padding row, an unrouted
             token in an expert's top C, gets 0 and adds exactly nothing): the local
             dispatcher's input, no drop mask and no sort (issue 12: a capacity layer
             pass now costs 2 ops more than a dropless one, where it cost about 25 more)
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
from torch import nn

from cost_model.specs import ModelSpec, TrainingSpec

from .arch import ArchOptions
from .comm import CommCounter, all_reduce_
from .linear import linear
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
    sigmoid_normalize: bool = True  # sigmoid: normalise the top-k weights to sum 1 (K > 1)
    expert_bias: bool = False  # choice on scores + a per-expert bias (aux-loss-free)
    expert_bias_update_rate: float = 1e-3
    num_groups: int | None = None  # group-limited routing: expert groups; None = no limit
    group_topk: int | None = None  # groups each token may reach
    group_score_topk: int | None = None  # best experts summed per group; None = K // group_topk

    def __post_init__(self):
        if self.score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"score_function={self.score_function!r}: use 'softmax' or 'sigmoid'")

    @classmethod
    def for_model(cls, spec: ModelSpec, training: TrainingSpec,
                  arch: ArchOptions | None = None) -> RouterConfig:
        """The routing the spec asks for, as Megatron runs it (planner/export.py writes the
        same): a top-1 softmax router takes the softmax before the choice (Megatron refuses
        softmax over a single chosen logit, whose gradient is zero). `arch` (a checkpoint's
        options) overrides the softmax order and the sigmoid normalisation."""
        arch = arch or ArchOptions()
        softmax = spec.moe_router_score_function == "softmax"
        pre = softmax and spec.topk == 1
        if softmax and arch.router_pre_softmax is not None:
            pre = arch.router_pre_softmax
        return cls(score_function=spec.moe_router_score_function,
                   pre_softmax=pre,
                   capacity_factor=training.moe_expert_capacity_factor,
                   topk_scaling_factor=spec.moe_router_topk_scaling_factor,
                   sigmoid_normalize=arch.sigmoid_normalize,
                   expert_bias=spec.moe_router_enable_expert_bias,
                   expert_bias_update_rate=arch.expert_bias_update_rate,
                   num_groups=spec.moe_router_num_groups,
                   group_topk=spec.moe_router_group_topk,
                   group_score_topk=arch.group_score_topk)


@dataclass(frozen=True)
class Routing:
    """One layer's routing decision for the local tokens."""

    probs_TK: torch.Tensor  # weight of each chosen expert (0 where dropped, unless `kept`)
    indices_TK: torch.Tensor  # expert id per pair, -1 where dropped by capacity (unless `kept`)
    aux_loss: torch.Tensor  # this rank's share of the load-balancing + z loss
    num_dropped: int | torch.Tensor  # dropped pairs on this rank (a device scalar: no host read)
    # the capacity rule in the pad-to-capacity layout (Router.forward(by_expert=True)); the
    # pairs above are then every routed pair, before the drop
    kept: ExpertChoice | None = None


@dataclass(frozen=True)
class ExpertChoice:
    """Megatron's drop policy as rows: expert e's C rows hold its C routed tokens of highest
    probability, best first; a row past an expert's routed tokens (a padding row) holds an
    unrouted token with probability 0."""

    tokens_EC: torch.Tensor  # int64 token of each row
    probs_EC1: torch.Tensor  # probability of each row (0: padding), differentiable
    num_dropped: torch.Tensor  # routed pairs in no row (device scalar)

    @property
    def capacity(self) -> int:
        """C, rows per expert (min of the capacity and T)."""
        return self.tokens_EC.shape[1]


def load_imbalance(tokens_ME: torch.Tensor) -> torch.Tensor:
    """Busiest expert's pairs over the mean, per row of `tokens_ME` (one row per layer and
    micro-batch): what training.moe_expert_load_imbalance asks for."""
    return tokens_ME.amax(-1) / tokens_ME.mean(-1).clamp_min(1e-9)


def expert_capacity(capacity_factor: float, num_tokens: int, topk: int, num_experts: int) -> int:
    """Per-rank capacity: ceil(capacity_factor * local_tokens * topk / num_experts)."""
    return math.ceil(capacity_factor * num_tokens * topk / num_experts)


def _top_by_expert(probs_TK: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, k: int):
    """(values_Ek, tokens_Ek): each expert's k routed tokens of highest probability, best
    first, from one topk over the [T, E] scores (unrouted entries -1, below every routed
    probability >= 0, so they fill an expert's rows only past its routed tokens). The one
    home of the capacity rule: both forms (module docstring) make this same call."""
    scores_TE = probs_TK.new_full((probs_TK.shape[0], num_experts), -1.0).scatter_(1, indices_TK, probs_TK)
    return torch.topk(scores_TE.t(), k, dim=1)


def drop_by_capacity(probs_TK: torch.Tensor, indices_TK: torch.Tensor, num_experts: int, capacity: int):
    """Keep per expert the `capacity` pairs with the highest probability; others -> index -1.
    Returns (kept probabilities, indices with -1 where dropped, number of dropped pairs)."""
    T = probs_TK.shape[0]
    k = min(capacity, T)
    with torch.no_grad():
        # The drop mask is only read back at routed entries, so an unrouted entry in an
        # expert's top k is harmless.
        drop_ET = torch.ones((num_experts, T), dtype=torch.bool, device=probs_TK.device)
        if k > 0:
            drop_ET.scatter_(1, _top_by_expert(probs_TK, indices_TK, num_experts, k).indices, False)
        drop_TK = drop_ET.t().gather(1, indices_TK)
    return probs_TK.masked_fill(drop_TK, 0.0), indices_TK.masked_fill(drop_TK, -1), drop_TK.sum()


class _ChooseByExpert(torch.autograd.Function):
    """`choose_by_expert`'s rows and probabilities; the gradient of row (e, j)'s probability
    goes to its pair (tokens_EC[e, j], e), padding rows' and dropped pairs' nowhere:
        g_ET = zeros.scatter_(1, tokens_EC, g_EC),  g_probs_TK = g_ET^T.gather(1, indices_TK)
    (an unrouted entry of g_ET, a padding row's, is never gathered)."""

    @staticmethod
    def forward(ctx, probs_TK, indices_TK, num_experts: int, capacity: int):
        T, K = probs_TK.shape
        values_EC, tokens_EC = _top_by_expert(probs_TK, indices_TK, num_experts, capacity)
        num_dropped = (values_EC < 0).sum()  # rows with no routed pair
        if T * K != num_experts * capacity:  # dropped = T*K - kept = T*K - (E*C - padding rows)
            num_dropped = num_dropped + (T * K - num_experts * capacity)
        ctx.save_for_backward(tokens_EC, indices_TK)
        ctx.mark_non_differentiable(tokens_EC, num_dropped)
        return values_EC.clamp_(min=0).unsqueeze(-1), tokens_EC, num_dropped

    @staticmethod
    def backward(ctx, g_EC1, _g_tokens, _g_dropped):
        tokens_EC, indices_TK = ctx.saved_tensors
        g_ET = g_EC1.new_zeros(tokens_EC.shape[0], indices_TK.shape[0])
        g_ET.scatter_(1, tokens_EC, g_EC1.squeeze(-1))
        return g_ET.t().gather(1, indices_TK), None, None, None


def choose_by_expert(probs_TK: torch.Tensor, indices_TK: torch.Tensor, num_experts: int,
                     capacity: int, dtype: torch.dtype | None = None) -> ExpertChoice:
    """The capacity rule in the pad-to-capacity layout (module docstring): min(C, T) rows per
    expert; the kept set is `drop_by_capacity`'s (the same topk call). `dtype`: of the rows'
    probabilities (default the pairs')."""
    C = min(capacity, probs_TK.shape[0])
    probs_EC1, tokens_EC, num_dropped = _ChooseByExpert.apply(probs_TK, indices_TK, num_experts, C)
    return ExpertChoice(tokens_EC, probs_EC1 if dtype is None else probs_EC1.to(dtype), num_dropped)


class _TopKSoftmaxLoss(torch.autograd.Function):
    """The default routing (softmax over the K chosen logits) and its losses as one op with a
    hand-written backward (issue 12: 11 backward ops where autograd's graph takes about 25).

    Forward, the formulas of `Router.forward`:
        probs_TK = softmax(logits_TK[chosen]) * topk scaling
        aux = dot(sum_T softmax(logits_TE), tokens_E * aux_scale) + z_scale * dot(lse_T, lse_T)
    Backward (s = softmax(logits_TE), p = the unscaled probs, ga = d aux):
        dlogits_TE = softmax_bwd(ga * aux_scale * tokens_E, s)          load balancing
                   + s * (2 * z_scale * ga * lse_T)                      z-loss
                   + scatter of softmax_bwd(dprobs_TK * scaling, p)      the chosen logits
    """

    @staticmethod
    def forward(ctx, logits_TE, indices_TK, chosen_TK, tokens_E, aux_scale: float, z_scale: float,
                prob_scale: float | None):
        """`chosen_TK`: the chosen logits (the top-k's values) or None (gathered here)."""
        if chosen_TK is None:
            chosen_TK = logits_TE.gather(1, indices_TK)
        probs_TK = torch.softmax(chosen_TK, dim=-1)
        scores_TE = torch.softmax(logits_TE, dim=-1) if aux_scale or z_scale else None
        aux = lse_T = weight_E = None
        if aux_scale:
            weight_E = tokens_E * aux_scale  # d aux / d sum_T scores
            aux = torch.dot(scores_TE.sum(0), weight_E)
        if z_scale:
            lse_T = torch.logsumexp(logits_TE, -1)
            zz = torch.dot(lse_T, lse_T)
            aux = zz * z_scale if aux is None else torch.add(aux, zz, alpha=z_scale)
        if aux is None:
            aux = logits_TE.new_zeros(())
        # Without scaling the probabilities are an output, which autograd saves with a detach
        # each way; their input is saved instead and the softmax recomputed (one op for two).
        ctx.save_for_backward(chosen_TK if prob_scale is None else probs_TK, indices_TK, scores_TE, lse_T, weight_E)
        ctx.scales, ctx.shape_TE = (aux_scale, z_scale, prob_scale), logits_TE.shape
        return (probs_TK if prob_scale is None else probs_TK * prob_scale), aux

    @staticmethod
    def backward(ctx, g_probs_TK, g_aux):
        probs_TK, indices_TK, scores_TE, lse_T, weight_E = ctx.saved_tensors
        aux_scale, z_scale, prob_scale = ctx.scales
        if prob_scale is None and g_probs_TK is not None:
            probs_TK = torch.softmax(probs_TK, dim=-1)  # saved: the chosen logits
        g_TE = None
        if aux_scale:
            g_E = weight_E * g_aux
            g_TE = torch._softmax_backward_data(g_E.expand_as(scores_TE), scores_TE, -1, scores_TE.dtype)
        if z_scale:  # + 2 z_scale * ga * lse_t * s_te, the multiply-add in one op
            c_T1 = (lse_T * g_aux)[:, None]
            if g_TE is None:
                g_TE = scores_TE * c_T1 * (2.0 * z_scale)
            else:
                g_TE = g_TE.addcmul_(scores_TE, c_T1, value=2.0 * z_scale)
        if g_TE is None:
            g_TE = probs_TK.new_zeros(ctx.shape_TE)
        if g_probs_TK is not None:
            if prob_scale is not None:
                g_probs_TK = g_probs_TK * prob_scale
            g_top_TK = torch._softmax_backward_data(g_probs_TK, probs_TK, -1, probs_TK.dtype)
            g_TE = g_TE.scatter_add_(1, indices_TK, g_top_TK)
        return g_TE, None, None, None, None, None, None


class Router(nn.Module):
    """Linear gate D -> E (replicated, a dense parameter) plus the routing rule above."""

    def __init__(self, hidden_size: int, num_experts: int, topk: int, config: RouterConfig):
        super().__init__()
        self.weight_ED = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.num_experts, self.topk, self.config = num_experts, topk, config
        if config.expert_bias:  # a buffer: changed by update_expert_bias, not by AdamW
            self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))
        # routed pairs per expert (global), one [E] tensor per forward; emptied by take_loads,
        # which the trainer calls once per step
        self._loads: list[torch.Tensor] = []
        self._tokens_E: torch.Tensor | None = None  # routed pairs per expert this step (global)

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """After an optimizer step: bias_e += rate * sign(mean load - load_e) over the step's
        routed pairs (global over the stage's tokens); resets the count."""
        tokens_E, self._tokens_E = self._tokens_E, None
        if not self.config.expert_bias or tokens_E is None:
            return
        self.expert_bias_E += self.config.expert_bias_update_rate * torch.sign(tokens_E.mean() - tokens_E)

    def _choose(self, scores_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert ids [T, K] chosen on the scores (plus bias), within the allowed groups, and
        the chosen scores (the top-k's values) where the choice is on the scores alone (else
        None)."""
        cfg, E, K = self.config, self.num_experts, self.topk
        choice_TE = scores_TE + self.expert_bias_E if cfg.expert_bias else scores_TE
        if cfg.num_groups:
            G, n = cfg.num_groups, cfg.group_score_topk or K // cfg.group_topk
            group_TG = choice_TE.view(-1, G, E // G).topk(n, dim=-1).values.sum(-1)
            best_Tg = group_TG.topk(cfg.group_topk, dim=-1).indices
            allowed_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_Tg, True)
            allowed_TE = allowed_TG.repeat_interleave(E // G, dim=1)
            choice_TE = choice_TE.masked_fill(~allowed_TE, float("-inf"))
        values_TK, indices_TK = torch.topk(choice_TE, K, dim=1)
        return indices_TK, values_TK if choice_TE is scores_TE else None

    def take_loads(self) -> list[torch.Tensor]:
        """The routed pairs per expert ([E] each, global over tp_cp_dp, before capacity
        dropping), one per micro-batch routed since the last call; resets. The trainer takes
        every router's at once per step (`load_imbalance`)."""
        loads, self._loads = self._loads, []
        return loads

    def _scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Scores the choice is made on (sigmoid, or softmax before the top-k)."""
        if self.config.score_function == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def _probs_and_loss(self, logits_TE, scores_TE, indices_TK, tokens_E, aux_scale: float, z_scale: float):
        """(probs_TK, aux loss) through autograd for the score functions other than the
        default (sigmoid, softmax before the top-k)."""
        cfg, K = self.config, self.topk
        top_TK = scores_TE.gather(1, indices_TK)
        if cfg.score_function == "sigmoid":
            normalize = K > 1 and cfg.sigmoid_normalize
            probs_TK = top_TK / top_TK.sum(-1, keepdim=True) if normalize else top_TK
            aux_scores_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if cfg.aux_loss_coeff else None
        else:
            probs_TK, aux_scores_TE = top_TK, scores_TE
        if cfg.topk_scaling_factor is not None:
            probs_TK = probs_TK * cfg.topk_scaling_factor
        aux = None
        if cfg.aux_loss_coeff:
            aux = torch.dot(aux_scores_TE.sum(0), tokens_E * aux_scale)
        if cfg.z_loss_coeff:
            lse_T = torch.logsumexp(logits_TE, -1)
            z = torch.dot(lse_T, lse_T) * z_scale
            aux = z if aux is None else aux + z
        if aux is None:
            aux = logits_TE.new_zeros(())
        return probs_TK, aux

    def forward(self, x_TD: torch.Tensor, dims: ParallelDims, counter: CommCounter | None,
                by_expert: bool = False) -> Routing:
        """Route the local tokens; statistics for the losses are summed over tp_cp_dp. With a
        capacity, `by_expert` gives the drop as `Routing.kept` (the pad-to-capacity rows the
        local dispatcher takes), else as index -1 in the pairs.

        Few ops by design (issue 12): the gate is `linear.linear`, the choice runs without
        autograd, T_g is a Python number (every rank of the token group holds the same number
        T of the micro-batch's tokens: equal sequence-parallel shards, cp chunks and
        micro-batches), so the loss scales are Python floats, each loss is one dot product,
        and the default route (softmax after the top-k) computes probabilities and losses in
        one Function with a hand-written backward (`_TopKSoftmaxLoss`); the other score
        functions go through autograd (`_probs_and_loss`)."""
        cfg, E, K = self.config, self.num_experts, self.topk
        T = x_TD.shape[0]
        token_group = dims.group("tp_cp_dp")
        num_global = T * token_group.size
        aux_scale = cfg.aux_loss_coeff * E / (num_global * num_global * K)
        z_scale = cfg.z_loss_coeff / num_global
        logits_TE = linear(x_TD, self.weight_ED).float()
        fused = cfg.score_function == "softmax" and not cfg.pre_softmax
        scores_TE = None if fused else self._scores(logits_TE)
        with torch.no_grad():
            indices_TK, chosen_TK = self._choose(logits_TE if fused else scores_TE)
        # Global statistics of the micro-batch over the token group (tp_cp_dp): no gradient.
        # histc: float counts with a static shape (unlike bincount), exact below 2^24 pairs
        tokens_per_expert_E = torch.histc(indices_TK.float(), bins=E, min=0, max=E)
        all_reduce_(tokens_per_expert_E, token_group, counter, "tp_cp_dp.router")
        if torch._C._current_graph_task_id() == -1:  # a forward, not a recompute in backward
            if cfg.expert_bias:
                self._tokens_E = tokens_per_expert_E if self._tokens_E is None else self._tokens_E + tokens_per_expert_E
            self._loads.append(tokens_per_expert_E)
        if fused:  # the default: one op with its own backward
            probs_TK, aux = _TopKSoftmaxLoss.apply(logits_TE, indices_TK, chosen_TK, tokens_per_expert_E,
                                                   aux_scale, z_scale, cfg.topk_scaling_factor)
        else:
            probs_TK, aux = self._probs_and_loss(logits_TE, scores_TE, indices_TK, tokens_per_expert_E,
                                                 aux_scale, z_scale)

        if cfg.capacity_factor is None:
            return Routing(probs_TK.to(x_TD.dtype), indices_TK, aux, 0)
        cap = expert_capacity(cfg.capacity_factor, T, K, E)
        if by_expert:
            kept = choose_by_expert(probs_TK, indices_TK, E, cap, x_TD.dtype)
            return Routing(probs_TK.to(x_TD.dtype), indices_TK, aux, kept.num_dropped, kept)
        probs_TK, indices_TK, num_dropped = drop_by_capacity(probs_TK, indices_TK, E, cap)
        return Routing(probs_TK.to(x_TD.dtype), indices_TK, aux, num_dropped)
