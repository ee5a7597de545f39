"""Lower bounds that let the search skip most of the space without evaluating it.

A layer configuration l = (tp, cp, ep, etp, micro-batch, recompute, dispatcher) fixes W_l, one
micro-batch through every layer, the embedding and the output layer. For a pipeline
configuration (l, pp, vpp):
- time: the slowest rank takes t_max >= max(W/pp, embedding + one layer, output + one layer)
  per micro-batch, and the step m*t_max + (W - t_max)/vpp grows with t_max, so
  step >= m*t + (W - t)/vpp at that floor t (exact for balanced stages, before data-parallel
  and optimizer time, both non-negative) (`pipeline_bounds`);
- memory: no rank holds less than the mean of the ranks' weights, gradients and optimizer
  state (`cost_model.memory.static_memory_lower_bound`, the same arithmetic as the estimate);
- stage split (pp >= 2, vpp = 1, identical layers): the best integer balance of embedding +
  first-stage layers, middle stages, output + last-stage layers (`split_bound`).
None depends on the rank order or, beyond the choice offered, the optimizer sharding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cost_model.estimate import make_context, micro_batch_costs, micro_batch_work
from cost_model.hardware import hardware
from cost_model.kernels import p2p_time
from cost_model.layout import group_placement
from cost_model.memory import optimizer_shards, pipeline_send_bytes, static_memory_lower_bound
from cost_model.params import stacked_layer_params
from cost_model.specs import Mapping
from cost_model.validate import data_parallel_sizes, mapping_errors


@dataclass(frozen=True)
class LayerConfig:
    tp: int
    cp: int
    ep: int
    etp: int
    micro_batch_size: int
    recompute: str
    dispatcher: str
    probe: Mapping  # the configuration as a resolved pp=1 mapping
    work_s: float  # W: one micro-batch through every layer, embedding and output
    work_floor_s: float  # W of the same layout without recompute (partial recompute's floor)
    layer_params: tuple[float, float]  # (dense, expert) of all layers, one tp / ep x etp shard
    head_s: float  # embedding, one micro-batch
    tail_s: float  # output layer and loss, one micro-batch
    layer_floor_s: float  # the cheapest single layer, one micro-batch
    send_bytes: float  # one pipeline send of activations


@dataclass(frozen=True)
class PipelineBound:
    """A pipeline configuration and the floor on the step time of all its mappings."""

    step_s: float
    lc: LayerConfig
    pp: int
    vpp: int


def layer_configs(model, cluster, training, values, cache: dict) -> list[LayerConfig]:
    """Every valid layer configuration with its costs."""
    world = cluster.world_size
    hw = hardware(cluster)
    out = []
    for tp in values["tp"]:
        for cp in values["cp"]:
            if world % (tp * cp):
                continue
            for ep in values["ep"]:
                for etp in values["etp"]:
                    if world % (ep * etp):
                        continue
                    for mbs in values["micro_batch_size"]:
                        for rc in values["recompute"]:
                            for disp in values["dispatcher"]:
                                dp, edp = data_parallel_sizes(world, tp, cp, ep, etp, 1)
                                probe = Mapping(tp=tp, cp=cp, ep=ep, etp=etp, micro_batch_size=mbs,
                                                recompute=rc, dispatcher=disp, pp=1, dp=dp,
                                                edp=edp)
                                errors, probe = mapping_errors(model, cluster, training, probe)
                                # Only errors about the layer itself disqualify it here.
                                if any(e.kind == "layer" for e in errors):
                                    continue
                                out.append(_layer_config(model, cluster, training, probe, hw,
                                                         cache))
    return out


def _layer_config(model, cluster, training, probe: Mapping, hw, cache: dict) -> LayerConfig:
    ctx = make_context(model, cluster, training, probe, hw)
    w = micro_batch_work(ctx, cache)
    floor_ctx = ctx
    if probe.recompute == "full":
        plain = probe.model_copy(update={"recompute": "none"})
        floor_ctx = make_context(model, cluster, training, plain, hw)
    floor = micro_batch_work(floor_ctx, cache)
    layers, head, tail = micro_batch_costs(floor_ctx, cache)
    return LayerConfig(
        probe.tp, probe.cp, probe.ep, probe.etp, probe.micro_batch_size, probe.recompute,
        probe.dispatcher, probe, w, floor, stacked_layer_params(model, probe), head.total,
        tail.total, min(c.total for c in layers.values()),
        pipeline_send_bytes(model, training, probe))


def memory_lower_bound(model, training, lc: LayerConfig, pp: int, dp: int, edp: int,
                       sharded: bool, hw) -> float:
    """Peak memory of every mapping of (lc, pp) is at least this (module docstring)."""
    m = lc.probe.model_copy(update={"pp": pp, "dp": dp, "edp": edp,
                                    "distributed_optimizer": sharded})
    return static_memory_lower_bound(model, training.precision, m, pp, optimizer_shards(m),
                                     hw.memory_reserve_bytes, lc.layer_params)


def _send_time(cluster, values, lc: LayerConfig, pp: int, dp: int, hw) -> float:
    """Both pipeline sends of one micro-batch on the cheaper of the rank orders' links."""
    crosses = min(group_placement(cluster.world_size, cluster.gpus_per_node, o,
                                  (lc.tp, lc.cp, 1, dp, pp), "pp").crosses_node
                  for o in values["order"])
    return 2 * p2p_time(hw, crosses, lc.send_bytes)


def pipeline_bounds(model, cluster, training, values, configs):
    """([PipelineBound], best bound first; the smallest memory bound among the configurations
    it pruned, as (bytes, layer config, pp))."""
    world, gbs = cluster.world_size, training.global_batch_size
    hw = hardware(cluster)
    sharded = True in values["distributed_optimizer"]
    closest: tuple = (math.inf, None, 0)
    out = []
    for lc in configs:
        for pp in values["pp"]:
            if world % (lc.tp * lc.cp * pp) or world % (lc.etp * lc.ep * pp):
                continue
            dp, edp = data_parallel_sizes(world, lc.tp, lc.cp, lc.ep, lc.etp, pp)
            if gbs % (lc.micro_batch_size * dp):
                continue
            need = memory_lower_bound(model, training, lc, pp, dp, edp, sharded, hw)
            if need > hw.memory_bytes:
                if need < closest[0]:
                    closest = (need, lc, pp)
                continue  # no expansion of it can fit
            m = gbs // (lc.micro_batch_size * dp)
            sends = _send_time(cluster, values, lc, pp, dp, hw) if pp > 1 else 0.0
            for vpp in values["vpp"] if pp > 1 else [1]:
                if vpp > 1 and (model.num_layers % (pp * vpp) or m % pp):
                    continue
                # Partial recompute (pp >= 2, vpp == 1) can be as fast as none at all.
                w = (lc.work_floor_s if (pp >= 2 and vpp == 1) else lc.work_s) + pp * sends
                # The slowest rank holds at least the mean, and the first and last ranks at
                # least one layer besides the embedding / output layer.
                t_max = w / pp
                if pp > 1:
                    t_max = max(t_max, lc.head_s + lc.layer_floor_s + sends,
                                lc.tail_s + lc.layer_floor_s + sends)
                out.append(PipelineBound(m * t_max + (w - t_max) / vpp, lc, pp, vpp))
    out.sort(key=lambda b: b.step_s)
    return out, closest


def split_bound(model, cluster, training, values, lc: LayerConfig, pp: int) -> float:
    """A lower bound on every stage split of (lc, pp, vpp=1), memory ignored (module
    docstring); 0 (no bound) for models whose layers differ."""
    L = model.num_layers
    if model.num_moe_layers not in (0, L):
        return 0.0
    dp, _ = data_parallel_sizes(cluster.world_size, lc.tp, lc.cp, lc.ep, lc.etp, pp)
    m = training.global_batch_size // (lc.micro_batch_size * dp)
    sends = _send_time(cluster, values, lc, pp, dp, hardware(cluster))
    t, head, tail = lc.layer_floor_s, lc.head_s, lc.tail_s
    best = math.inf
    for k in range(0 if pp == 2 else 1, L + 1):
        rest = L - (pp - 2) * k
        if rest < 2 or (pp == 2 and k):
            break
        ideal = (rest * t + tail - head) / (2 * t)
        for n_f in {max(1, min(rest - 1, math.floor(ideal))), max(1, min(rest - 1, math.ceil(ideal)))}:
            best = min(best, max(head + n_f * t, tail + (rest - n_f) * t, k * t))
    w = lc.work_floor_s + pp * sends
    return (m - 1) * (best + sends) + w
