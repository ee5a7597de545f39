"""Routed experts of one rank: one batched computation over all local experts.

Legend: M rows (tokens routed to local experts, sorted by expert), D model dim, El local
experts, F expert FFN size, Fs = F / etp this rank's FFN shard, Cm = max rows of one expert.

Sharding: expert e in [ep_rank * El, (ep_rank + 1) * El) lives on this EP rank; its FFN columns
[etp_rank * Fs, (etp_rank + 1) * Fs) live on this ETP rank, so fc2 yields a partial sum over
ETP that the dispatcher's reduce-scatter completes.
Compute: one grouped GEMM per weight (`torch._grouped_mm`: row block e of x times weight e,
block boundaries from the device offsets of `ExpertRows`, never read by the host), so each
expert costs its own rows, as with Megatron's grouped GEMM; no padding, no Python loop over
experts. Rows in the pad-to-capacity layout (every expert owns exactly C rows, token dropping
at ep = 1) are a [El, C, D] batch: one bmm per weight, static shapes (the local dispatcher
hands the batch itself, router.choose_by_expert's rows: no view either way). Where the grouped GEMM is
not offered (older torch, or a CUDA dtype/arch it does not take) the rows are scattered into a
zero-padded [El, Cm, D] batch and multiplied with one bmm per weight: every expert then costs
as much as the busiest one, and Cm is read to the host (the one path with a host read here).
w1 holds the gate and up projections side by side ([El, D, 2Fs]): one GEMM for both. With
SwiGLU the grouped and the pad-to-capacity computations are one autograd Function with a
hand-written backward (`_SwiGLUExperts`, issue 12: fewer ops per step): the weights'
transposes are views made once (linear.transposed), and in the pad-to-capacity layout the
weight gradients are added into the distributed optimizer's buffer by the bmm itself
(`baddbmm_`, Megatron's gradient-accumulation fusion; the grouped GEMM has no such form).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .init import normal
from .linear import accumulation_target, transposed


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (the grouped GEMM's backward
    refuses the stride-0 gradients that e.g. `.sum()` produces)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g.contiguous()


class _SwiGLUExperts(torch.autograd.Function):
    """y = (silu(x w1_gate) * (x w1_up)) w2 for every local expert at once, with a hand-written
    backward (issue 12: 17 ops forward + backward where autograd dispatches about 25). Rows
    x_MD are grouped by the device offsets (`torch._grouped_mm`), or x_ECD is a batch of C
    rows per expert (pad-to-capacity: bmm). The backward runs the GEMMs autograd would run:
        dact = dy w2^T, dw2 = act^T dy, dup = dact * silu(gate),
        dgate = silu'(gate) * dact * up, dx = [dgate dup] w1^T, dw1 = x^T [dgate dup]."""

    @staticmethod
    def forward(ctx, x, w1_EDF, w2_EFD, offs_E: torch.Tensor | None, wgrads: tuple):
        """`wgrads`: the weights' gradient buffers to add into (pad-to-capacity only), or None."""
        ctx.offs_E, ctx.wgrads = offs_E, wgrads
        ctx.w1_EFD, ctx.w2_EDF = transposed(w1_EDF), transposed(w2_EFD)  # views made once
        gate, up = _expert_mm(x, w1_EDF, offs_E).chunk(2, dim=-1)
        a = F.silu(gate)
        act = a * up
        ctx.save_for_backward(x, gate, up, a, act)
        return _expert_mm(act, w2_EFD, offs_E)

    @staticmethod
    def backward(ctx, g):
        x, gate, up, a, act = ctx.saved_tensors
        offs_E = ctx.offs_E
        g = g.contiguous()  # the grouped GEMM refuses e.g. the stride-0 gradient of .sum()
        g_act = _expert_mm(g, ctx.w2_EDF, offs_E)
        g_w2 = _expert_wgrad(act, g, offs_E, ctx.wgrads[1])
        g_h = torch.cat([torch.ops.aten.silu_backward(g_act * up, gate), g_act * a], dim=-1)
        g_w1 = _expert_wgrad(x, g_h, offs_E, ctx.wgrads[0])
        return _expert_mm(g_h, ctx.w1_EFD, offs_E), g_w1, g_w2, None, None


def _expert_mm(x: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor | None) -> torch.Tensor:
    """Rows of expert e times w[e]: row blocks of x_MI by offs_E, or the batch x_ECI (bmm)."""
    if offs_E is None:
        return torch.bmm(x, w_EIO)
    return torch._grouped_mm(x, w_EIO, offs=offs_E)


def _expert_wgrad(x: torch.Tensor, g: torch.Tensor, offs_E: torch.Tensor | None,
                  target: torch.Tensor | None = None) -> torch.Tensor | None:
    """Per expert e: x_e^T g_e ([El, I, O]), the weight gradient of `_expert_mm`; with a
    `target` (the batch layout only) added into it by one `baddbmm_` (returns None)."""
    if offs_E is None:
        if target is not None:
            target.baddbmm_(x.transpose(1, 2), g)
            return None
        return torch.bmm(x.transpose(1, 2), g)
    return torch._grouped_mm(x.t(), g, offs=offs_E)


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs (forward and backward) for this device type and dtype:
    tried once on a small problem and remembered. FOLDPLAN_GROUPED_MM=0 forces the padded path."""
    if os.environ.get("FOLDPLAN_GROUPED_MM", "1") == "0" or not hasattr(torch, "_grouped_mm"):
        return False
    key = (str(device), dtype)
    if key not in _GROUPED_OK:
        # On its own thread: the caller may be inside activation checkpointing, whose
        # thread-local saved-tensor hooks must not see the probe's tensors.
        with ThreadPoolExecutor(1) as pool:
            _GROUPED_OK[key] = pool.submit(_probe_grouped_mm, device, dtype).result()
    return _GROUPED_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        x = torch.randn(24, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 24], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:8] @ w[0], x[8:] @ w[1]])
        return bool(torch.allclose(y, ref, rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


@dataclass(frozen=True)
class ExpertRows:
    """How the rows handed to the local experts are grouped: expert e owns the block
    [offsets_E[e-1], offsets_E[e]) of the rows (offsets_E[-1] = all rows)."""

    offsets_E: torch.Tensor  # int32 end row of each local expert's block, on the device
    capacity: int | None = None  # every expert owns exactly `capacity` rows (pad-to-capacity)
    counts: tuple[int, ...] | None = None  # rows per expert when the host already knows them

    @classmethod
    def from_counts(cls, counts: tuple[int, ...], device: torch.device) -> ExpertRows:
        """From host counts (tests, benchmarks, dispatchers that read the counts anyway)."""
        offs = torch.tensor(counts, device=device, dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(offs, None, tuple(int(c) for c in counts))

    def host_counts(self) -> tuple[int, ...]:
        """Rows per expert on the host: known, or read from the offsets (one host read)."""
        if self.counts is not None:
            return self.counts
        ends = self.offsets_E.tolist()
        return tuple(b - a for a, b in zip([0] + ends[:-1], ends))


def _rows(rows: ExpertRows | tuple[int, ...], device: torch.device) -> ExpertRows:
    return rows if isinstance(rows, ExpertRows) else ExpertRows.from_counts(rows, device)


class GroupedExperts(nn.Module):
    """SwiGLU (or GELU) experts, weights [El, D, 2Fs] and [El, Fs, D]."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, gated: bool, ep: int,
                 ep_rank: int, etp: int, etp_rank: int):
        super().__init__()
        if num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={num_experts}")
        if ffn_size % etp:
            raise ValueError(f"etp={etp} does not divide moe_ffn_hidden_size={ffn_size}")
        self.num_experts, self.hidden_size, self.ffn_size, self.gated = num_experts, hidden_size, ffn_size, gated
        self.num_local, self.shard = num_experts // ep, ffn_size // etp
        self.first_expert, self.first_col = ep_rank * self.num_local, etp_rank * self.shard
        width = 2 * self.shard if gated else self.shard
        self.w1_EDF = nn.Parameter(torch.empty(self.num_local, hidden_size, width))
        self.w2_EFD = nn.Parameter(torch.empty(self.num_local, self.shard, hidden_size))
        for p in self.parameters():
            p.is_expert = True  # gradients reduce over edp, not dp_cp

    @torch.no_grad()
    def init_from_seed(self, seed: int, prefix: str) -> None:
        """Draw the full [E, D, F] / [E, F, D] weights from the seed and keep this shard."""
        E, D, Fh = self.num_experts, self.hidden_size, self.ffn_size
        es = slice(self.first_expert, self.first_expert + self.num_local)
        cs = slice(self.first_col, self.first_col + self.shard)
        up = normal((E, D, Fh), seed, prefix + ".up")[es, :, cs]
        if self.gated:
            gate = normal((E, D, Fh), seed, prefix + ".gate")[es, :, cs]
            up = torch.cat([gate, up], dim=2)
        self.w1_EDF.copy_(up)
        self.w2_EFD.copy_(normal((E, Fh, D), seed, prefix + ".down")[es, cs, :])

    def forward(self, x_MD: torch.Tensor, rows: ExpertRows | tuple[int, ...]) -> torch.Tensor:
        """Rows sorted by local expert (grouped as `rows` says; a tuple = host counts per
        expert) -> partial outputs y_MD. Pad-to-capacity rows may come as the batch x_ECD
        (y_ECD out)."""
        if x_MD.numel() == 0:
            # Keep every weight in the graph so gradient hooks and all-reduces stay uniform.
            return x_MD + 0 * (self.w1_EDF.sum() + self.w2_EFD.sum())
        dev = x_MD.device
        rows = _rows(rows, dev)
        assert rows.offsets_E.shape[0] == self.num_local, (rows.offsets_E.shape, self.num_local)
        if torch.is_autocast_enabled(dev.type):
            # autocast does not cover the grouped GEMM: cast to the autocast dtype ourselves
            # (else the GEMMs would run in fp32), as autocast does for the bmm path.
            x_MD = x_MD.to(torch.get_autocast_dtype(dev.type))
        if rows.capacity is not None:
            return self._forward_capacity(x_MD, rows.capacity)
        aligned = dev.type == "cpu" or (x_MD.shape[1] % 8 == 0 and self.shard % 8 == 0)
        if aligned and grouped_mm_supported(dev, x_MD.dtype):  # CUDA wants 16-byte rows
            return self._forward_grouped(x_MD, rows)
        return self._forward_padded(x_MD, rows)

    def _activation(self, h_MF: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h_MF.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h_MF)

    def _forward_grouped(self, x_MD: torch.Tensor, rows: ExpertRows | tuple[int, ...]) -> torch.Tensor:
        offs_E = _rows(rows, x_MD.device).offsets_E
        if self.gated:
            return _SwiGLUExperts.apply(x_MD, self.w1_EDF.to(x_MD.dtype), self.w2_EFD.to(x_MD.dtype), offs_E,
                                        (None, None))
        h_MF = _ContiguousGrad.apply(torch._grouped_mm(x_MD, self.w1_EDF.to(x_MD.dtype), offs=offs_E))
        h_MF = self._activation(h_MF)
        return _ContiguousGrad.apply(torch._grouped_mm(h_MF, self.w2_EFD.to(x_MD.dtype), offs=offs_E))

    def _forward_capacity(self, x_MD: torch.Tensor, capacity: int) -> torch.Tensor:
        """Pad-to-capacity rows: expert e owns rows [e*C, (e+1)*C) -> one bmm per weight. A
        batch x_ECD gives y_ECD, rows x_MD give y_MD."""
        batch = x_MD.dim() == 3
        x_ECD = x_MD if batch else x_MD.view(self.num_local, capacity, x_MD.shape[1])
        if self.gated:
            # the weight gradients go straight into the optimizer's buffer (linear.py), when there is one
            wgrads = (accumulation_target([self.w1_EDF]), accumulation_target([self.w2_EFD]))
            if any(t is not None and t.dtype != x_MD.dtype for t in wgrads):  # e.g. bf16 rows
                wgrads = (None, None)
            y_ECD = _SwiGLUExperts.apply(x_ECD, self.w1_EDF.to(x_MD.dtype), self.w2_EFD.to(x_MD.dtype), None,
                                         wgrads)
            return y_ECD if batch else y_ECD.view(x_MD.shape[0], -1)
        h_ECF = self._activation(torch.bmm(x_ECD, self.w1_EDF.to(x_MD.dtype)))
        y_ECD = torch.bmm(h_ECF, self.w2_EFD.to(x_MD.dtype))
        return y_ECD if batch else y_ECD.view(x_MD.shape[0], -1)

    def _forward_padded(self, x_MD: torch.Tensor, rows: ExpertRows | tuple[int, ...]) -> torch.Tensor:
        M = x_MD.shape[0]
        tokens_per_expert = _rows(rows, x_MD.device).host_counts()
        counts_E = torch.tensor(tokens_per_expert, device=x_MD.device)
        cap = int(max(tokens_per_expert))
        expert_M = torch.repeat_interleave(torch.arange(self.num_local, device=x_MD.device), counts_E, output_size=M)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        pos_M = torch.arange(M, device=x_MD.device) - start_E[expert_M]
        x_ECD = x_MD.new_zeros(self.num_local, cap, x_MD.shape[1])
        x_ECD = x_ECD.index_put((expert_M, pos_M), x_MD)
        h_ECF = self._activation(torch.bmm(x_ECD, self.w1_EDF.to(x_MD.dtype)))
        y_ECD = torch.bmm(h_ECF, self.w2_EFD.to(x_MD.dtype))
        return y_ECD[expert_M, pos_M]

    def full_shape(self, name: str) -> tuple[int, ...]:
        """Shape of parameter `name` in the unsharded (ep = etp = 1) model."""
        E, D, Fh = self.num_experts, self.hidden_size, self.ffn_size
        return (E, D, (2 if self.gated else 1) * Fh) if name == "w1_EDF" else (E, Fh, D)

    def shard_of_full(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of an unsharded (ep = etp = 1) tensor of parameter `name`.

        Used to compare sharded gradients with a single-rank reference."""
        es = slice(self.first_expert, self.first_expert + self.num_local)
        cs = slice(self.first_col, self.first_col + self.shard)
        if name == "w2_EFD":
            return full[es, cs, :]
        assert name == "w1_EDF", name
        if not self.gated:
            return full[es, :, cs]
        gate, up = full[es].chunk(2, dim=2)
        return torch.cat([gate[:, :, cs], up[:, :, cs]], dim=2)
