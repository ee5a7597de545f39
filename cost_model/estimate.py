"""One training step: time, memory and where the time goes.

step = m * t_max + bubble + exposed data-parallel communication + optimizer, where m is the
number of micro-batches, t_max the per-micro-batch time of the slowest pipeline rank (layers,
plus embedding on the first and output layer on the last rank, plus its pipeline sends), and
bubble = (sum of all ranks' per-micro-batch times - t_max) / vpp: fill and drain of 1F1B,
shrunk by interleaving.

Overlap assumptions (Megatron-Core with --overlap-grad-reduce and --overlap-param-gather):
gradient reduce-scatter runs under the backward of the last micro-batch, parameter all-gather
under the forward of the first; only what exceeds that window is exposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, Field

from .flops import mfu, model_flops_per_step, tflops_per_gpu
from .foldplan_runtime import executor_blocks, with_executor
from .foldplan_runtime import step_time as executor_step_time
from .dispatch import overlapped_comm
from .hardware import Hardware, fp8_gemm_key, hardware
from .kernels import memory_time, p2p_time, ring_time
from .layers import COMPONENTS, Context, Cost, attention_cost, dense_mlp_cost, embedding_cost
from .layers import (host_bound, logits_cost, moe_cost, moe_gemms, moe_layer_cost, mtp_block,
                     mtp_compute, mtp_logits, with_mtp, with_offload)
from .layout import GroupPlacement, group_placement
from .memory import ADAM_STEP_BYTES, GIB, GRAD_BYTES, RankMemory, activation_element_bytes
from .memory import (inflight_chunks, mtp_rank, pipeline_send_bytes, plain_mapping,
                     rank_layer_counts)
from .memory import offloaded_bytes_per_layer, rank_memory
from .params import edge_params, layer_params, mtp_last_kind
from .profile_model import step_time_scale
from .specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from .validate import resolve_mapping

BREAKDOWN_KEYS = COMPONENTS + ("bubble", "dp_comm", "optimizer")


class MemoryEstimate(BaseModel):
    """Memory per GPU on the worst pipeline rank, GiB."""

    peak_gib: float = Field(..., description="Total on the worst pipeline rank.")
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    buffers_gib: float = Field(
        ..., description="Allowance: the GPU's fixed reserve (2 GiB on GPUs) + 5% of the rest."
    )
    capacity_gib: float = Field(..., description="What one GPU offers.")
    worst_stage: int = Field(..., description="Pipeline rank with the peak.")
    per_stage_gib: list[float] = Field(..., description="Total per pipeline rank.")


class Estimate(BaseModel):
    """The estimate object of CONTRACT.md."""

    step_time_s: float
    mfu: float = Field(..., description="Megatron-LM FLOPs / (time * GPUs * peak).")
    model_flops_per_step: float
    tflops_per_gpu: float
    tokens_per_s: float
    fits_memory: bool
    memory: MemoryEstimate
    breakdown: dict[str, float] = Field(..., description="Seconds per component; sums to step.")
    num_microbatches: int
    expert_load_factor: float = Field(..., description="Busiest expert rank's load over mean.")
    traffic_bytes: dict[str, float] = Field(
        default_factory=dict, description="Bytes one GPU sends per step by the group kind that "
        "carries them (tp, cp, ep, etp, tp_ep, pp, dp_cp, edp; the slowest pipeline rank, "
        "gradient and parameter traffic of the first), exposed or hidden: what each group puts "
        "on the links it crosses (/v1/layout `tiers` says which).")


def _placements(cluster: ClusterSpec, hw: Hardware, m: Mapping) -> dict:
    """Where each group of `m` sits (read-only: shared between mappings with these sizes)."""
    return _placements_of(cluster.world_size, hw.gpus_per_domain, hw.tier_units, m.order,
                          (m.tp, m.cp, 1, m.dp, m.pp), (m.etp, 1, m.ep, m.edp, m.pp))


@lru_cache(maxsize=65_536)
def _placements_of(w: int, d: int, units: tuple, order: str, dense: tuple,
                   expert: tuple) -> dict:
    """`_placements`, kept: a pure function of the sizes, the links and the rank order."""
    return {
        "tp": group_placement(w, d, units, order, dense, "tp"),
        "cp": group_placement(w, d, units, order, dense, "cp"),
        "dp_cp": group_placement(w, d, units, order, dense, "dp-cp"),
        "pp": group_placement(w, d, units, order, dense, "pp"),
        "ep": group_placement(w, d, units, order, expert, "ep"),
        "etp": group_placement(w, d, units, order, expert, "tp"),
        "edp": group_placement(w, d, units, order, expert, "dp"),
        "tp_ep": group_placement(w, d, units, order, expert, "tp-ep"),
    }


def _expert_load(model: ModelSpec, training: TrainingSpec, m: Mapping) -> tuple[float, float]:
    """(busiest rank's load over the mean, fraction of assignments kept).

    Dropless: the busiest expert carries `moe_expert_load_imbalance` x the mean; its excess is
    spread over the E/ep experts of its rank. With a capacity factor c every expert is capped
    at c x its mean share (capacity per source rank), so the busiest carries min(imbalance, c).
    """
    if not model.is_moe:
        return 1.0, 1.0
    local = model.num_experts // m.ep
    imb = training.moe_expert_load_imbalance
    c = training.moe_expert_capacity_factor
    if c is None:
        return (imb + local - 1) / local, 1.0
    kept = min(1.0, c)
    busiest = min(imb, c)
    return (busiest + (local - 1) * kept) / local / kept, kept


def make_context(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, m: Mapping,
                 hw: Hardware) -> Context:
    load, kept = _expert_load(model, training, m)
    b, s = m.micro_batch_size, training.seq_length
    ctx = Context(
        model=model, training=training, mapping=m, hw=hw,
        prec=fp8_gemm_key(training.fp8_recipe) if training.precision == "fp8"
        else training.precision,
        act_bytes=activation_element_bytes(training.precision),
        tokens_attn=b * s / m.cp,
        tokens_moe=b * s / (m.cp * m.tp),
        expert_load=load, capacity_scale=kept,
        place=_placements(cluster, hw, m),
    )
    if training.runtime == "foldplan":  # runtime 'foldplan': foldplan_runtime.py
        ctx = with_executor(ctx, cluster.profile)
    return ctx


def _rank_cost(ctx: Context, slot_costs: list, rank: int,
               counts: tuple[int, int, int, int], head: Cost, tail: Cost,
               mtp: tuple[int, Cost] | None = None) -> Cost:
    """One micro-batch on pipeline rank `rank`; `slot_costs` match `rank_layer_counts`;
    `mtp` = (rank, cost) of MTP layers a custom layout runs away from the last rank."""
    m = ctx.mapping
    c = Cost()
    for slot, count in enumerate(counts):
        if count:
            c.add(slot_costs[slot], count)
    if rank == 0:
        c.add(head)
    if rank == m.pp - 1:
        c.add(tail)
    if mtp is not None and rank == mtp[0]:
        c.add(mtp[1])
    if m.pp > 1:
        # Activation forward and its gradient backward on the critical path; the extra sends
        # of interleaved chunks overlap compute (--overlap-p2p-communication).
        c.parts["pp_comm"] += pipeline_sends_time(ctx)
        c.sent["pp"] = 2 * pipeline_send_bytes(ctx.model, ctx.training, m)
    return c


def pipeline_sends_time(ctx: Context) -> float:
    """Seconds of one micro-batch's pipeline sends on one rank (activation forward, its
    gradient backward) over the pp group's link."""
    send = pipeline_send_bytes(ctx.model, ctx.training, ctx.mapping)
    return 2 * p2p_time(ctx.hw, ctx.place["pp"], send)


def _dp_comm(ctx: Context, fwd_window: float,
             bwd_window: float) -> tuple[float, float, dict[str, float]]:
    """(exposed gradient reduction + parameter gather seconds, optimizer step seconds,
    bytes rank 0 sends for them by group kind: dp_cp, edp)."""
    md, m = ctx.model, ctx.mapping
    dense = expert = 0.0
    for slot, count in enumerate(rank_layer_counts(md, m, 0)):
        if not count:
            continue
        d, e = layer_params(md, bool(slot % 2), m)
        dense, expert = dense + d * count, expert + e * count
    # Rank 0 (the last to finish its backward) also holds the embedding.
    dense += edge_params(md, m, True, False)[0]
    reduce, gather, optimizer, sent = dp_comm_times(
        ctx.hw, ctx.place["dp_cp"], ctx.place["edp"], dense, expert, ctx.act_bytes,
        m.distributed_optimizer)
    return dp_exposed(reduce, gather, m.distributed_optimizer, fwd_window,
                      bwd_window), optimizer, sent


def dp_comm_times(hw: Hardware, pd: GroupPlacement, pe: GroupPlacement, dense: float,
                  expert: float, param_bytes: float,
                  distributed: bool) -> tuple[float, float, float, dict[str, float]]:
    """(gradient reduction seconds, parameter gather seconds, optimizer step seconds, bytes
    sent by group kind) of rank 0 holding `dense` and `expert` parameters, its data-parallel
    groups placed as `pd` (dense, over dp x cp) and `pe` (expert, over edp): fp32 gradients
    reduce-scattered (all-reduced without the distributed optimizer), bf16 parameters
    all-gathered with it. All non-decreasing in the parameters."""
    grad_bytes = GRAD_BYTES

    def frac(p):
        return (p.size - 1) / p.size if p.size > 1 else 0.0

    reduce = ring_time(hw, pd, dense * grad_bytes * frac(pd)) + ring_time(
        hw, pe, expert * grad_bytes * frac(pe))
    if distributed:
        gather = ring_time(hw, pd, dense * param_bytes * frac(pd)) + ring_time(
            hw, pe, expert * param_bytes * frac(pe))
        local = dense / pd.size + expert / pe.size
        sent = {"dp_cp": dense * (grad_bytes + param_bytes) * frac(pd),
                "edp": expert * (grad_bytes + param_bytes) * frac(pe)}
    else:
        gather = 0.0
        local = dense + expert
        sent = {"dp_cp": 2 * dense * grad_bytes * frac(pd),
                "edp": 2 * expert * grad_bytes * frac(pe)}
    return reduce, gather, memory_time(hw, local * ADAM_STEP_BYTES), sent


def dp_exposed(reduce: float, gather: float, distributed: bool, fwd_window: float,
               bwd_window: float) -> float:
    """What of `dp_comm_times` is exposed: the reduction runs under the last micro-batch's
    backward (`bwd_window`), the gather under the first one's forward (`fwd_window`); without
    the distributed optimizer the all-reduce (twice a reduce-scatter's time) under the
    backward. Non-increasing in the windows."""
    if distributed:
        return max(0.0, reduce - bwd_window) + max(0.0, gather - fwd_window)
    return max(0.0, 2 * reduce - bwd_window)


@dataclass(frozen=True)
class StepResult:
    """The raw answer for a resolved mapping (no pydantic: the planner makes thousands)."""

    step_time_s: float
    breakdown: dict[str, float]
    per_rank_memory: list[RankMemory]
    worst_stage: int
    capacity_bytes: float
    num_microbatches: int
    expert_load: float
    traffic: dict[str, float]  # bytes one GPU sends per step by group kind (`Estimate`)

    @property
    def peak_bytes(self) -> float:
        return self.per_rank_memory[self.worst_stage].total

    @property
    def fits_memory(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes


def layer_cost_key(m: Mapping) -> tuple:
    """The mapping fields a layer's cost depends on (its groups' placement included: with
    the rank order fixed, tp/cp/ep/etp groups sit the same whatever dp and pp are)."""
    # In both standard orders tp, cp and ep come before dp and pp: same tp/cp/ep/etp groups.
    order = "standard" if m.order in ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp") else m.order
    return (m.tp, m.cp, m.ep, m.etp, m.micro_batch_size, m.sp, recompute_key(m), m.dispatcher,
            m.flex_backend, m.moe_a2a_overlap, m.offload_modules, order)


def recompute_key(m: Mapping) -> tuple:
    """The recompute fields a block's cost depends on."""
    return (m.recompute, m.recompute_modules if m.recompute == "selective" else ())


def _blocks(ctx: Context, cache: dict) -> dict[str, Cost]:
    """One micro-batch's blocks before they are joined into layers: attention, moe, mlp (as
    the model has them), output and embedding; kept in `cache` under the mapping fields they
    depend on: all but the MoE block under (tp, cp, micro-batch, sp, rank order, recompute),
    the MoE block under its expert layout and dispatcher too."""
    m, model = ctx.mapping, ctx.model
    base = (m.tp, m.cp, m.micro_batch_size, m.sp, layer_cost_key(m)[-1])
    rc = recompute_key(m)
    key = ("blocks",) + base + (rc,)
    dense = cache.get(key)
    if dense is None:
        # The shared experts do not depend on the expert layout: one cost per recompute.
        dense = {"attention": attention_cost(ctx),
                 "shared": dense_mlp_cost(ctx, model.shared_ffn, "shared_experts")
                 if model.num_moe_layers and model.shared_ffn else None}
        if model.num_layers - model.num_moe_layers:
            dense["mlp"] = dense_mlp_cost(ctx, model.ffn_hidden_size)
        dense["output"] = host_bound(ctx.hw, logits_cost(ctx))
        dense["embedding"] = embedding_cost(ctx)
        cache[key] = dense
    out = {k: v for k, v in dense.items() if k != "shared"}
    if model.num_moe_layers:
        # Nor do the experts' GEMMs on the dispatcher or recompute: once per expert layout.
        gk = ("moe_gemms",) + base + (m.ep, m.etp)
        gemms = cache.get(gk)
        if gemms is None:
            gemms = cache[gk] = moe_gemms(ctx)
        mk = ("moe",) + base + (rc, m.ep, m.etp, m.dispatcher, m.flex_backend)
        moe = cache.get(mk)
        if moe is None:
            moe = cache[mk] = moe_cost(ctx, dense["shared"], gemms)
        out["moe"] = moe
    if ctx.training.runtime == "foldplan":  # runtime 'foldplan': foldplan_runtime.py
        out = executor_blocks(ctx, out)
    return out


def micro_batch_costs(ctx: Context, cache: dict | None = None):
    """({is_moe: one layer's Cost}, embedding Cost, output Cost) for one micro-batch.

    With a `cache`, each block's cost is kept under the mapping fields it depends on, so the
    planner pays for attention once per (tp, cp, micro-batch, recompute), not per expert
    layout."""
    cache = {} if cache is None else cache
    m = ctx.mapping
    key = layer_cost_key(m)
    if key in cache:
        return cache[key]
    model = ctx.model
    blocks = _blocks(ctx, cache)
    layer_costs: dict[bool, Cost] = {}
    if "moe" in blocks:
        layer_costs[True] = moe_layer_cost(ctx, blocks["attention"], blocks["moe"])
    if "mlp" in blocks:
        c = Cost()
        c.add(blocks["attention"])
        c.add(blocks["mlp"])
        layer_costs[False] = c
    if m.offload_modules:
        load = ctx.expert_load * ctx.capacity_scale
        for kind, c in layer_costs.items():
            with_offload(ctx, c, offloaded_bytes_per_layer(model, ctx.training, m, kind,
                                                           ctx.act_bytes, load))
    layer_costs = {kind: host_bound(ctx.hw, c) for kind, c in layer_costs.items()}
    output = blocks["output"]
    if model.mtp_num_layers:
        output = with_mtp(ctx, output, layer_costs[mtp_last_kind(model)])
    out = (layer_costs, blocks["embedding"], output)
    cache[key] = out
    return out


def micro_batch_floor(ctx: Context, cache: dict) -> tuple[dict[bool, float], float, float,
                                                         tuple]:
    """Floors of `micro_batch_costs` (layer totals by kind, embedding, output) over every
    mapping that shares ctx.mapping's tp, cp, ep, etp, micro-batch size, dispatcher and rank
    order, whatever its recompute, recompute modules, flex backend or overlap; and their
    forward / backward compute, the same for all of them: ((layer, the larger kind), the
    embedding, the output) as (forward, backward) pairs.

    Why they are floors: `ctx.mapping` has no recompute and no overlap. A block's `compute`
    part (its forward and backward) and its context-parallel exchange do not depend on those
    options; its tensor-parallel collectives are fewest without recompute (full recompute
    gathers again) and its expert all-to-alls too (a recomputed MoE block dispatches again),
    unless the overlap hides them: the smaller of the plain and the overlapped exposure
    (with the overlap's slowdown) is counted. Everything else they change only adds to a
    layer (recompute), and `host_bound` keeps each layer at least its launches' host time,
    which they do not change either; the embedding and output layer depend on none of them
    (an MTP module counts at its layer's floor)."""
    blocks = _blocks(ctx, cache)
    layers: dict[bool, float] = {}
    names = {True: "moe", False: "mlp"}
    fb: dict[bool, tuple[float, float]] = {}  # a layer's forward and backward compute
    for kind, name in names.items():
        if name in blocks:
            attn, block = blocks["attention"], blocks[name]
            fb[kind] = (attn.fwd_compute + block.fwd_compute, attn.bwd_compute + block.bwd_compute)
            comm = sum(c.parts[k] for c in (attn, block) for k in ("tp_comm", "cp_comm"))
            if kind and block.parts["ep_comm"]:
                plain = block.parts["ep_comm"]
                exposed, slowdown = overlapped_comm(
                    plain / 4, (attn.fwd_compute, attn.bwd_compute),
                    (block.fwd_compute, block.bwd_compute), ctx.hw.flex_sm_share)
                comm += min(plain, exposed + slowdown)
            layers[kind] = max(attn.parts["compute"] + block.parts["compute"] + comm,
                               (attn.launches + block.launches) * ctx.hw.host_launch_s)
    num = ctx.model.mtp_num_layers or 0
    tail = blocks["output"]
    output = tail.total * (1 + num)
    tail_fb = (tail.fwd_compute, tail.bwd_compute)
    if num:
        kind = mtp_last_kind(ctx.model)
        output += num * layers[kind]
        tail_fb = mtp_compute(ctx, tail, fb[kind])  # the layer the MTP modules repeat
    head = blocks["embedding"]
    windows = ((max(f for f, _ in fb.values()), max(b for _, b in fb.values())),
               (head.fwd_compute, head.bwd_compute), tail_fb)
    return layers, head.total, output, windows


def work_of(model: ModelSpec, layer_costs: dict[bool, Cost], head: Cost, tail: Cost) -> float:
    """W: one micro-batch through every layer, the embedding and the output layer, from
    `micro_batch_costs`' answer."""
    num_moe = model.num_moe_layers
    w = head.total + tail.total
    for is_moe, c in layer_costs.items():
        w += c.total * (num_moe if is_moe else model.num_layers - num_moe)
    return w


def evaluate(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
             m: Mapping, cache: dict | None = None) -> StepResult:
    """Step time and memory of a mapping already resolved by `validate.resolve_mapping`.

    `cache` (a dict the caller keeps for one model x cluster x training) reuses per-layer
    costs between mappings that share `layer_cost_key`; results are identical without it.
    """
    hw = hardware(cluster)
    ctx = make_context(model, cluster, training, m, hw)
    layer_costs, head, tail = micro_batch_costs(ctx, cache)
    if m.partial_recompute:  # layers past the first N of a chunk keep their activations
        plain, _, _ = micro_batch_costs(
            make_context(model, cluster, training, plain_mapping(m), hw), cache)
    else:
        plain = layer_costs
    slot_costs = [plain.get(False), plain.get(True), layer_costs.get(False), layer_costs.get(True)]
    counts = [rank_layer_counts(model, m, r) for r in range(m.pp)]
    mtp_at = mtp_rank(model, m)
    mtp = None
    if mtp_at != m.pp - 1:  # a custom layout runs the MTP layers on another rank
        output = _blocks(ctx, cache if cache is not None else {})["output"]
        tail = mtp_logits(ctx, output)
        mtp = (mtp_at, mtp_block(ctx, layer_costs[mtp_last_kind(model)]))
    # Ranks with the same layers and no embedding/output cost the same: compute each once.
    memo: dict[tuple, Cost] = {}
    ranks = []
    for r in range(m.pp):
        key = (counts[r], r == 0, r == m.pp - 1, r == mtp_at)
        if key not in memo:
            memo[key] = _rank_cost(ctx, slot_costs, r, counts[r], head, tail, mtp)
        ranks.append(memo[key])
    totals = [r.total for r in ranks]
    slow = max(range(m.pp), key=lambda r: totals[r])
    num_mb = training.global_batch_size // (m.micro_batch_size * m.dp)

    breakdown = {k: num_mb * v for k, v in ranks[slow].parts.items()}
    breakdown["bubble"] = (sum(totals) - totals[slow]) / m.vpp
    windows = (ranks[0].fwd_compute, ranks[0].bwd_compute) if hw.comm_overlap else (0.0, 0.0)
    dp_exposed, opt, dp_sent = _dp_comm(ctx, *windows)
    breakdown["dp_comm"] = dp_exposed
    breakdown["optimizer"] = opt
    if training.runtime == "foldplan":  # runtime 'foldplan': foldplan_runtime.py
        breakdown["optimizer"] = executor_step_time(ctx, opt)
    traffic = {k: num_mb * v for k, v in ranks[slow].sent.items() if v} | {
        k: v for k, v in dp_sent.items() if v}

    # Ranks with the same layers differ only in micro-batches in flight.
    per_rank: list[RankMemory] = []
    seen: dict[tuple, tuple[int, RankMemory]] = {}
    for r in range(m.pp):
        key = (counts[r], r == 0, r == m.pp - 1, r == mtp_at)
        if key not in seen or m.offload_modules:  # offloading: not linear in the chunks
            seen[key] = (r, rank_memory(model, training, m, r, ctx.act_bytes,
                                        ctx.expert_load * ctx.capacity_scale, num_mb, counts[r],
                                        hw.memory_reserve_bytes))
            per_rank.append(seen[key][1])
        else:
            r0, mem0 = seen[key]
            extra = inflight_chunks(m, r, num_mb) - inflight_chunks(m, r0, num_mb)
            per_rank.append(mem0.with_chunks(extra))
    worst = max(range(m.pp), key=lambda r: per_rank[r].total)
    return StepResult(
        step_time_s=sum(breakdown.values()), breakdown=breakdown, per_rank_memory=per_rank,
        worst_stage=worst, capacity_bytes=hw.memory_bytes, num_microbatches=num_mb,
        expert_load=ctx.expert_load, traffic=traffic,
    )


def to_estimate(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
                r: StepResult) -> Estimate:
    hw = hardware(cluster)
    scale = step_time_scale(cluster.profile)  # a verification's correction (profile_model)
    step = r.step_time_s * scale
    wm = r.per_rank_memory[r.worst_stage]
    flops = model_flops_per_step(model, training)
    n = cluster.world_size
    return Estimate(
        step_time_s=step,
        mfu=mfu(flops, step, n, hw.mfu_peak_flops(training.precision)),
        model_flops_per_step=flops,
        tflops_per_gpu=tflops_per_gpu(flops, step, n),
        tokens_per_s=training.tokens_per_step / step,
        fits_memory=r.fits_memory,
        memory=MemoryEstimate(
            peak_gib=wm.total / GIB,
            weights_gib=wm.weights / GIB,
            gradients_gib=wm.gradients / GIB,
            optimizer_gib=wm.optimizer / GIB,
            activations_gib=wm.activations / GIB,
            buffers_gib=wm.buffers / GIB,
            capacity_gib=r.capacity_bytes / GIB,
            worst_stage=r.worst_stage,
            per_stage_gib=[x.total / GIB for x in r.per_rank_memory],
        ),
        breakdown={k: v * scale for k, v in r.breakdown.items()},
        num_microbatches=r.num_microbatches,
        expert_load_factor=r.expert_load,
        traffic_bytes=r.traffic,
    )


def estimate(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec,
             mapping: Mapping) -> Estimate:
    """Predict one step of `mapping`. Raises validate.InvalidMapping for invalid mappings."""
    m = resolve_mapping(model, cluster, training, mapping)
    return to_estimate(model, cluster, training, evaluate(model, cluster, training, m))
