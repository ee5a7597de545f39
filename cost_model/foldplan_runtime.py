"""`training.runtime: foldplan`: the step time of foldplan's own eager executor, from what
`foldplan profile` measured it doing on this machine (`profile.executor`,
`profile_model.ExecutorProfile`; executor/profile/executor_ops.py).

Megatron-Core runs about a hundred fused kernels per layer at the GPU's rates; our executor
runs every op eagerly, each through Python, autograd and the dispatcher, on GEMMs whose shapes
are often small. So, per micro-batch, one layer of kind K (MoE or dense) on one rank costs

  t_K = ops_K * op_s                                         dispatch: ops counted, per-op cost
      + sum over the layer's GEMMs of 2 m n k / rate(m, n, k)   forward, dgrad and wgrad
      + 3.5 * attention FLOPs / sdpa rate                    causal core, forward + backward
      + (rows_K * T * h * b + wbytes_K * P_K) / bw(T * h * b)   traffic of the other ops

with ops_K the layer's dispatched ops (`moe_layer_ops`: by expert layout), op_s the measured
wall time of one of the executor's ops, rate(m, n, k) the profile's GEMM law for small shapes
(`gemm_shape_rate`), rows_K its measured bytes per token in h-wide rows of b bytes, wbytes_K
its bytes per parameter (gradient accumulation, weight copies) and P_K the layer's parameters
on the rank, bw(size) the rate at which the executor's non-GEMM ops moved data inside real
steps of a model with h-wide rows of that size (cold caches, fresh allocations:
`traffic_bps`). The output layer and loss ("edge": embedding, output, cross-entropy) add their
ops, the output GEMM, logit traffic (rows of V) and their weight traffic. Each step adds, outside
the micro-batches, (step_ops + step_ops_per_layer * layers) * op_s + P * rest_ns + P_shard *
adam_ns (gradient flattening, norm, clipping, zeroing over the rank's P parameters; AdamW over
its shard). Sources: every symbol is an `ExecutorProfile` field (its description says how it is
measured), the shapes and parameter counts are the ones the Megatron model uses
(`params.layer_params`, the shapes of `layers.py`).

On CPU ranks the host runs each op itself, so the terms add. On a GPU the host issues the ops
while the device runs the rest: a layer takes max(ops * op_s, the device terms).
Communication (tp, ep, dp, pp), the bubble and recompute keep the Megatron model's mechanisms
with the profile's link numbers; recompute is scaled by the block's executor/Megatron compute
ratio (the recomputed forward runs the same ops). Expert load: the expert GEMMs see the busiest
rank's rows as the Megatron model does (`training.moe_expert_load_imbalance`).
Share of a core: on CPU ranks the profile's executor numbers are CPU time (what the rank
computes, which does not depend on the host's load), and every term above is turned into wall
time over the share of a core each rank got while the profile's ranks trained together in
lockstep (`ExecutorProfile.cpu_share`, `wall_s`): cores time-shared by the ranks (4 ranks on 2
cores: at most 1/2 each) and by other processes, and the waits at each collective call for a
descheduled or slower rank. The collectives' own latency and bandwidth stay as measured
(wall time).
Without `profile.executor` nothing changes: the estimate is the Megatron one (runtime foldplan
then only restricts the options to what the executor runs, `runtimes.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from itertools import pairwise

from .kernels import collective_time
from .layers import Context, Cost
from .memory import rank_layer_counts
from .params import edge_params, embedding_params, layer_params
from .profile_model import ExecutorProfile, GemmShapeLaw, Profile

ATTENTION_BWD_OVER_FWD = 2.5  # as layers.py counts flash attention's backward


def gemm_shape_rate(law: GemmShapeLaw, m: float, n: float, k: float) -> float:
    """FLOP/s of one (m x k) @ (k x n) GEMM: tflops * m/(m+m_half) * n/(n+n_half) *
    k/(k+k_half). Example: tflops 0.04, halves 32, 64, 16: 256 x 128 x 512 runs at
    0.04e12 * 256/288 * 128/192 * 512/528 = 2.30e10 FLOP/s."""
    return (law.tflops * 1e12 * m / (m + law.m_half) * n / (n + law.n_half)
            * k / (k + law.k_half))


def gemm_seconds(law: GemmShapeLaw, m: float, n: float, k: float, groups: float = 1) -> float:
    """Seconds of `groups` GEMMs of (m x k) @ (k x n) at `gemm_shape_rate`."""
    if m <= 0 or n <= 0 or k <= 0 or groups <= 0:
        return 0.0
    return groups * 2.0 * m * n * k / gemm_shape_rate(law, m, n, k)


def linear_seconds(law: GemmShapeLaw, tokens: float, n_in: float, n_out: float,
                   groups: float = 1) -> tuple[float, float]:
    """(forward, backward) of a linear layer as the executor runs it: y = x W, then
    dx = dy W^T and dW = x^T dy (the wgrad's inner dimension is the tokens)."""
    fwd = gemm_seconds(law, tokens, n_out, n_in, groups)
    return fwd, gemm_seconds(law, tokens, n_in, n_out, groups) + gemm_seconds(
        law, n_in, n_out, tokens, groups)


def traffic_bps(ex: ExecutorProfile, row_bytes: float) -> float:
    """Bytes/s of the executor's non-GEMM ops in a step whose h-wide activations are
    `row_bytes` (tokens x h x bytes): the profile's in-place measurements, linear in
    log(size) between measured sizes, the nearest one outside them."""
    pts = sorted((int(size), gbps) for size, gbps in ex.traffic_GBps.items())
    if row_bytes <= pts[0][0]:
        return pts[0][1] * 1e9
    for (s0, g0), (s1, g1) in pairwise(pts):
        if row_bytes <= s1:
            f = math.log(row_bytes / s0) / math.log(s1 / s0)
            return (g0 + f * (g1 - g0)) * 1e9
    return pts[-1][1] * 1e9


def cpu_share(ex: ExecutorProfile, ep: int, etp: int, data_parallel: bool) -> float:
    """The share of a core a rank gets in this layout (`ExecutorProfile.cpu_share`): the
    expert-parallel one (`alltoall_ep`) when ep or etp > 1, else the data-parallel one
    (`local_dp`) with several data-parallel ranks, else the one of a rank alone (`local`);
    the nearest measured one down that list when it is missing; 1 when none is."""
    order = ["alltoall_ep"] if ep * etp > 1 else []
    order += ["local_dp"] if ep * etp > 1 or data_parallel else []
    for key in order + ["local"]:
        if key in ex.cpu_share:
            return ex.cpu_share[key]
    return 1.0


def wall_s(ctx: Context, cpu_s: float) -> float:
    """Wall seconds of `cpu_s` of the executor's own work on one rank: on CPU ranks (whose
    profile numbers are CPU time) over the share of a core a rank gets in the mapping's
    layout (`cpu_share`), on GPUs as it is. Example: 0.3 s at a share of 0.6: 0.5 s."""
    ex = getattr(ctx, "executor", None)
    if ex is None or ctx.hw.host_launch_s != 0.0:
        return cpu_s
    m = ctx.mapping
    return cpu_s / cpu_share(ex, m.ep, m.etp, ctx.place["dp_cp"].size > 1)


def moe_layer_ops_key(dispatcher: str, ep: int, etp: int, capacity: bool,
                      data_parallel: bool = False) -> str:
    """The key of `ExecutorProfile.moe_layer_ops` for an expert layout: `local` when
    ep = etp = 1 on one rank, `local_dp` on several (data-parallel) ranks, else
    `<dispatcher>_ep`, `<dispatcher>_etp` or `<dispatcher>_ep_etp`; `_capacity` appended with
    a capacity factor. Example: alltoall, ep 2, etp 1, dropless -> "alltoall_ep"."""
    if ep == 1 and etp == 1:
        key = "local_dp" if data_parallel else "local"
    else:
        key = dispatcher + ("_ep" if ep > 1 else "") + ("_etp" if etp > 1 else "")
    return key + ("_capacity" if capacity else "")


def _layout_key(table: dict, dispatcher: str, ep: int, etp: int, capacity: bool,
                data_parallel: bool) -> str | None:
    """The key of `table` measured for this layout, else the nearest measured one (dropless
    for capacity, alltoall for another dispatcher, one rank for data-parallel ranks); None
    when none is there."""
    for cap in ((True, False) if capacity else (False,)):
        for d in (dispatcher, "alltoall"):
            for dp in ((True, False) if data_parallel else (False,)):
                key = moe_layer_ops_key(d, ep, etp, cap, dp)
                if key in table:
                    return key
    return None


def moe_layer_ops(ex: ExecutorProfile, dispatcher: str, ep: int, etp: int, capacity: bool,
                  data_parallel: bool = False) -> float:
    """Ops of one MoE layer per micro-batch for this layout: the measured count (or the
    nearest, `_layout_key`); ep x etp not measured is composed from measured ones (the ep
    layout plus what etp adds to the local one); the local count last."""
    ops = ex.moe_layer_ops
    key = _layout_key(ops, dispatcher, ep, etp, capacity, data_parallel)
    if key is not None:
        return ops[key]
    if ep > 1 and etp > 1:
        parts = [_layout_key(ops, dispatcher, e, t, capacity, data_parallel)
                 for e, t in ((ep, 1), (1, etp), (1, 1))]
        if None not in parts:
            return ops[parts[0]] + ops[parts[1]] - ops[parts[2]]
    return ops.get("local", 0.0)


def _priced_calls(m) -> float:
    """Collective calls of one MoE layer per micro-batch that the Megatron model already
    prices in `ep_comm` (dispatch and combine, forward and backward: `dispatch.dispatch_time`
    with 4 passes): all-to-all over ep and the etp gather / scatter, or the tp x ep gather."""
    if m.dispatcher == "allgather":
        return 4.0 if m.tp * m.ep * m.etp > 1 else 0.0
    return 4.0 * (m.ep > 1) + 4.0 * (m.etp > 1)


def small_collectives_s(ctx: Context, calls: dict[str, float], priced: float,
                        group: str) -> float:
    """Latency of the executor's small collectives beyond the `priced` ones: each all-reduce
    (router counts, loss and norm numbers) over the stage's data-parallel group, each other
    call (count exchanges, uneven gathers built on all-to-all) over `group`; one message of
    the experts' counts each (`kernels.collective_time`: latency steps x link latency)."""
    size = 4.0 * max(1, ctx.model.num_experts or 1)
    other = max(0.0, sum(v for k, v in calls.items() if k != "all_reduce") - priced)
    return (calls.get("all_reduce", 0.0) * collective_time(ctx.hw, ctx.place["dp_cp"],
                                                           "all_reduce", size)
            + other * collective_time(ctx.hw, ctx.place[group], "all_to_all", size))


def _moe_collectives_s(ex: ExecutorProfile, ctx: Context) -> float:
    """`small_collectives_s` of one MoE layer per micro-batch for the mapping's layout."""
    m = ctx.mapping
    capacity = ctx.training.moe_expert_capacity_factor is not None
    key = _layout_key(ex.moe_layer_collectives, m.dispatcher, m.ep, m.etp, capacity,
                      ctx.place["dp_cp"].size > 1)
    if key is None:
        return 0.0
    group = "tp_ep" if m.dispatcher == "allgather" else ("ep" if m.ep > 1 else "etp")
    return small_collectives_s(ctx, ex.moe_layer_collectives[key], _priced_calls(m), group)


def _attention_shapes(ctx: Context) -> tuple[list[tuple[float, float]], float, float]:
    """([(n_in, n_out)] of the attention projections on one rank, q/k dim, v dim): the
    shapes layers.attention_cost prices."""
    md, tp = ctx.model, ctx.mapping.tp
    h, n = md.hidden_size, md.num_attention_heads
    if md.multi_latent_attention:
        dq, dr, dv = md.qk_head_dim, md.qk_pos_emb_head_dim, md.v_head_dim
        shapes = [(h, md.kv_lora_rank + dr)]
        shapes += ([(h, md.q_lora_rank), (md.q_lora_rank, n * (dq + dr) / tp)]
                   if md.q_lora_rank else [(h, n * (dq + dr) / tp)])
        shapes += [(md.kv_lora_rank, n * (dq + dv) / tp), (n * dv / tp, h)]
        return shapes, dq + dr, dv
    d, g = md.head_dim, md.query_groups
    return [(h, (n + 2 * g) * d / tp), (n * d / tp, h)], d, d


def _mlp(law: GemmShapeLaw, ctx: Context, tokens: float, ffn: float,
         groups: float = 1) -> float:
    """Forward + backward GEMMs of a (grouped) SwiGLU or GeLU MLP of width `ffn`."""
    h = ctx.model.hidden_size
    up = ffn * (2 if ctx.model.swiglu else 1)
    return sum(linear_seconds(law, tokens, h, up, groups)) + sum(
        linear_seconds(law, tokens, ffn, h, groups))


def _attention_terms(ex: ExecutorProfile, ctx: Context) -> float:
    """The attention's projection GEMMs and causal core, forward + backward."""
    md, m = ctx.model, ctx.mapping
    shapes, qk, v = _attention_shapes(ctx)
    t = sum(sum(linear_seconds(ex.gemm, ctx.tokens_attn, n_in, n_out)) for n_in, n_out in shapes)
    s = ctx.training.seq_length
    heads = md.num_attention_heads / m.tp
    core = 2.0 * m.micro_batch_size * (s * s / 2) * heads * (qk + v) / m.cp
    return t + (1 + ATTENTION_BWD_OVER_FWD) * core / (ex.sdpa_tflops * 1e12)


def _device_terms(ex: ExecutorProfile, ctx: Context, is_moe: bool) -> float:
    """One layer's GEMMs and memory traffic besides the attention's, forward + backward."""
    md, m, law = ctx.model, ctx.mapping, ex.gemm
    T, h, b = ctx.tokens_attn, md.hidden_size, ctx.act_bytes
    t = 0.0
    dense, expert = layer_params(md, is_moe, m)
    if is_moe:
        E, local = md.num_experts, md.num_experts // m.ep
        t += sum(linear_seconds(law, ctx.tokens_moe, h, E))  # router
        rows = ctx.tokens_moe * md.topk * ctx.capacity_scale * m.etp * ctx.expert_load
        t += _mlp(law, ctx, rows / local, md.expert_ffn / m.etp, local)
        if md.shared_ffn:
            t += _mlp(law, ctx, T, md.shared_ffn / m.tp)
        kind = "moe_layer"
    else:
        t += _mlp(law, ctx, T, md.ffn_hidden_size / m.tp)
        kind = "dense_layer"
    row_bytes = T * h * b
    moved = (ex.row_passes.get(kind, 0.0) * row_bytes
             + ex.weight_bytes_per_param.get(kind, 0.0) * (dense + expert))
    return t + moved / traffic_bps(ex, row_bytes)


def _edge_terms(ex: ExecutorProfile, ctx: Context) -> tuple[float, float]:
    """(embedding, output layer + loss) device terms, forward + backward, one micro-batch."""
    md, m = ctx.model, ctx.mapping
    T, b = ctx.tokens_attn, ctx.act_bytes
    vocab = embedding_params(md, m.tp) / md.hidden_size
    wbytes = ex.weight_bytes_per_param.get("edge", 0.0)
    table = embedding_params(md, m.tp)
    bps = traffic_bps(ex, T * md.hidden_size * b)
    head = wbytes * table / bps
    tail = sum(linear_seconds(ex.gemm, T, md.hidden_size, vocab))
    tail += ex.row_passes.get("edge", 0.0) * T * vocab * b / bps
    if md.untie_embeddings_and_output_weights:
        tail += wbytes * table / bps
    return head, tail


def _host_and_device(ctx: Context, ops_s: float, device_s: float) -> float:
    """CPU ranks run each op on the host: the terms add. A GPU runs the device terms while
    the host issues the ops: the longer of the two."""
    if ctx.hw.host_launch_s == 0.0:
        return ops_s + device_s
    return max(ops_s, device_s)


def _replaced(c: Cost, compute: float) -> Cost:
    """A copy of `c` with the executor's `compute`; forward/backward split and recompute
    scaled by the same executor/Megatron ratio; communication as it was."""
    out = Cost()
    out.add(c)
    ratio = compute / c.parts["compute"] if c.parts["compute"] > 0 else 1.0
    out.parts["compute"] = compute
    out.parts["recompute"] = c.parts["recompute"] * ratio
    out.fwd_compute, out.bwd_compute = c.fwd_compute * ratio, c.bwd_compute * ratio
    if c.parts["compute"] <= 0:
        out.fwd_compute, out.bwd_compute = compute / 3, 2 * compute / 3
    return out


@dataclass(frozen=True)
class ExecutorContext(Context):
    """A `Context` that also carries the profile's executor measurements."""

    executor: ExecutorProfile | None = None


def with_executor(ctx: Context, profile: Profile | None) -> Context:
    """`ctx` with the executor measurements of the cluster's profile (`executor_blocks` reads
    them); `ctx` itself when the profile has none."""
    if profile is None or profile.executor is None:
        return ctx
    return ExecutorContext(**{f.name: getattr(ctx, f.name) for f in fields(Context)},
                           executor=profile.executor)


def executor_blocks(ctx: Context, blocks: dict[str, Cost]) -> dict[str, Cost]:
    """`estimate._blocks`' answer (one micro-batch: attention, moe, mlp, output, embedding)
    with each block's compute replaced by the executor's (module docstring): attention its
    GEMMs and core; moe / mlp the rest of the layer, its ops included (with the attention,
    host and device terms combined per layer), and the MoE layer's small collectives in
    ep_comm; output the edge's ops, GEMM and traffic; embedding its weight traffic. The
    inputs are not modified (they may be cached). Unchanged without executor measurements."""
    ex = getattr(ctx, "executor", None)
    if ex is None:
        return blocks
    m, us = ctx.mapping, ex.us_per_op * 1e-6
    capacity = ctx.training.moe_expert_capacity_factor is not None
    attn_s = _attention_terms(ex, ctx)
    out = dict(blocks)
    out["attention"] = _replaced(blocks["attention"], wall_s(ctx, attn_s))
    for name, is_moe in (("moe", True), ("mlp", False)):
        if name not in blocks:
            continue
        ops = (moe_layer_ops(ex, m.dispatcher, m.ep, m.etp, capacity,
                             ctx.place["dp_cp"].size > 1) if is_moe else ex.dense_layer_ops)
        layer = _host_and_device(ctx, ops * us, attn_s + _device_terms(ex, ctx, is_moe))
        out[name] = _replaced(blocks[name], wall_s(ctx, layer - attn_s))
        if is_moe:
            out[name].parts["ep_comm"] += _moe_collectives_s(ex, ctx)
    head_s, tail_s = _edge_terms(ex, ctx)
    out["embedding"] = _replaced(blocks["embedding"], wall_s(ctx, _host_and_device(ctx, 0.0,
                                                                                 head_s)))
    out["output"] = _replaced(blocks["output"], wall_s(ctx, _host_and_device(
        ctx, ex.edge_ops * us, tail_s)))
    return out


def step_time(ctx: Context, megatron_s: float) -> float:
    """Seconds of the executor's step outside the micro-batches on pipeline rank 0 (its
    ops, then per parameter: the rest of the step over all its parameters, AdamW over its
    shard, all `wall_s`, and its small collectives); `megatron_s` (the Megatron model's
    optimizer time) without executor measurements."""
    ex = getattr(ctx, "executor", None)
    if ex is None:
        return megatron_s
    md, m = ctx.model, ctx.mapping
    dense = expert = 0.0
    layers = 0
    for slot, count in enumerate(rank_layer_counts(md, m, 0)):
        d, e = layer_params(md, bool(slot % 2), m)
        dense, expert, layers = dense + d * count, expert + e * count, layers + count
    d, e = edge_params(md, m, True, m.pp == 1)
    dense, expert = dense + d, expert + e
    shard = (dense / ctx.place["dp_cp"].size + expert / ctx.place["edp"].size
             if m.distributed_optimizer else dense + expert)
    ops = ex.step_ops + ex.step_ops_per_layer * layers
    # The gradient reduce-scatter and parameter gather (dense; expert with edp > 1) are
    # priced in dp_comm; the step's other collectives by their latency.
    priced = (2.0 if m.distributed_optimizer else 1.0) * (
        (ctx.place["dp_cp"].size > 1) + (ctx.place["edp"].size > 1))
    calls = dict(ex.step_collectives)
    if not m.distributed_optimizer:
        calls["all_reduce"] = max(0.0, calls.get("all_reduce", 0.0) - priced)
        priced = 0.0
    compute = (ops * ex.us_per_op * 1e-6 + (dense + expert) * ex.step_rest_ns_per_param * 1e-9
               + shard * ex.optimizer_ns_per_param * 1e-9)
    return wall_s(ctx, compute) + small_collectives_s(ctx, calls, priced, "dp_cp")
