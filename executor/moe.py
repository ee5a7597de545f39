"""The MoE layer: router -> dispatcher -> grouped experts -> combine, plus shared experts.

Legend: B sequences, s this rank's sequence shard (after cp and tp), T = B*s local tokens,
D model dim, M expert rows.
With TP the layer takes the sequence-parallel shard x_BsD as it is: the dispatcher moves
those tokens over ep / etp of the folded layout, and the shared experts (tensor-parallel MLP)
gather and reduce-scatter their own tokens over tp.

Overlap (issue 12, `overlap_a2a`, on by default since it cannot change a number): with the
all-to-all dispatcher, ep > 1 and shared experts, the shared experts run while the routed
tokens travel over EP (dispatcher.dispatch_start .. dispatch_finish; the dispatch's index maps
too), and in the backward their gradient runs while the tokens' gradient travels back
(comm.all_to_all_v_start). It moves work, not numbers: the same ops on the same inputs, and
the backward accumulates the gradient of x_TD in the same order as without it (shared
experts, then the dispatch, then the router: autograd runs ready nodes newest first).
tests/executor/test_exec_overlap.py checks bit-identical losses, gradients and parameters
(dropless, capacity, full recompute, tp 2 x ep 2, etp 2 x ep 2) and the order of events.
Everywhere else (ep = 1, the all-gather dispatcher, no shared experts) the switch changes
nothing: the layer runs the blocking path. Not overlapped: the combine's all-to-all (nothing
of the layer is left that does not need its rows; splitting the shared MLP's up and down
projections across dispatch and combine, as Megatron-Core's shared-expert overlap does, would
cover it, but needs an MLP split in mlp.py), the count exchange, the ETP gather and
reduce-scatter, the all-gather dispatcher, and one micro-batch's all-to-all against another
micro-batch's compute (Megatron's 1F1B all-to-all overlap needs a schedule that runs the
forward of one micro-batch inside the backward of another, layer by layer).
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
    """Routed experts sharded over ETP x EP, a replicated router and optional shared experts.
    `overlap_a2a` (default True): run the shared experts while the tokens are dispatched."""

    overlap_a2a = True

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
        routing = self.router(x_TD, self.dims, self.counter, by_expert=self.dispatcher.takes_expert_choice)
        overlap = self.overlap_a2a and self.shared is not None and self.dispatcher.overlaps_dispatch
        if overlap:
            started = self.dispatcher.dispatch_start(x_TD, routing)
            shared_TD = self.shared(x_TD)  # while the tokens travel
            expert_in_MD, meta = self.dispatcher.dispatch_finish(started)
        else:
            expert_in_MD, meta = self.dispatcher.dispatch(x_TD, routing)
        expert_out_MD = self.experts(expert_in_MD, meta.rows)
        out_TD = self.dispatcher.combine(expert_out_MD, meta)
        if self.shared is not None:
            out_TD = out_TD + (shared_TD if overlap else self.shared(x_TD))
        return MoEOutput(out_TD.view_as(x_BsD) if x_BsD.dim() == 3 else out_TD, routing.aux_loss,
                         routing.num_dropped)


def set_a2a_overlap(modules, on: bool) -> int:
    """Turn the all-to-all overlap of every MoELayer inside `modules` (an iterable of
    nn.Module) on or off; returns the number of layers. Safe between steps."""
    layers = [m for mod in modules for m in mod.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.overlap_a2a = on
    return len(layers)
