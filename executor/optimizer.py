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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .comm import CommCounter, all_gather_v, all_reduce_, reduce_scatter_v
from .parallel_dims import Group


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
        """Copy flat_N into each parameter (attr None) or its .grad (attr 'grad')."""
        offset = 0
        for p in self.params:
            n = p.numel()
            piece = flat_N[offset : offset + n].view_as(p).to(p.dtype)
            if attr is None:
                p.data.copy_(piece)
            else:
                p.grad = piece.clone()
            offset += n


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
        self.inner = torch.optim.AdamW([b.master for b in self.buckets], lr=lr, betas=betas,
                                       eps=eps, weight_decay=weight_decay)

    def reduce_scatter_grads(self) -> None:
        """Sum each bucket's gradients over its group; keep this rank's shard in master.grad."""
        for b in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
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
        return self.inner.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load the moments; masters are re-read from the (already loaded) parameters."""
        self.inner.load_state_dict(state)
        for b in self.buckets:
            b.master.copy_(b.mine(b.flat([p.detach() for p in b.params])))
