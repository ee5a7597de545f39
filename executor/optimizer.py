"""Distributed optimizer (Megatron's `--use-distributed-optimizer`, ZeRO-1): AdamW state sharded
over the data-parallel ranks that hold the same parameters.

Legend: N elements of one bucket (its parameters flattened, padded to a multiple of n),
n ranks of the bucket's group, C = N / n this rank's shard.

Buckets and groups (the same sums as the plain all-reduce in trainer.py):
  tp-sharded dense params   over dp_cp
  replicated dense params   over tp_cp_dp
  expert params             over edp
Per step: reduce-scatter each bucket's flat gradient over its group (this rank keeps the summed
gradient of its C elements), clip with the global norm, AdamW on the C-element fp32 shard
(`master`), then all-gather the updated shards back into the parameters. Moments exist for
C elements only, so optimizer memory per rank is 1/n of the plain optimizer's. AdamW is
elementwise, so the result equals the plain optimizer's exactly up to summation order.
Both run torch's fused AdamW (`adamw`): one kernel for all shards, the step count kept on the
device (the default single-tensor AdamW reads each parameter's step back to the host).

Flat buffers (Megatron's contiguous parameter and gradient buffers, issue 12): each bucket's
parameters are views of one flat tensor `params_N` and their gradients views of one fp32
tensor `grads_N`, made once. Autograd accumulates every micro-batch into the views in place,
the reduce-scatter takes `grads_N` as it is (with one rank in the group it IS the shard), the
update is one copy into `params_N` (none with one rank and fp32: the master shard is `params_N`
itself), and zero_grad zeroes every bucket in one foreach op: no per-parameter op per step
outside autograd's own accumulation.

Mixed precision (Megatron-style, for bf16 runs): parameters and activations in bf16, every
gradient accumulated into an fp32 `main_grad` (the parameter's view of `grads_N`; a
post-accumulate hook adds the bf16 gradient of each backward into it and frees it, so
micro-batches sum in fp32), fp32 master shards and fp32 Adam moments here: 2 + 4 + 12 / n bytes
per parameter, what `cost_model/memory.py` assumes. With fp32 parameters (CPU) the `.grad`
itself is the view and the masters equal the parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .comm import CommCounter, all_gather_v, all_reduce_, reduce_scatter_v
from .parallel_dims import Group

FUSED_DEVICES = ("cpu", "cuda")


def adamw(params, lr, betas, eps, weight_decay) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused where torch offers it for every parameter (CPU and CUDA,
    floating point): no per-parameter host read of the step count, one kernel per step."""
    params = list(params)
    fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None)


def _accumulate_main_grad(p: nn.Parameter) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: Group
    key: str
    chunk: int  # C
    master: nn.Parameter  # this rank's fp32 shard of the flat parameters
    params_N: torch.Tensor | None = None  # the parameters' storage: each parameter is a view
    grads_N: torch.Tensor | None = None  # fp32 gradients: each .grad (main_grad) is a view
    grad_views: list[torch.Tensor] | None = None  # the views, made once

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat_N = torch.cat([t.reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat_N, (0, self.chunk * self.group.size - flat_N.numel()))

    def mine(self, flat_N: torch.Tensor) -> torch.Tensor:
        return flat_N[self.group.index * self.chunk : (self.group.index + 1) * self.chunk]

    @torch.no_grad()
    def bind(self) -> None:
        """Move the parameters into one flat buffer and give them fp32 gradient views of a
        second one (Megatron's contiguous grad buffer): autograd then accumulates every
        micro-batch's gradient in place, and the reduce-scatter, the norm and the parameter
        update work on one tensor per bucket instead of one per parameter. Each view is the
        parameter's `main_grad`: an fp32 parameter's .grad as well (so linear.py's
        gradient-accumulation fusion may add into it), a low-precision parameter's the
        accumulator a post-accumulate hook adds its gradient into (module docstring)."""
        N = self.chunk * self.group.size
        dtype = self.params[0].dtype
        assert all(p.dtype == dtype for p in self.params), "one dtype per bucket"
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.params_N = torch.nn.functional.pad(flat, (0, N - flat.numel()))
        self.grads_N = torch.zeros(N, dtype=torch.float32, device=flat.device)
        self.grad_views = []
        offset = 0
        for p in self.params:
            n = p.numel()
            p.data = self.params_N[offset : offset + n].view_as(p)
            self.grad_views.append(self.grads_N[offset : offset + n].view_as(p))
            p.main_grad = self.grad_views[-1]  # fp32: also its .grad (attach_grads)
            if p.dtype != torch.float32:
                p.register_post_accumulate_grad_hook(_accumulate_main_grad)
            offset += n
        self.attach_grads()

    def attach_grads(self) -> None:
        """Point every fp32 parameter's .grad at its view (others: no .grad)."""
        for p, grad in zip(self.params, self.grad_views):
            p.grad = grad if p.dtype == torch.float32 else None


class DistributedAdamW:
    """AdamW over per-group shards of flat parameter buckets (see module docstring)."""

    def __init__(self, buckets: list[tuple[list[nn.Parameter], Group, str]], lr, betas, eps,
                 weight_decay, counter: CommCounter | None = None):
        self.counter = counter
        self.buckets: list[_Bucket] = []
        for params, group, key in buckets:
            if not params:
                continue
            total = sum(p.numel() for p in params)
            chunk = -(-total // group.size)
            b = _Bucket(params, group, key, chunk, nn.Parameter(torch.empty(0)))
            b.master = nn.Parameter(b.mine(b.flat([p.detach() for p in params])).clone())
            b.bind()
            if group.size == 1 and b.params_N.dtype == torch.float32:
                # the whole bucket is this rank's fp32 shard: AdamW updates the parameters'
                # buffer itself (no copy back after each step)
                b.master = nn.Parameter(b.params_N)
            self.buckets.append(b)
        self.inner = adamw([b.master for b in self.buckets], lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay)

    def reduce_scatter_grads(self) -> None:
        """Sum each bucket's gradients over its group; keep this rank's shard in master.grad."""
        for b in self.buckets:
            # one group: the shard is the buffer itself (zeroed by zero_grad after the update)
            b.master.grad = reduce_scatter_v(b.grads_N, [b.chunk] * b.group.size, b.group, self.counter, b.key)

    def gather_grads(self) -> None:
        """Write the full summed gradients back into p.grad (for tests; costs an all-gather)."""
        for b in self.buckets:
            flat_N = all_gather_v(b.master.grad, [b.chunk] * b.group.size, b.group, None, b.key)
            b.grads_N.copy_(flat_N)
            for p in b.params:
                if p.dtype != torch.float32:
                    p.grad = p.main_grad.to(p.dtype)

    def squared_norms(self) -> dict[str, torch.Tensor]:
        """Per bucket key: sum of squares of the whole bucket's summed gradient (over its group)."""
        out = {}
        for b in self.buckets:
            g = b.master.grad.float()
            out[b.key] = all_reduce_(torch.dot(g, g), b.group, self.counter, b.key + ".grad_norm")  # 0-d
        return out

    def scale_grads(self, scale: torch.Tensor) -> None:
        """Every shard's gradient times `scale` (a device scalar), one foreach op."""
        torch._foreach_mul_([b.master.grad for b in self.buckets], scale)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the shards, then all-gather the updated parameters."""
        self.inner.step()
        for b in self.buckets:
            if b.master.data_ptr() == b.params_N.data_ptr():  # updated in place (__init__)
                continue
            flat_N = all_gather_v(b.master.detach(), [b.chunk] * b.group.size, b.group, self.counter,
                                  b.key + ".params")
            b.params_N.copy_(flat_N)  # casts to the parameter dtype

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffers, one foreach op (their views stay the parameters'
        .grad); the shards' gradients are dropped (or zeroed)."""
        for b in self.buckets:
            if set_to_none:
                b.master.grad = None
            elif b.master.grad is not None:
                b.master.grad.zero_()
        torch._foreach_zero_([b.grads_N for b in self.buckets])
        for b in self.buckets:
            b.attach_grads()

    def param_moments(self) -> tuple[float, dict]:
        """(step, {param: (exp_avg, exp_avg_sq)}) at full local-parameter shape (all-gathers)."""
        out, step = {}, 0.0
        for b in self.buckets:
            st = self.inner.state.get(b.master)
            if not st:
                continue
            step = float(st["step"])
            gathered = [all_gather_v(st[k], [b.chunk] * b.group.size, b.group, None, b.key) for k in ("exp_avg", "exp_avg_sq")]
            offset = 0
            for p in b.params:
                n = p.numel()
                out[p] = tuple(g[offset : offset + n].view_as(p).clone() for g in gathered)
                offset += n
        return step, out

    @torch.no_grad()
    def set_param_moments(self, step: float, moments: dict) -> None:
        """Inverse of param_moments: keep this rank's shard of every bucket's moments."""
        for b in self.buckets:
            b.master.copy_(b.mine(b.flat([p.detach() for p in b.params])))
            st = {"step": torch.tensor(step)}
            for i, k in enumerate(("exp_avg", "exp_avg_sq")):
                st[k] = b.mine(b.flat([moments[p][i] for p in b.params])).clone()
            self.inner.state[b.master] = st

    def state_dict(self) -> dict:
        """The inner AdamW's state; with low-precision parameters also this rank's fp32 master
        shards under "masters" (the parameters alone cannot restore them bit for bit)."""
        state = self.inner.state_dict()
        if any(p.dtype != torch.float32 for b in self.buckets for p in b.params):
            state["masters"] = [b.master.detach().clone() for b in self.buckets]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load the moments and the saved master shards; without saved masters (fp32 runs,
        older checkpoints) they are re-read from the (already loaded) parameters."""
        state = dict(state)
        masters = state.pop("masters", None)
        self.inner.load_state_dict(state)
        for i, b in enumerate(self.buckets):
            b.master.copy_(masters[i] if masters is not None else b.mine(b.flat([p.detach() for p in b.params])))
