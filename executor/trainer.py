"""One rank's training loop pieces: micro-batches, gradient reduction, clipping, AdamW.

Loss normalisation makes every rank's loss a share of the global loss, so gradients are SUMMED:
  local loss = sum over local micro-batches of (CE sum / (G * S) + router loss share / num_micro)
  (the CE of a token is replicated over tp, its router share is not)
  tp-sharded dense params (attention, MLPs, shared experts, embedding, output) all-reduce
    over dp_cp: the tp collectives already summed the contributions of the tp ranks
  replicated dense params (norms, router) all-reduce over tp_cp_dp: with sequence parallelism
    every tp rank saw different tokens
  expert params all-reduce over edp (the ranks holding the same expert shard)
With the distributed optimizer (the default) the same sums are reduce-scatters over the same
groups and AdamW runs on the shards (optimizer.py); a bf16 run then keeps bf16 parameters with
fp32 main grads and masters (Megatron's mixed precision) instead of autocast.
The host reads the device once per step (all StepStats numbers in one tensor); the forward
and backward passes themselves read nothing back at ep = 1 (issue 12).
Global gradient norm: replicated params count once; tp shards are summed over tp, expert
shards over ETP x EP (tp_ep), and the stages over pp.
The micro-batches run through `pipeline.run_schedule` (with pp = 1 that is forward, backward,
forward, backward, ...; with pp > 1 the 1F1B or interleaved 1F1B order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cost_model.specs import ModelSpec, TrainingSpec

from .arch import ArchOptions
from .comm import CommCounter, all_reduce_
from .data import BatchOrder
from .model import MoETransformer
from .moe import set_a2a_overlap
from .optimizer import DistributedAdamW, adamw
from .parallel_dims import ParallelDims
from .pipeline import P2P, run_schedule, schedule_interleaved, stage_layer_ranges
from .router import Router, RouterConfig, load_imbalance


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and clipping settings."""

    lr: float = 3e-4  # 1e-3 diverged on a 1.3B-parameter MoE on an H200 (benchmarks/gpu_step_profile.py)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8
    clip_grad: float = 1.0  # global-norm clip; 0 disables


@dataclass(frozen=True)
class StepStats:
    """Global (all-rank) numbers of one optimizer step."""

    step: int
    loss: float  # language-model cross-entropy, mean over the global batch
    aux_loss: float  # router losses (load balancing + z), mean over micro-batches
    num_dropped: int  # dropped (token, expert) pairs over all ranks
    grad_norm: float  # global norm before clipping
    time_s: float
    # busiest expert's tokens over the mean, averaged over MoE layers and micro-batches (before
    # capacity dropping): what training.moe_expert_load_imbalance asks for; None without MoE
    expert_load_imbalance: float | None = None
    grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)


def _bucket_reduce(params: list[torch.nn.Parameter], group, counter, key) -> None:
    """Sum the gradients of `params` over `group` in one flat all-reduce."""
    if not params:
        return
    for p in params:
        if p.grad is None and not hasattr(p, "main_grad"):
            p.grad = torch.zeros_like(p)
    grads = [p.main_grad if hasattr(p, "main_grad") else p.grad for p in params]  # fp32 main grads (bf16)
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, group, counter, key)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


class Trainer:
    """Model + optimizer + data of one rank for one mapping."""

    def __init__(self, spec: ModelSpec, training: TrainingSpec, dims: ParallelDims, tokens,
                 seed: int = 0, counter: CommCounter | None = None,
                 router_config: RouterConfig | None = None, optim: OptimConfig | None = None,
                 kernel_backend: str = "torch", autocast_dtype: torch.dtype | None = None,
                 arch: ArchOptions | None = None, init_hf=None, a2a_overlap: bool = True):
        """`init_hf`: an `hf_checkpoint.HFCheckpoint` to start from (this rank's slices are
        read) instead of the seeded random init; `arch` its options (`RunSpec.arch`).
        `a2a_overlap`: shared experts run while the tokens are dispatched over EP (moe.py;
        bit-identical either way; `moe.set_a2a_overlap` flips it between steps)."""
        m = dims.mapping
        self.spec, self.training, self.dims, self.counter = spec, training, dims, counter
        self.optim_config = optim or OptimConfig()
        if router_config is None:
            router_config = RouterConfig.for_model(spec, training, arch)
        ranges = stage_layer_ranges(spec.num_layers, m)[dims.pp_rank]
        last = dims.pp_rank == dims.pp - 1
        self.chunks = [
            MoETransformer(spec, dims, counter, router_config, m.dispatcher, kernel_backend, m.recompute,
                           layer_ids=r, pre=dims.pp_rank == 0 and v == 0, post=last and v == len(ranges) - 1,
                           recompute_num_layers=m.recompute_num_layers, arch=arch).to(dims.device)
            for v, r in enumerate(ranges)
        ]
        set_a2a_overlap(self.chunks, a2a_overlap)
        if init_hf is not None:  # before the optimizer copies the parameters
            from .hf_checkpoint import load_into

            load_into(init_hf, self.chunks, spec)
        else:
            for chunk in self.chunks:
                chunk.init_weights(seed)
        self.model = self.chunks[0] if len(self.chunks) == 1 else torch.nn.ModuleList(self.chunks)
        params = list(self.model.parameters())
        self.expert_params = [p for p in params if getattr(p, "is_expert", False)]
        # Tied embeddings with pp > 1: the last stage holds a copy of embed.weight for the output
        # layer; its gradient is summed with the first stage's over pp_embed, and it is left out
        # of the gradient norm (the first stage's copy counts).
        tied = dims.pp > 1 and not spec.untie_embeddings_and_output_weights
        self.tied_params = [c.embed.weight for c in self.chunks if tied and hasattr(c, "embed")]
        self.tied_copy = [c.embed.weight for c in self.chunks if tied and c.post and not c.pre]
        self.tp_params = [p for p in params if hasattr(p, "tp_dim") and not getattr(p, "is_expert", False)
                          and not any(p is q for q in self.tied_copy)]
        self.replicated_params = [p for p in params if not hasattr(p, "tp_dim") and not getattr(p, "is_expert", False)]
        self.p2p = P2P(dims, counter) if dims.pp > 1 else None
        self.schedule = schedule_interleaved(training.global_batch_size // (m.micro_batch_size * dims.dp),
                                             dims.pp, dims.pp_rank, len(ranges))
        oc = self.optim_config
        self.distributed_optimizer = m.distributed_optimizer
        # A bf16 run (autocast_dtype set) with the distributed optimizer runs Megatron's mixed
        # precision: bf16 parameters and activations, fp32 main grads, masters and moments in the
        # optimizer (optimizer.py); no autocast. Without it, autocast over fp32 parameters.
        self.param_dtype = torch.float32
        if autocast_dtype is not None and self.distributed_optimizer:
            self.param_dtype, autocast_dtype = autocast_dtype, None
            for p in params:
                p.data = p.data.to(self.param_dtype)
        if self.distributed_optimizer:
            self.optimizer = DistributedAdamW(
                [(self.tp_params, dims.group("dp_cp"), "dp_cp"),
                 (self.tied_copy, dims.group("dp_cp"), "dp_cp.tied_copy"),
                 (self.replicated_params, dims.group("tp_cp_dp"), "tp_cp_dp"),
                 (self.expert_params, dims.group("edp"), "edp")],
                lr=oc.lr, betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay, counter=counter)
        else:
            self.optimizer = adamw(self.model.parameters(), lr=oc.lr, betas=oc.betas,
                                   weight_decay=oc.weight_decay, eps=oc.eps)
        self.order = BatchOrder(tokens, training.seq_length, training.global_batch_size, seed)
        self.mbs = m.micro_batch_size
        self.num_micro = training.global_batch_size // (self.mbs * dims.dp)
        assert self.num_micro * self.mbs * dims.dp == training.global_batch_size
        self.autocast_dtype = autocast_dtype

    def named_parameters(self):
        """(name, parameter) of every chunk of this stage, with the single-rank model's names."""
        return [(n, p) for c in self.chunks for n, p in c.named_parameters()]

    def named_buffers(self) -> list[tuple[str, torch.Tensor]]:
        """(name, buffer) of every persistent buffer of this stage's chunks, with the
        single-rank model's names: state that is not a parameter but must survive a
        checkpoint (the routers' `expert_bias_E`). Each is whole on every rank that holds its
        layer (the router is replicated), so its shard is the full tensor on every mapping."""
        return [(n, b) for c in self.chunks for n, b in c.state_dict(keep_vars=True).items()
                if not isinstance(b, torch.nn.Parameter)]

    def _chunk_of(self, name: str) -> MoETransformer:
        for c in self.chunks:
            if name in dict(c.named_parameters()):
                return c
        raise KeyError(name)

    def shard_of_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the single-rank tensor `full` of parameter `name`."""
        return self._chunk_of(name).shard_of_full(name, full)

    def full_shape_of(self, name: str) -> tuple[int, ...]:
        """Shape of parameter `name` in the single-rank model."""
        return self._chunk_of(name).full_shape_of(name)

    def sync_tied_embedding(self) -> None:
        """Sum the embedding gradient of the first and last stage (tied weights, pp > 1)."""
        if self.tied_params:
            _bucket_reduce(self.tied_params, self.dims.group("pp_embed"), self.counter, "pp_embed")

    def reduce_gradients(self) -> None:
        """Sum gradients: tp shards over dp_cp, replicated over tp_cp_dp, experts over edp."""
        _bucket_reduce(self.tp_params + self.tied_copy, self.dims.group("dp_cp"), self.counter, "dp_cp")
        _bucket_reduce(self.replicated_params, self.dims.group("tp_cp_dp"), self.counter, "tp_cp_dp")
        _bucket_reduce(self.expert_params, self.dims.group("edp"), self.counter, "edp")

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced gradients (see module docstring), a 0-d tensor."""
        def zero():
            return torch.zeros((), device=self.dims.device)

        if self.distributed_optimizer:
            sq = self.optimizer.squared_norms()
            tp, rep, expert = (sq[k] if k in sq else zero() for k in ("dp_cp", "tp_cp_dp", "edp"))
        else:
            def squares(params):
                return sum((p.grad.float().pow(2).sum() for p in params), zero())

            tp, rep, expert = squares(self.tp_params), squares(self.replicated_params), squares(self.expert_params)
        tp = all_reduce_(tp, self.dims.group("tp"), self.counter, "tp.grad_norm")
        expert = all_reduce_(expert, self.dims.group("tp_ep"), self.counter, "tp_ep.grad_norm")
        total = all_reduce_(rep + tp + expert, self.dims.group("pp"), self.counter, "pp.grad_norm")
        return total.sqrt()

    def step(self, step: int, keep_grads: bool = False) -> StepStats:
        """One optimizer step on global batch `step` (0-based)."""
        t0 = time.perf_counter()
        dev, S, G = self.dims.device, self.training.seq_length, self.training.global_batch_size
        d = self.dims

        def get_batch(micro):
            return self.order.micro_batch(step, micro, self.mbs, d.dp, d.dp_rank)

        act_shape = (self.mbs, S // (d.cp * d.tp), self.spec.hidden_size)
        if self.chunks[0].flat:  # the flat residual stream (model.py)
            act_shape = (self.mbs * act_shape[1], act_shape[2])
        totals = run_schedule(self.chunks, self.schedule, self.p2p, get_batch, act_shape,
                              1.0 / (G * S), 1.0 / self.num_micro, self.autocast_dtype).to(dev)
        self.sync_tied_embedding()
        if self.distributed_optimizer:
            self.optimizer.reduce_scatter_grads()
            if keep_grads:
                self.optimizer.gather_grads()
        else:
            self.reduce_gradients()
        grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()} if keep_grads else None
        norm = self.grad_norm()
        clip = self.optim_config.clip_grad
        if clip > 0:
            scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
            if self.distributed_optimizer:
                self.optimizer.scale_grads(scale)
            else:
                torch._foreach_mul_([p.grad for p in self.model.parameters()], scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for router in self.routers():
            router.update_expert_bias()  # aux-loss-free balancing (no-op without expert bias)
        # CE is replicated over tp (sum over dp_cp), router numbers are per rank (tp_cp_dp).
        if d.group("dp_cp").size > 1:
            all_reduce_(totals[:1], d.group("dp_cp"), None)
        if d.group("tp_cp_dp").size > 1:
            all_reduce_(totals[1:], d.group("tp_cp_dp"), None)
        all_reduce_(totals, d.group("pp"), None)
        load_acc = self.expert_load_sums()
        all_reduce_(load_acc, d.group("pp"), None)  # stages hold different layers
        # The step's one host read: every number of StepStats in one tensor.
        # (cat promotes the float32 numbers to float64 itself, exactly)
        ce, aux, dropped, load_sum, load_count, grad_norm = torch.cat([totals, load_acc, norm.reshape(1)]).tolist()
        load = load_sum / load_count if load_count else 0.0
        return StepStats(
            step=step,
            loss=ce / (G * S),
            aux_loss=aux / self.num_micro,
            num_dropped=int(dropped),
            grad_norm=grad_norm,
            time_s=time.perf_counter() - t0,
            grads=grads,
            expert_load_imbalance=load if load_count else None,
        )

    def routers(self) -> list[Router]:
        """The routers of this stage's MoE layers."""
        return [r for c in self.chunks for r in c.modules() if isinstance(r, Router)]

    def expert_load_sums(self) -> torch.Tensor:
        """[sum, count] (float32, on the device) of the busiest-over-mean expert load of this
        step over this stage's MoE layers and micro-batches (count 0 without MoE layers);
        summed over pp, sum / count is StepStats.expert_load_imbalance."""
        loads = [t for r in self.routers() for t in r.take_loads()]  # one per layer and micro-batch
        if not loads:
            return torch.zeros(2, dtype=torch.float32, device=self.dims.device)
        return F.pad(load_imbalance(torch.stack(loads)).sum(0, keepdim=True), (0, 1), value=float(len(loads)))
