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

Mixed precision (Megatron-style, for bf16 runs): parameters and activations in bf16, every
gradient accumulated into an fp32 `main_grad` beside its parameter (a post-accumulate hook adds
the bf16 gradient of each backward into it and frees it, so micro-batches sum in fp32), fp32
master shards and fp32 Adam moments here: 2 + 4 + 12 / n bytes per parameter, what
`cost_model/memory.py` assumes. With fp32 parameters (CPU) nothing of this is used: gradients
stay in `.grad` and the masters equal the parameters.
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


def main_grad(p: nn.Parameter) -> torch.Tensor:
    """The gradient the optimizer sums: fp32 `main_grad` of a low-precision parameter, else
    `.grad` (zeros when the parameter got none this step)."""
    if hasattr(p, "main_grad"):
        return p.main_grad
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _accumulate_main_grad(p: nn.Parameter) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


def _attach_main_grad(p: nn.Parameter) -> None:
    """Give a low-precision parameter an fp32 gradient accumulator (see module docstring)."""
    if not hasattr(p, "main_grad"):
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
        p.register_post_accumulate_grad_hook(_accumulate_main_grad)


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    group: Group
    key: str
    chunk: int  # C
    master: nn.Parameter  # this rank's fp32 shard of the flat parameters

    def flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat_N = torch.cat([t.reshape(-1).float() for t in tensors])
        return torch.nn.functional.pad(flat_N, (0, self.chunk * self.group.size - flat_N.numel()))

    def mine(self, flat_N: torch.Tensor) -> torch.Tensor:
        return flat_N[self.group.index * self.chunk : (self.group.index + 1) * self.chunk]

    def scatter_back(self, flat_N: torch.Tensor, attr: str | None) -> None:
        """Copy flat_N into each parameter (attr None: one foreach copy, casting to the
        parameter dtype) or its .grad (attr 'grad')."""
        sizes = [p.numel() for p in self.params]
        pieces = torch.split(flat_N[: sum(sizes)], sizes)
        if attr is None:
            with torch.no_grad():
                torch._foreach_copy_(self.params, [x.view_as(p) for x, p in zip(pieces, self.params)])
            return
        for p, x in zip(self.params, pieces):
            p.grad = x.view_as(p).to(p.dtype).clone()


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
            self.buckets.append(b)
            for p in params:
                if p.dtype != torch.float32:
                    _attach_main_grad(p)
        self.inner = adamw([b.master for b in self.buckets], lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay)

    def reduce_scatter_grads(self) -> None:
        """Sum each bucket's gradients over its group; keep this rank's shard in master.grad."""
        for b in self.buckets:
            grads = [main_grad(p) for p in b.params]
            flat_N = b.flat(grads)
            b.master.grad = reduce_scatter_v(flat_N, [b.chunk] * b.group.size, b.group, self.counter, b.key)

    def gather_grads(self) -> None:
        """Write the full summed gradients back into p.grad (for tests; costs an all-gather)."""
        for b in self.buckets:
            flat_N = all_gather_v(b.master.grad, [b.chunk] * b.group.size, b.group, None, b.key)
            b.scatter_back(flat_N, "grad")

    def squared_norms(self) -> dict[str, torch.Tensor]:
        """Per bucket key: sum of squares of the whole bucket's summed gradient (over its group)."""
        out = {}
        for b in self.buckets:
            sq = b.master.grad.float().pow(2).sum().reshape(1)
            out[b.key] = all_reduce_(sq, b.group, self.counter, b.key + ".grad_norm")
        return out

    def scale_grads(self, scale: torch.Tensor) -> None:
        for b in self.buckets:
            b.master.grad.mul_(scale)

    @torch.no_grad()
    def step(self) -> None:
        """AdamW on the shards, then all-gather the updated parameters."""
        self.inner.step()
        for b in self.buckets:
            flat_N = all_gather_v(b.master.detach(), [b.chunk] * b.group.size, b.group, self.counter,
                                  b.key + ".params")
            b.scatter_back(flat_N, None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for b in self.buckets:
            for p in b.params:
                p.grad = None
            mains = [p.main_grad for p in b.params if hasattr(p, "main_grad")]
            if mains:
                torch._foreach_zero_(mains)

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
