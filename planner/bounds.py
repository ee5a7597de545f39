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
- stage split (pp >= 2, vpp = 1): the best integer balance of embedding + first-stage
  layers, middle stages, output + last-stage layers, each layer at its kind's cost without
  recompute (`split_bound`).
None depends on the rank order or, beyond the choice offered, the optimizer sharding.
Layer configurations that share sizes, micro-batch and dispatcher start as one group at a
floor over all of them (`layer_configs`); when the search reaches it, the members without
recompute are costed and the others wait as a group at the smallest of their bounds
(`without_recompute`): recompute only adds time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import product

import numpy as np

from cost_model.estimate import dp_comm_times, dp_exposed, make_context, micro_batch_costs
from cost_model.estimate import micro_batch_floor, work_of
from cost_model.hardware import hardware
from cost_model.kernels import p2p_time
from cost_model.layout import group_placement
from cost_model.memory import activation_element_bytes, optimizer_shards_of, pipeline_send_bytes
from cost_model.memory import static_memory_lower_bound
from cost_model.params import edge_params, layer_params, stacked_layer_params
from cost_model.stage_split import StageSplitError, parse_layout, stage_layer_counts
from cost_model.specs import Mapping
from cost_model.option_rules import option_errors
from cost_model.validate import data_parallel_sizes, mapping_errors


@dataclass(slots=True)  # read-only by use; not frozen: the search makes thousands
class LayerConfig:
    tp: int
    cp: int
    ep: int
    etp: int
    micro_batch_size: int
    probe: Mapping  # the configuration as a resolved pp=1 mapping (every per-layer option)
    work_s: float  # W: one micro-batch through every layer, embedding and output
    work_floor_s: float  # W of the same layout without recompute (partial recompute's floor)
    layer_params: tuple[float, float]  # (dense, expert) of all layers, one tp / ep x etp shard
    head_s: float  # embedding, one micro-batch
    tail_s: float  # output layer and loss, one micro-batch
    layer_floor_s: float  # the cheapest single layer, one micro-batch
    kind_floor_s: tuple[float, float]  # (dense, MoE) layer without recompute, one micro-batch
    send_bytes: float  # one pipeline send of activations
    # Compute (forward, backward) of one micro-batch, which no option of the group changes:
    # the most of one layer, and of the embedding and the output layer: the data-parallel
    # overlap windows are at most these (`_dp_floor`).
    layer_window_s: tuple[float, float]
    head_window_s: tuple[float, float]
    tail_window_s: tuple[float, float]
    # A group of configurations not costed yet (`layer_configs`): the option sets that share
    # this one's sizes, micro-batch and dispatcher; the times above are floors over all of
    # them (`cost_model.estimate.micro_batch_floor`). None: a costed configuration.
    options: tuple | None = None

    @property
    def is_group(self) -> bool:
        return self.options is not None


@dataclass(slots=True)  # read-only by use (as LayerConfig)
class PipelineBound:
    """A pipeline configuration and the floor on the step time of all its mappings."""

    step_s: float
    lc: LayerConfig
    pp: int
    vpp: int


_OPTION_FIELDS = ("micro_batch_size", "recompute", "recompute_modules", "dispatcher",
                  "flex_backend", "moe_a2a_overlap")  # the keys of `layer_options`' dicts


def layer_options(values) -> list[dict]:
    """The per-layer option combinations of the space (recompute modules only with selective
    recompute; the overlap only where the dispatcher can overlap)."""
    out = []
    for mbs, rc, disp, overlap in product(values["micro_batch_size"], values["recompute"],
                                          values["dispatcher"], values["moe_a2a_overlap"]):
        if overlap and disp == "allgather":
            continue
        modules = values["recompute_modules"] if rc == "selective" else [("core_attn",)]
        backends = values["flex_backend"] if disp == "flex" else ["deepep"]
        for mods, backend in product(modules, backends):
            out.append(dict(zip(_OPTION_FIELDS, (mbs, rc, mods, disp, backend, overlap))))
    return out


def layer_configs(model, cluster, training, values, cache: dict,
                  deadline: float = math.inf) -> list[LayerConfig] | None:
    """Every valid layer configuration, as groups: the options that share sizes, micro-batch
    and dispatcher form one group, costed only by its floor (`LayerConfig.options`; the
    search costs its members with `group_members` when the floor's bound says they can
    matter). Groups of one option are costed at once. None when `deadline` (a
    `time.perf_counter()` value) passes first."""
    world = cluster.world_size
    hw = hardware(cluster)
    by_group: dict[tuple, list[dict]] = {}
    for opts in layer_options(values):
        by_group.setdefault((opts["micro_batch_size"], opts["dispatcher"]), []).append(opts)
    out = []
    for tp, cp, ep, etp in product(values["tp"], values["cp"], values["ep"], values["etp"]):
        if world % (tp * cp) or world % (ep * etp):
            continue
        if time.perf_counter() > deadline:
            return None
        dp, edp = data_parallel_sizes(world, tp, cp, ep, etp, 1)
        sizes = dict(tp=tp, cp=cp, ep=ep, etp=etp, pp=1, dp=dp, edp=edp)
        checked: dict[str, tuple] = {}  # dispatcher -> (errors, probe) of its first group
        for (mbs, disp), members in by_group.items():
            if disp in checked:
                # The micro-batch size changes only "batch" errors (not read here) and no
                # resolved field: the dispatcher's first group's answer, with this size.
                errors, first = checked[disp]
                probe = first.model_copy(update={"micro_batch_size": mbs})
            else:
                rep = dict(micro_batch_size=mbs, recompute="none", dispatcher=disp,
                           moe_a2a_overlap=False)
                errors, probe = mapping_errors(model, cluster, training, Mapping(**sizes, **rep))
                errors = [e for e in errors if e.kind != "batch"]
                checked[disp] = (errors, probe)
            if any(e.kind == "layer" for e in errors):
                break  # about the sizes alone: no option of any group makes them valid
            if any(e.kind == "option" for e in errors) or len(members) == 1:
                # No floor to stand for the group: cost its members now.
                out += _costed(model, cluster, training, probe, members, hw, cache)
                continue
            out.append(_group_floor(model, cluster, training, probe, tuple(members), hw, cache))
    return out


def group_members(model, cluster, training, group: LayerConfig, cache: dict) -> list[LayerConfig]:
    """The costed configurations a group stands for (the valid ones)."""
    return _costed(model, cluster, training, group.probe, group.options, hardware(cluster),
                   cache)


def without_recompute(group: LayerConfig) -> tuple[LayerConfig, LayerConfig | None]:
    """(the group's members without recompute, the others) as two groups; (group, None) when
    one of them would be empty. Why the others can wait (`recompute_bounds`): recompute only
    adds time to a layer (its forward again, and with full recompute its gathers and
    dispatches again), and a member with recompute is valid and allowed with a pipeline
    wherever the same member without it is (no rule of kind "pipeline" reads recompute;
    those of kind "option" only refuse more with it)."""
    base = tuple(o for o in group.options if o["recompute"] == "none")
    rest = tuple(o for o in group.options if o["recompute"] != "none")
    if not base or not rest:
        return group, None
    return replace(group, options=base), replace(group, options=rest)


def recompute_bounds(rest: LayerConfig, base_bounds: list[PipelineBound]) -> list[PipelineBound]:
    """`rest` (`without_recompute`'s second group) at the smallest bound of the members
    without recompute, per (pp, vpp): no member of `rest` has a smaller one. Of partial
    recompute's floor (pp >= 2, vpp = 1) too: the same mapping without recompute."""
    best: dict[tuple[int, int], float] = {}
    for b in base_bounds:
        key = (b.pp, b.vpp)
        best[key] = min(best.get(key, math.inf), b.step_s)
    # A recompute that adds nothing sums the same costs in another order: allow for rounding.
    return [PipelineBound(s * (1 - 1e-12), rest, pp, vpp) for (pp, vpp), s in best.items()]


def _valid_probe(model, cluster, training, probe: Mapping, opts: dict) -> Mapping | None:
    """`probe` (a resolved pp=1 mapping whose sizes have no error of kind "layer") with the
    options `opts`; None when Megatron's rules on options refuse them (kind "option"; the
    pipeline and batch are not chosen yet: rules on pp / vpp are kind "pipeline"). What
    `mapping_errors` would answer: its other rules read the sizes alone, the option rules
    no derived field; recompute modules sorted as `Mapping` validates them."""
    opts = opts | {"recompute_modules": tuple(sorted(opts["recompute_modules"]))}
    m = probe.model_copy(update=opts)
    if any(e.kind == "option" for e in option_errors(model, cluster, training, m)):
        return None
    return m


def _costed(model, cluster, training, probe: Mapping, members, hw, cache) -> list[LayerConfig]:
    out = []
    for opts in members:
        m = _valid_probe(model, cluster, training, probe, opts)
        if m is not None:
            out.append(_layer_config(model, cluster, training, m, hw, cache))
    return out


def _windows(costs) -> tuple[tuple[float, float], ...]:
    """(layer, head, tail) (forward, backward) compute from `micro_batch_costs`' answer: the
    same for every recompute and overlap option (they add to other parts)."""
    layers, head, tail = costs
    return ((max(c.fwd_compute for c in layers.values()),
             max(c.bwd_compute for c in layers.values())),
            (head.fwd_compute, head.bwd_compute), (tail.fwd_compute, tail.bwd_compute))


def _group_floor(model, cluster, training, probe: Mapping, members: tuple, hw,
                 cache: dict) -> LayerConfig:
    """A group of configurations at its floor (`micro_batch_floor`), `probe` being its
    member without recompute or overlap."""
    ctx = make_context(model, cluster, training, probe, hw)
    layers, head, tail, windows = micro_batch_floor(ctx, cache)
    num_moe = model.num_moe_layers
    work = head + tail + sum(t * (num_moe if kind else model.num_layers - num_moe)
                             for kind, t in layers.items())
    return LayerConfig(
        probe.tp, probe.cp, probe.ep, probe.etp, probe.micro_batch_size, probe, work, work,
        _stacked_params(model, probe, cache), head, tail, min(layers.values()),
        tuple(layers.get(k, 0.0) for k in (False, True)),
        pipeline_send_bytes(model, training, probe), *windows, options=members)


def _stacked_params(model, probe: Mapping, cache: dict) -> tuple[float, float]:
    """`stacked_layer_params`, kept in `cache`: it reads tp, ep and etp only."""
    key = ("stacked_layer_params", probe.tp, probe.ep, probe.etp)
    if key not in cache:
        cache[key] = stacked_layer_params(model, probe)
    return cache[key]


def _layer_config(model, cluster, training, probe: Mapping, hw, cache: dict) -> LayerConfig:
    ctx = make_context(model, cluster, training, probe, hw)
    costs = micro_batch_costs(ctx, cache)
    floor_costs = costs
    if probe.recompute == "full":  # partial recompute can be as fast as none at all
        plain = probe.model_copy(update={"recompute": "none"})
        floor_costs = micro_batch_costs(make_context(model, cluster, training, plain, hw), cache)
    layers, head, tail = floor_costs
    return LayerConfig(
        probe.tp, probe.cp, probe.ep, probe.etp, probe.micro_batch_size, probe,
        work_of(model, *costs), work_of(model, *floor_costs), _stacked_params(model, probe, cache),
        head.total, tail.total, min(c.total for c in layers.values()),
        tuple(layers[k].total if k in layers else 0.0 for k in (False, True)),
        pipeline_send_bytes(model, training, probe), *_windows(costs))


def memory_lower_bound(model, training, lc: LayerConfig, pp: int, dp: int, edp: int,
                       sharded: bool, hw) -> float:
    """Peak memory of every mapping of (lc, pp) is at least this (module docstring)."""
    return static_memory_lower_bound(model, training.precision, lc.probe, pp,
                                     optimizer_shards_of(dp, lc.cp, edp, sharded),
                                     hw.memory_reserve_bytes, lc.layer_params)


@lru_cache(maxsize=4096)
def _first_stage_layers(L: int, pp: int, vpp: int,
                        layout: str | None = None) -> tuple[int, int]:
    """(fewest, most) decoder layers pipeline rank 0 holds over every split of (pp, vpp):
    all of them with pp = 1; a custom layout's own count; with interleaving the even chunks,
    the embedding / loss counted in the split or not; without, anything that leaves the
    other stages one layer each."""
    if pp == 1:
        return L, L
    if layout is not None:
        try:
            n = stage_layer_counts(L, pp, vpp, layout=layout)[0]
        except StageSplitError:  # an invalid layout: its mappings are refused anyway
            return 0, L
        return n, n
    if vpp == 1:
        return 1, L - (pp - 1)
    counts = []
    for embedding, loss in product((False, True), repeat=2):
        try:
            counts.append(stage_layer_counts(L, pp, vpp, embedding=embedding, loss=loss)[0])
        except StageSplitError:
            pass
    return (min(counts), max(counts)) if counts else (1, L - (pp - 1))


def _dp_floor(model, cluster, training, values, lc: LayerConfig, pp: int, vpp: int, dp: int,
              edp: int, hw, memo: dict) -> float:
    """Exposed data-parallel communication and the optimizer step of every mapping of
    (lc, pp, vpp) are at least this: `estimate.dp_comm_times` (non-decreasing in rank 0's
    parameters) with the fewest parameters rank 0 can hold (its fewest layers, each of the
    lighter kind, and the embedding), exposed by `estimate.dp_exposed` (non-increasing in the
    overlap windows) under the longest windows (its most layers, each of the heavier kind,
    the embedding, and with pp = 1 the output layer), for the cheapest rank order and
    optimizer choice. The communication times depend on the sizes only: kept in `memo`."""
    first = values["decoder_first_pipeline_num_layers"][0]  # a pinned first stage
    if first is not None and pp > 1:
        fewest = most = first
    else:
        fewest, most = _first_stage_layers(model.num_layers, pp, vpp,
                                           values["pipeline_layout"][0])
    key = (lc.tp, lc.cp, lc.ep, lc.etp, pp, fewest)
    times = memo.get(key)
    if times is None:
        kinds = [k for k in (False, True) if (model.num_moe_layers if k else
                                                model.num_layers - model.num_moe_layers)]
        params = [layer_params(model, k, lc.probe) for k in kinds]
        dense = fewest * min(p[0] for p in params) + edge_params(model, lc.probe, True, False)[0]
        expert = fewest * min(p[1] for p in params)
        param_bytes = activation_element_bytes(training.precision)  # as the estimate gathers
        times = []
        for order in values["order"]:
            pd = group_placement(cluster.world_size, hw.gpus_per_domain, hw.tier_units, order,
                                 (lc.tp, lc.cp, 1, dp, pp), "dp-cp")
            pe = group_placement(cluster.world_size, hw.gpus_per_domain, hw.tier_units, order,
                                 (lc.etp, 1, lc.ep, edp, pp), "dp")
            for distributed in values["distributed_optimizer"]:
                times.append((distributed, *dp_comm_times(hw, pd, pe, dense, expert,
                                                          param_bytes, distributed)[:3]))
        # `dp_exposed` is non-decreasing in the reduction and gather times: a choice no
        # faster in any of the three than another with the same optimizer never gives the min.
        times = [t for i, t in enumerate(times) if not any(
            u[0] == t[0] and all(a <= b for a, b in zip(u[1:], t[1:])) and (u != t or j < i)
            for j, u in enumerate(times) if j != i)]
        memo[key] = times
    fwd = most * lc.layer_window_s[0] + lc.head_window_s[0]
    bwd = most * lc.layer_window_s[1] + lc.head_window_s[1]
    if pp == 1:
        fwd, bwd = fwd + lc.tail_window_s[0], bwd + lc.tail_window_s[1]
    return min(dp_exposed(reduce, gather, distributed, fwd, bwd) + optimizer
               for distributed, reduce, gather, optimizer in times)


def _send_time(cluster, values, lc: LayerConfig, pp: int, dp: int, hw) -> float:
    """Both pipeline sends of one micro-batch on the cheaper of the rank orders' links."""
    return 2 * min(p2p_time(hw, group_placement(cluster.world_size, hw.gpus_per_domain,
                                                hw.tier_units, o, (lc.tp, lc.cp, 1, dp, pp),
                                                "pp"), lc.send_bytes)
                   for o in values["order"])


def pipeline_bounds(model, cluster, training, values, configs, counts: dict | None = None,
                    memo: dict | None = None):
    """([PipelineBound], best bound first; the smallest memory bound among the configurations
    it pruned, as (bytes, layer config, pp)). `counts["pruned_by_memory_bound"]`, when
    given, grows by the (layer configuration, pp) pairs the memory bound removed; `memo`
    keeps what does not depend on the configurations between calls of one search."""
    world, gbs = cluster.world_size, training.global_batch_size
    hw = hardware(cluster)
    sharded = True in values["distributed_optimizer"]
    closest: tuple = (math.inf, None, 0)
    # Interleaving needs the layers (+ embedding / loss slots) in pp*vpp chunks.
    slots = [model.num_layers + extra for extra in (0, 1, 2)]
    vpps = {pp: [v for v in values["vpp"] if v == 1 or any(x % (pp * v) == 0 for x in slots)]
            if pp > 1 else [1] for pp in values["pp"]}
    if any(values[f][0] is not None for f in ("decoder_first_pipeline_num_layers",
                                              "decoder_last_pipeline_num_layers")):
        # A pinned uneven split may interleave where the even one cannot (its rules apply).
        vpps = {pp: list(values["vpp"]) if pp > 1 else [1] for pp in values["pp"]}
    layout = values["pipeline_layout"][0]
    if layout is not None:  # a pinned custom layout: its stage count gives vpp
        try:
            stages = len(parse_layout(layout))
        except StageSplitError:
            stages = 0  # refused with its reason (`reasons.py`)
        vpps = {pp: [stages // pp] if stages and not stages % pp and stages // pp in
                values["vpp"] else [] for pp in values["pp"]}
    memory_bounds: dict[tuple, float] = {}
    send_times: dict[tuple, float] = {}
    allowed = memo.setdefault("pipeline_allows", {}) if memo is not None else {}
    dp_times = memo.setdefault("dp_times", {}) if memo is not None else {}
    out = []
    for lc in configs:
        option_sets = _option_sets(lc)
        for pp in values["pp"]:
            if world % (lc.tp * lc.cp * pp) or world % (lc.etp * lc.ep * pp):
                continue
            dp, edp = data_parallel_sizes(world, lc.tp, lc.cp, lc.ep, lc.etp, pp)
            if gbs % (lc.micro_batch_size * dp):
                continue
            # The bound depends on the sizes only, not on the layer's other options.
            key = (lc.tp, lc.cp, lc.ep, lc.etp, pp)
            need = memory_bounds.get(key)
            if need is None:
                need = memory_bounds[key] = memory_lower_bound(model, training, lc, pp, dp, edp,
                                                               sharded, hw)
            if need > hw.memory_bytes:
                if need < closest[0]:
                    closest = (need, lc, pp)
                if counts is not None:
                    counts["pruned_by_memory_bound"] += 1
                continue  # no expansion of it can fit
            m = gbs // (lc.micro_batch_size * dp)
            sends = 0.0
            if pp > 1:  # the same for every layer option with these sizes and send bytes
                key = (lc.tp, lc.cp, pp, lc.send_bytes)
                sends = send_times.get(key)
                if sends is None:
                    sends = send_times[key] = _send_time(cluster, values, lc, pp, dp, hw)
            for vpp in vpps[pp]:
                if vpp > 1 and m % pp:  # interleaving needs micro-batches in multiples of pp
                    continue
                if not _pipeline_allows(model, cluster, training, lc, option_sets, pp, vpp,
                                        allowed):
                    continue
                # Partial recompute (pp >= 2, vpp == 1) can be as fast as none at all.
                w = (lc.work_floor_s if (pp >= 2 and vpp == 1) else lc.work_s) + pp * sends
                # The slowest rank holds at least the mean, and the first and last ranks at
                # least one layer besides the embedding / output layer.
                t_max = w / pp
                if pp > 1 and layout is None:  # a layout may leave them no layer
                    t_max = max(t_max, lc.head_s + lc.layer_floor_s + sends,
                                lc.tail_s + lc.layer_floor_s + sends)
                dp_s = _dp_floor(model, cluster, training, values, lc, pp, vpp, dp, edp, hw,
                                 dp_times)
                out.append(PipelineBound(m * t_max + (w - t_max) / vpp + dp_s, lc, pp, vpp))
    out.sort(key=lambda b: b.step_s)
    return out, closest


def _pipeline_allows(model, cluster, training, lc: LayerConfig, option_sets: list[tuple],
                     pp: int, vpp: int, memo: dict) -> bool:
    """Whether Megatron's rules on options with the pipeline (kind "pipeline" of
    `option_rules`: the all-to-all overlap needs vpp > 1 with pp > 1, ...) let one of
    `option_sets` (value tuples in `_OPTION_FIELDS` order: `lc`'s) run with (pp, vpp). Those
    rules read the options, pp and vpp only, never the parallel sizes: kept in `memo`."""
    for opts in option_sets:
        key = (opts, pp, vpp)
        ok = memo.get(key)
        if ok is None:
            update = dict(zip(_OPTION_FIELDS, opts)) | {"pp": pp, "vpp": vpp}
            m = lc.probe.model_copy(update=update)
            ok = memo[key] = not any(e.kind == "pipeline"
                                     for e in option_errors(model, cluster, training, m))
        if ok:
            return True
    return False


def _option_sets(lc: LayerConfig) -> list[tuple]:
    """The option value tuples (`_OPTION_FIELDS` order) a configuration or group stands for."""
    if lc.options is not None:
        return [tuple(o.values()) for o in lc.options]  # `layer_options` dicts, in that order
    return [tuple(getattr(lc.probe, f) for f in _OPTION_FIELDS)]


def split_bound(model, cluster, training, values, lc: LayerConfig, pp: int) -> float:
    """A lower bound on every stage split of (lc, pp, vpp=1), memory ignored (module
    docstring)."""
    L = model.num_layers
    dp, _ = data_parallel_sizes(cluster.world_size, lc.tp, lc.cp, lc.ep, lc.etp, pp)
    m = training.global_batch_size // (lc.micro_batch_size * dp)
    sends = _send_time(cluster, values, lc, pp, dp, hardware(cluster))
    if model.num_moe_layers in (0, L):
        best = _homogeneous_split(L, pp, lc.layer_floor_s, lc.head_s, lc.tail_s)
    else:
        best = _mixed_split(model.moe_layer_pattern(), pp, lc.kind_floor_s, lc.head_s, lc.tail_s)
    w = lc.work_floor_s + pp * sends
    return (m - 1) * (best + sends) + w


def _homogeneous_split(L: int, pp: int, t: float, head: float, tail: float) -> float:
    """The smallest slowest-stage time over splits of L identical layers of time t."""
    best = math.inf
    for k in range(0 if pp == 2 else 1, L + 1):
        rest = L - (pp - 2) * k
        if rest < 2 or (pp == 2 and k):
            break
        ideal = (rest * t + tail - head) / (2 * t)
        for n_f in {max(1, min(rest - 1, math.floor(ideal))), max(1, min(rest - 1, math.ceil(ideal)))}:
            best = min(best, max(head + n_f * t, tail + (rest - n_f) * t, k * t))
    return best


def _mixed_split(pattern, pp: int, kind_s: tuple[float, float], head: float,
                 tail: float) -> float:
    """The smallest slowest-stage time over every split (n_f, k, n_l) of dense and MoE layers
    in `pattern` order (exhaustive: the layer at each position is known; every first-stage
    size n_f of one middle-stage size k at once)."""
    L = len(pattern)
    prefix = [0.0]
    for x in pattern:
        prefix.append(prefix[-1] + kind_s[x])
    P = np.array(prefix)
    best = math.inf
    for k in range(0 if pp == 2 else 1, L + 1):
        rest = L - (pp - 2) * k
        if rest < 2 or (pp == 2 and k):
            break
        n_f = np.arange(1, rest)
        end = n_f + (pp - 2) * k  # where the last stage starts
        t = np.maximum(head + P[n_f], (tail + prefix[L]) - P[end])
        if k:
            window = P[k:] - P[:-k]  # layers [i, i + k)
            t = np.maximum(t, window[n_f[:, None] + k * np.arange(pp - 2)].max(axis=1))
        best = min(best, float(t.min()))
    # The estimate adds the same layer costs in another order: allow for float rounding.
    return best * (1 - 1e-12)
