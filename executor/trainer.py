"""One rank's training loop pieces: micro-batches, gradient reduction, clipping, AdamW.

Loss normalisation makes every rank's loss a share of the global loss, so gradients are SUMMED:
  local loss = sum over local micro-batches of (CE sum / (G * S) + router loss share / num_micro)
  dense params (attention, norms, router, shared experts, embeddings) all-reduce over dp_cp
  expert params all-reduce over edp (the ranks holding the same expert shard)
Global gradient norm: dense params are replicated after the reduction, so their squares count
once; expert shards are distinct over ETP x EP (the tp_ep group) and summed there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cost_model.specs import ModelSpec, TrainingSpec

from .comm import CommCounter, all_reduce_
from .data import BatchOrder
from .model import MoETransformer
from .parallel_dims import ParallelDims
from .router import RouterConfig


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and clipping settings."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    clip_grad: float = 1.0  # global-norm clip; 0 disables


@dataclass(frozen=True)
class StepResult:
    """Global (all-rank) numbers of one optimizer step."""

    step: int
    loss: float  # language-model cross-entropy, mean over the global batch
    aux_loss: float  # router losses (load balancing + z), mean over micro-batches
    num_dropped: int  # dropped (token, expert) pairs over all ranks
    grad_norm: float  # global norm before clipping
    time_s: float
    grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _bucket_reduce(params: list[torch.nn.Parameter], group, counter, key) -> None:
    """Sum the gradients of `params` over `group` in one flat all-reduce."""
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_(flat, group, counter, key)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


class Trainer:
    """Model + optimizer + data of one rank for one mapping."""

    def __init__(self, spec: ModelSpec, training: TrainingSpec, dims: ParallelDims, tokens,
                 seed: int = 0, counter: CommCounter | None = None,
                 router_config: RouterConfig | None = None, optim: OptimConfig | None = None,
                 kernel_backend: str = "torch", autocast_dtype: torch.dtype | None = None):
        m = dims.mapping
        self.spec, self.training, self.dims, self.counter = spec, training, dims, counter
        self.optim_config = optim or OptimConfig()
        if router_config is None:
            router_config = RouterConfig(capacity_factor=training.moe_expert_capacity_factor)
        self.model = MoETransformer(spec, dims, counter, router_config, m.dispatcher,
                                    kernel_backend, m.recompute).to(dims.device)
        self.model.init_weights(seed)
        self.expert_params = [p for p in self.model.parameters() if getattr(p, "is_expert", False)]
        self.dense_params = [p for p in self.model.parameters() if not getattr(p, "is_expert", False)]
        oc = self.optim_config
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=oc.lr, betas=oc.betas,
                                           weight_decay=oc.weight_decay, eps=oc.eps)
        self.order = BatchOrder(tokens, training.seq_length, training.global_batch_size, seed)
        self.mbs = m.micro_batch_size
        self.num_micro = training.global_batch_size // (self.mbs * dims.dp)
        assert self.num_micro * self.mbs * dims.dp == training.global_batch_size
        self.autocast_dtype = autocast_dtype

    def reduce_gradients(self) -> None:
        """Sum dense gradients over dp_cp and expert gradients over edp."""
        _bucket_reduce(self.dense_params, self.dims.group("dp_cp"), self.counter, "dp_cp")
        _bucket_reduce(self.expert_params, self.dims.group("edp"), self.counter, "edp")

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients (see module docstring)."""
        dense = sum((p.grad.float().pow(2).sum() for p in self.dense_params), torch.zeros((), device=self.dims.device))
        expert = sum((p.grad.float().pow(2).sum() for p in self.expert_params), torch.zeros((), device=self.dims.device))
        expert = all_reduce_(expert.reshape(1), self.dims.group("tp_ep"), self.counter, "tp_ep.grad_norm")[0]
        return (dense + expert).sqrt()

    def step(self, step: int, keep_grads: bool = False) -> StepResult:
        """One optimizer step on global batch `step` (0-based)."""
        t0 = time.perf_counter()
        dev, S, G = self.dims.device, self.training.seq_length, self.training.global_batch_size
        totals = torch.zeros(3, dtype=torch.float64, device=dev)  # ce sum, aux, dropped
        for micro in range(self.num_micro):
            x, y = self.order.micro_batch(step, micro, self.mbs, self.dims.dp, self.dims.dp_rank)
            with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                ce_sum, aux, dropped = self.model(x.to(dev), y.to(dev))
            loss = ce_sum / (G * S) + aux / self.num_micro
            loss.backward()
            totals += torch.tensor([ce_sum.item(), aux.item(), dropped], dtype=torch.float64, device=dev)
        self.reduce_gradients()
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()} if keep_grads else None
        norm = self.grad_norm()
        clip = self.optim_config.clip_grad
        if clip > 0:
            scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
            for p in self.model.parameters():
                p.grad.mul_(scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_reduce_(totals, self.dims.group("dp_cp"), None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return StepResult(
            step=step,
            loss=float(totals[0]) / (G * S),
            aux_loss=float(totals[1]) / self.num_micro,
            num_dropped=int(totals[2]),
            grad_norm=float(norm),
            time_s=time.perf_counter() - t0,
            grads=grads,
        )
