"""The MoE layer: router -> dispatcher -> grouped experts -> combine, plus shared experts.

Legend: B sequences, s this rank's sequence shard (after cp and tp), T = B*s local tokens,
D model dim, M expert rows.
With TP the layer takes the sequence-parallel shard x_BsD as it is: the dispatcher moves
those tokens over ep / etp of the folded layout, and the shared experts (tensor-parallel MLP)
gather and reduce-scatter their own tokens over tp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cost_model.specs import ModelSpec

from .comm import CommCounter
from .dispatcher import make_dispatcher
from .experts import GroupedExperts
from .mlp import MLP
from .parallel_dims import ParallelDims
from .router import Router, RouterConfig


@dataclass(frozen=True)
class MoEOutput:
    """Output of one MoE layer on this rank."""

    out_BsD: torch.Tensor
    aux_loss: torch.Tensor  # this rank's share of router losses
    num_dropped: int | torch.Tensor  # dropped pairs on this rank (a device scalar when counted)


class MoELayer(nn.Module):
    """Routed experts sharded over ETP x EP, a replicated router and optional shared experts."""

    def __init__(self, spec: ModelSpec, dims: ParallelDims, counter: CommCounter | None,
                 router_config: RouterConfig, dispatcher: str, kernel_backend: str = "torch"):
        super().__init__()
        E = spec.num_experts
        self.router = Router(spec.hidden_size, E, spec.topk, router_config)
        self.experts = GroupedExperts(E, spec.hidden_size, spec.expert_ffn, spec.swiglu,
                                      dims.ep, dims.ep_rank, dims.etp, dims.etp_rank)
        self.shared = None
        if spec.shared_ffn:
            self.shared = MLP(spec.hidden_size, spec.shared_ffn, spec.swiglu, dims.group("tp"), counter)
        self.dims, self.counter = dims, counter
        self.dispatcher = make_dispatcher(dispatcher, E, dims, counter, kernel_backend,
                                          router_config.capacity_factor)

    def forward(self, x_BsD: torch.Tensor) -> MoEOutput:
        """Route, dispatch, run local experts, combine; add shared experts. A flat x_TD (the
        model's residual stream without tp) gives a flat output."""
        x_TD = x_BsD if x_BsD.dim() == 2 else x_BsD.reshape(-1, x_BsD.shape[-1])
        routing = self.router(x_TD, self.dims, self.counter)
        expert_in_MD, meta = self.dispatcher.dispatch(x_TD, routing)
        expert_out_MD = self.experts(expert_in_MD, meta.rows)
        out_TD = self.dispatcher.combine(expert_out_MD, meta)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return MoEOutput(out_TD.view_as(x_BsD) if x_BsD.dim() == 3 else out_TD, routing.aux_loss,
                         routing.num_dropped)
