"""Find the fastest mappings that fit: bounded search, CP-SAT for the stage layout, CP-SAT
selection with an optimality proof.

The step time is not separable over the mapping's axes (the micro-batch count couples dp with
the batch, the bubble couples pp with every layer's time, memory couples pp with
activations), so whole mappings are evaluated by the cost model; the space factors so that
most of it is never evaluated:

1. Layer configurations l = (tp, cp, ep, etp, micro-batch, recompute, dispatcher) fix W_l, one
   micro-batch through every layer. For a pipeline configuration (l, pp, vpp) the step is at
   least m*t + (W - t)/vpp with t = max(W/pp, embedding + a layer, output + a layer)
   (`_pipeline_bounds`), and its weights, gradients and optimizer state spread evenly must
   fit (`_memory_lower_bound`). Neither depends on the stage split, recompute depth, rank
   order or optimizer sharding.
2. Pass 1 evaluates the pipeline configurations in increasing bound with their even stage
   split, every rank order and optimizer choice; it stops where the bound reaches the k-th
   best configuration found (and the best classic, unfolded one).
3. Pass 2 gives every remaining candidate configuration with pp >= 2 and no interleaving to
   the CP-SAT stage solver (`stages.py`): layers of the first and last stage and the
   recompute depth, jointly, under a memory limit per stage. Its answer is evaluated by the
   cost model like any other mapping.
4. `_select` picks the top-k with CP-SAT. Variables: x_r for the best mapping of each
   configuration found, y for everything not evaluated (at its lower bound); constraints:
   exactly one (`_add_choice_constraints`), memory (`_add_memory_constraints`), candidates
   already returned excluded (`_add_exclusion_constraints`); objective: step time in integer
   units of 1e-5 of the best step (costs doubled, y's +1 so a bound never ties a real
   mapping). An optimum on an x_r is the best mapping of the whole space under the cost
   model: status OPTIMAL. If the time limit cuts a pass, FEASIBLE (best found, not proven).

Candidates are configurations: mappings that differ only in stage split or recompute depth
are one candidate (its best variant), and configurations that differ only in rank order,
optimizer sharding or (without expert parallelism) dispatcher with the same time and memory
are merged, keeping the one closest to the defaults.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from cost_model.estimate import StepResult, evaluate, make_context, micro_batch_costs
from cost_model.estimate import micro_batch_work
from cost_model.kernels import p2p_time
from cost_model.layout import group_placement
from cost_model.estimate import to_estimate
from cost_model.hardware import hardware
from cost_model.flops import padded_vocab
from cost_model.memory import FRAGMENTATION, GIB, layer_params
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors

from .export import megatron_args, sbatch_script, torchrun_script
from .result import Candidate, PlanResult, SearchInfo
from .space import CONTRACT_FIELDS, candidate_values, pinned_split
from .stages import solve_stages

DEFAULT_TIME_LIMIT_S = 30.0
# Preference among mappings the cost model cannot tell apart (same time and memory).
_DEFAULTS = dict(order="tp-cp-ep-dp-pp", distributed_optimizer=True, dispatcher="alltoall",
                 recompute="none")


@dataclass(frozen=True)
class LayerConfig:
    tp: int
    cp: int
    ep: int
    etp: int
    micro_batch_size: int
    recompute: str
    dispatcher: str
    work_s: float  # W: one micro-batch through every layer, embedding and output
    work_floor_s: float  # W of the same layout without recompute (partial recompute's floor)
    dense_params: float  # parameters of all layers + embedding + output, one tp shard
    expert_params: float  # expert parameters of all layers, one ep x etp shard
    head_s: float  # embedding, one micro-batch
    tail_s: float  # output layer and loss, one micro-batch
    layer_floor_s: float  # the cheapest single layer, one micro-batch
    send_bytes: float  # one pipeline send of activations


@dataclass(frozen=True)
class Row:
    mapping: Mapping
    result: StepResult

    @property
    def step(self) -> float:
        return self.result.step_time_s


def is_classic(m: Mapping) -> bool:
    """The unfolded Megatron mapping: expert TP equals attention TP, EP carved out of DP x CP."""
    return m.etp == m.tp and (m.dp * m.cp) % m.ep == 0


def _tie_key(m: Mapping) -> tuple:
    return tuple(getattr(m, k) != v for k, v in _DEFAULTS.items()) + (
        m.pp, m.vpp, m.micro_batch_size, m.tp, m.cp, m.ep, m.etp,
        m.decoder_first_pipeline_num_layers or 0, m.decoder_last_pipeline_num_layers or 0)


def _layer_configs(model, cluster, training, values, cache: dict) -> list[LayerConfig]:
    """Every valid layer configuration with its lower bound, best bound first."""
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
                                probe = Mapping(tp=tp, cp=cp, ep=ep, etp=etp, micro_batch_size=mbs,
                                                recompute=rc, dispatcher=disp, pp=1,
                                                dp=world // (tp * cp), edp=world // (ep * etp))
                                errors, probe = mapping_errors(model, cluster, training, probe)
                                # Only errors about the layer itself disqualify it here.
                                if any(e.kind == "layer" for e in errors):
                                    continue
                                ctx = make_context(model, cluster, training, probe, hw)
                                w = micro_batch_work(ctx, cache)
                                floor_ctx = ctx
                                if rc == "full":
                                    plain = probe.model_copy(update={"recompute": "none"})
                                    floor_ctx = make_context(model, cluster, training, plain, hw)
                                floor = micro_batch_work(floor_ctx, cache)
                                layers, head, tail = micro_batch_costs(floor_ctx, cache)
                                dense, expert = _param_totals(model, probe)
                                out.append(LayerConfig(
                                    tp, cp, ep, etp, mbs, rc, disp, w, floor, dense, expert,
                                    head.total, tail.total, min(c.total for c in layers.values()),
                                    ctx.tokens_attn / (tp if probe.sp else 1) * model.hidden_size
                                    * ctx.act_bytes))
    return out


def _param_totals(model: ModelSpec, probe: Mapping) -> tuple[float, float]:
    num_moe = model.num_moe_layers
    dense = expert = 0.0
    for is_moe, count in ((False, model.num_layers - num_moe), (True, num_moe)):
        if count:
            d, e = layer_params(model, is_moe, probe)
            dense, expert = dense + d * count, expert + e * count
    vocab = padded_vocab(model.vocab_size, probe.tp) / probe.tp * model.hidden_size
    return dense + 2 * vocab + model.hidden_size, expert


def _memory_lower_bound(training, lc: LayerConfig, pp: int, dp: int, edp: int,
                        sharded: bool, hw) -> float:
    """No pipeline rank holds less than the mean of their weights, gradients and optimizer
    state (activations and the tied/untied detail left out), so peak >= this."""
    w_bytes = {"bf16": 2.0, "fp8": 3.0, "fp32": 4.0}[training.precision]
    opt_bytes = 8.0 if training.precision == "fp32" else 12.0
    params = lc.dense_params + lc.expert_params
    opt = opt_bytes * (lc.dense_params / (dp * lc.cp) + lc.expert_params / edp
                       if sharded else params)
    static = (params * (w_bytes + 4.0) + opt) / pp
    return hw.memory_reserve_bytes + (1 + FRAGMENTATION) * static


def _pipeline_bounds(model, cluster, training, values, configs):
    """(LB, layer config, pp, vpp), best bound first.

    With W the micro-batch work of all layers and pipeline sends and m micro-batches, the
    slowest stage takes t_max >= max(W/pp, embedding + one layer, output + one layer) per
    micro-batch, and the step m*t_max + (W - t_max)/vpp grows with t_max, so
    step >= m*t + (W - t)/vpp at that floor t (exact for balanced stages, before
    data-parallel and optimizer time, both non-negative)."""
    world, gbs = cluster.world_size, training.global_batch_size
    hw = hardware(cluster)
    sharded = True in values["distributed_optimizer"]
    closest: tuple = (math.inf, None, 0)  # smallest memory bound among those pruned by it
    out = []
    for lc in configs:
        for pp in values["pp"]:
            if world % (lc.tp * lc.cp * pp) or world % (lc.etp * lc.ep * pp):
                continue
            dp = world // (lc.tp * lc.cp * pp)
            if gbs % (lc.micro_batch_size * dp):
                continue
            edp = world // (lc.etp * lc.ep * pp)
            need = _memory_lower_bound(training, lc, pp, dp, edp, sharded, hw)
            if need > hw.memory_bytes:
                if need < closest[0]:
                    closest = (need, lc, pp)
                continue  # no expansion of it can fit
            m = gbs // (lc.micro_batch_size * dp)
            # Pipeline sends on every rank (the cheaper of the rank orders' links).
            sends = 0.0
            if pp > 1:
                crosses = min(group_placement(world, cluster.gpus_per_node, o,
                                              (lc.tp, lc.cp, 1, dp, pp), "pp").crosses_node
                              for o in values["order"])
                sends = 2 * p2p_time(hw, crosses, lc.send_bytes)
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
                out.append((m * t_max + (w - t_max) / vpp, lc, pp, vpp))
    out.sort(key=lambda t: t[0])
    return out, closest


def _split_bound(model, cluster, training, values, lc: LayerConfig, pp: int) -> float:
    """A lower bound on every stage split of (lc, pp, vpp=1), memory ignored: with identical
    layers the slowest stage is at least the best integer balance of embedding + first-stage
    layers, middle stages of k layers, output + last-stage layers. 0 (no bound) for models
    whose layers differ."""
    L = model.num_layers
    if model.num_moe_layers not in (0, L):
        return 0.0
    world = cluster.world_size
    dp = world // (lc.tp * lc.cp * pp)
    m = training.global_batch_size // (lc.micro_batch_size * dp)
    hw = hardware(cluster)
    crosses = min(group_placement(world, cluster.gpus_per_node, o, (lc.tp, lc.cp, 1, dp, pp),
                                  "pp").crosses_node for o in values["order"])
    sends = 2 * p2p_time(hw, crosses, lc.send_bytes)
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


def _expand(model, cluster, training, values, fixed, lc: LayerConfig, pp: int, vpp: int):
    """All full mappings of one layer and pipeline configuration, resolved."""
    world = cluster.world_size
    dp, edp = world // (lc.tp * lc.cp * pp), world // (lc.etp * lc.ep * pp)
    if fixed.get("dp", dp) != dp or fixed.get("edp", edp) != edp:
        return
    splits = pinned_split(fixed)
    orders = values["order"] if (pp > 1 and edp == dp) else [fixed.get("order", "tp-cp-ep-dp-pp")]
    for first, last in splits:
        for order in orders:
            for dist in values["distributed_optimizer"]:
                m = Mapping(tp=lc.tp, cp=lc.cp, pp=pp, vpp=vpp, ep=lc.ep, etp=lc.etp,
                            dp=dp, edp=edp, micro_batch_size=lc.micro_batch_size,
                            recompute=lc.recompute, dispatcher=lc.dispatcher,
                            distributed_optimizer=dist, order=order,
                            decoder_first_pipeline_num_layers=first,
                            decoder_last_pipeline_num_layers=last,
                            recompute_num_layers=fixed.get("recompute_num_layers"),
                            sequence_parallel=fixed.get("sequence_parallel"))
                errors, resolved = mapping_errors(model, cluster, training, m)
                if not errors:
                    yield resolved


def _check_fixed(fixed: dict) -> dict:
    """Validate a partial mapping: known field names, values a Mapping accepts."""
    unknown = sorted(set(fixed) - set(Mapping.model_fields))
    if unknown:
        raise ValueError(f"fixed: unknown mapping field(s) {', '.join(unknown)}")
    return Mapping(**fixed).model_dump(include=set(fixed))


def plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, top_k: int = 5,
         fixed: dict | None = None, time_limit_s: float | None = None) -> PlanResult:
    """The `top_k` fastest mappings that fit, best first, with the search's account."""
    t0 = time.perf_counter()
    fixed = _check_fixed(fixed or {})
    limit = time_limit_s if time_limit_s is not None else DEFAULT_TIME_LIMIT_S
    deadline = t0 + limit * 0.9
    values = candidate_values(model, cluster, training, fixed)
    cache: dict = {}  # per-layer costs shared by every mapping of this request
    configs = _layer_configs(model, cluster, training, values, cache)
    triples, closest = _pipeline_bounds(model, cluster, training, values, configs)
    class_best: dict[Mapping, Row] = {}  # best fitting row of each configuration
    super_best: dict[Mapping, float] = {}  # ... of each configuration up to order/optimizer
    kth_cache: list[float] = [math.inf]  # k-th best over `leaders`, the k best so far
    leaders: dict[Mapping, float] = {}
    best_classic = math.inf
    over = math.inf  # smallest excess over capacity among mappings that do not fit
    over_row: Row | None = None
    space_size = 0

    def consider(m: Mapping) -> None:
        nonlocal space_size, over, over_row, best_classic
        space_size += 1
        r = evaluate(model, cluster, training, m, cache)
        row = Row(m, r)
        if not r.fits_memory:
            if r.peak_bytes - r.capacity_bytes < over:
                over, over_row = r.peak_bytes - r.capacity_bytes, row
            return
        ck = class_key(m)
        cur = class_best.get(ck)
        if cur is None or (row.step, _tie_key(m)) < (cur.step, _tie_key(cur.mapping)):
            class_best[ck] = row
        sk = _super_key(m)
        if row.step < super_best.get(sk, math.inf):
            super_best[sk] = row.step
            if row.step < kth_cache[0] or sk in leaders:
                leaders[sk] = row.step
                if len(leaders) > top_k:
                    del leaders[max(leaders, key=leaders.get)]
                if len(leaders) == top_k:
                    kth_cache[0] = max(leaders.values())
        if is_classic(m):
            best_classic = min(best_classic, row.step)

    def cutoff() -> float:
        return max(kth_cache[0], best_classic if model.is_moe else 0.0)

    # Pass 1: every configuration with its even stage split, best bound first.
    expanded = 0
    stopped_early = False
    for i, (lb, lc, pp, vpp) in enumerate(triples):
        if lb >= cutoff():
            break
        if time.perf_counter() > deadline:
            stopped_early = True
            break
        expanded = i + 1
        for m in _expand(model, cluster, training, values, fixed, lc, pp, vpp):
            consider(m)
    # Pass 2 (CP-SAT per configuration, planner/stages.py): uneven stages and recompute
    # depth where they can still beat the k-th best.
    stage_solves = 0
    if not stopped_early and _stages_free(fixed):
        for lb, lc, pp, vpp in triples[:expanded]:
            if lb >= cutoff():
                break
            if vpp != 1 or pp < 2:
                continue
            if _split_bound(model, cluster, training, values, lc, pp) >= cutoff():
                continue
            if time.perf_counter() > deadline:
                stopped_early = True
                break
            for base in _stage_bases(model, cluster, training, values, fixed, lc, pp):
                stage_solves += 1
                ans = solve_stages(model, cluster, training, base, cache,
                                   max(0.01, deadline - time.perf_counter()))
                if ans is None:
                    continue
                errors, resolved = mapping_errors(model, cluster, training, ans.mapping)
                assert not errors, errors
                consider(resolved)
    rows = list(class_best.values())
    # Unevaluated configurations enter the selection at their bound, unless the time limit
    # cut the search (then nothing is proven and the answer is FEASIBLE).
    bound = triples[expanded][0] if expanded < len(triples) and not stopped_early else None
    status, chosen, stats, resolution = _select(rows, bound, top_k, stopped_early,
                                                max(0.05, t0 + limit - time.perf_counter()))
    candidates = []
    for row in chosen:
        args = megatron_args(model, training, row.mapping)
        candidates.append(Candidate(
            mapping=row.mapping, estimate=to_estimate(model, cluster, training, row.result),
            megatron_args=args,
            launch_scripts={
                "torchrun": torchrun_script(args, cluster.num_nodes, cluster.gpus_per_node),
                "sbatch": sbatch_script(args, cluster.num_nodes, cluster.gpus_per_node),
            },
            folded=model.is_moe and not is_classic(row.mapping)))
    reasons: list[str] = []
    if not candidates:
        status = "INFEASIBLE"
        if stopped_early:
            reasons = [f"time limit of {limit:g} s reached after {space_size} mappings without "
                       f"one that fits; raise time_limit_s or pin more of the mapping"]
        else:
            reasons = _infeasible_reasons(model, cluster, training, fixed, configs, over, over_row,
                                          closest)
    unfolded = None
    classic = [r for r in rows if is_classic(r.mapping)]
    if classic:
        bc = min(classic, key=lambda r: (r.step, _tie_key(r.mapping)))
        unfolded = {"mapping": bc.mapping.model_dump(), "step_time_s": bc.step}
    return PlanResult(
        candidates=candidates,
        search=SearchInfo(
            status=status, wall_time_s=time.perf_counter() - t0, reasons=reasons,
            space_size=space_size,
            num_feasible=len(rows), solver=stats | {
                "layer_configs": len(configs), "pipeline_configs": len(triples),
                "pipeline_configs_expanded": expanded, "mappings_evaluated": space_size,
                "stage_solves": stage_solves},
            objective_resolution_s=resolution, best_unfolded=unfolded,
        ),
    )


def class_key(m: Mapping) -> Mapping:
    """A configuration: the mapping without its stage split and recompute depth (the planner
    reports the best of those for each configuration)."""
    return m.model_copy(update={"decoder_first_pipeline_num_layers": None,
                                "decoder_last_pipeline_num_layers": None,
                                "recompute_num_layers": None})


def _super_key(m: Mapping) -> Mapping:
    """Configurations that may merge into one candidate (rank order, optimizer sharding and,
    without expert parallelism, the dispatcher, when time and memory agree)."""
    return _merged(class_key(m))


def _merged(m: Mapping) -> Mapping:
    """`m` without the fields that cannot tell candidates apart when time and memory agree."""
    update = {"order": "", "distributed_optimizer": True}
    if m.ep * m.etp == 1:
        update["dispatcher"] = ""  # no expert communication: the dispatcher does not matter
    return m.model_copy(update=update)


def _stages_free(fixed: dict) -> bool:
    pinned = {"decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
              "recompute_num_layers"}
    return not (pinned & set(fixed)) and not all(f in fixed for f in CONTRACT_FIELDS)


def _stage_bases(model, cluster, training, values, fixed, lc: LayerConfig, pp: int):
    """The configurations of (layer config, pp, vpp=1) for the stage solver: every rank order
    and optimizer choice, stage split left open (validity of the split is the solver's)."""
    world = cluster.world_size
    dp, edp = world // (lc.tp * lc.cp * pp), world // (lc.etp * lc.ep * pp)
    orders = values["order"] if edp == dp else [fixed.get("order", "tp-cp-ep-dp-pp")]
    sp = lc.tp > 1 if fixed.get("sequence_parallel") is None else (fixed["sequence_parallel"] and lc.tp > 1)
    for order in orders:
        for dist in values["distributed_optimizer"]:
            base = Mapping(tp=lc.tp, cp=lc.cp, pp=pp, ep=lc.ep, etp=lc.etp, dp=dp, edp=edp,
                           micro_batch_size=lc.micro_batch_size, recompute=lc.recompute,
                           dispatcher=lc.dispatcher, distributed_optimizer=dist, order=order,
                           sequence_parallel=sp)
            # Every check but the layer split (the solver picks a valid one).
            probe = base.model_copy(update={"decoder_first_pipeline_num_layers": 1,
                                            "decoder_last_pipeline_num_layers": 1})
            errors, _ = mapping_errors(model, cluster, training, probe)
            if all(e.kind == "stage_split" for e in errors):
                yield base


def _dedupe(rows: list[Row]) -> list[Row]:
    """Among mappings the cost model cannot tell apart, keep the one closest to defaults."""
    seen: dict[tuple, Row] = {}
    for row in sorted(rows, key=lambda r: (r.step, _tie_key(r.mapping))):
        seen.setdefault(_equivalence_key(row), row)
    return list(seen.values())


def _equivalence_key(row: Row) -> tuple:
    """Mappings that differ only in rank order or optimizer sharding and have the same
    predicted time and memory are one candidate to the user."""
    return (round(row.step, 12), round(row.result.peak_bytes), _merged(row.mapping))


def _select(rows: list[Row], bound: float | None, top_k: int, stopped_early: bool,
            time_left_s: float) -> tuple[str, list[Row], dict, float]:
    """Pick the top-k rows with CP-SAT (formulation in the module docstring)."""
    rows = _dedupe(rows)
    if not rows:
        return "INFEASIBLE", [], {}, 0.0
    best = min(r.step for r in rows)
    q = best * 1e-5
    # Keep the model small: rows that cannot enter the top-k are left out (at most top_k *
    # a few hundred rows stay; the exact order among kept rows is the solver's).
    rows.sort(key=lambda r: (r.step, _tie_key(r.mapping)))
    keep = rows[: max(top_k * 50, 200)]
    cost = [int(round(r.step / q)) for r in keep]
    chosen: list[Row] = []
    stats: dict = {"solves": 0, "branches": 0, "conflicts": 0}
    status_name = "OPTIMAL"
    excluded: list[int] = []
    for _ in range(min(top_k, len(keep))):
        model = cp_model.CpModel()
        x = [model.new_bool_var(f"x{i}") for i in range(len(keep))]
        y = [model.new_bool_var("unexpanded")] if bound is not None else []
        _add_choice_constraints(model, x + y)
        _add_memory_constraints(model, x, keep)
        _add_exclusion_constraints(model, x, excluded)
        # Costs doubled, bounds +1: an unexpanded group wins only if strictly better.
        model.minimize(
            sum(2 * c * v for c, v in zip(cost, x))
            + sum((2 * int(math.floor(bound / q)) + 1) * v for v in y)
        )
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = 1
        solver.parameters.max_time_in_seconds = time_left_s / top_k
        st = solver.solve(model)
        stats["solves"] += 1
        stats["branches"] += solver.num_branches
        stats["conflicts"] += solver.num_conflicts
        if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            break
        picked = [i for i, v in enumerate(x) if solver.value(v)]
        assert picked, "a pruned layer configuration beat every expanded mapping"
        # Equal objective: take the lowest index (closest to defaults among equal times).
        obj = solver.objective_value
        i = min(j for j in range(len(keep)) if j not in excluded and 2 * cost[j] == round(obj))
        chosen.append(keep[i])
        excluded.append(i)
        if st != cp_model.OPTIMAL:
            status_name = "FEASIBLE"
    if stopped_early:
        status_name = "FEASIBLE"
    return status_name, chosen, stats, q


def _add_choice_constraints(model: cp_model.CpModel, variables) -> None:
    model.add_exactly_one(variables)


def _add_memory_constraints(model: cp_model.CpModel, x, rows: list[Row]) -> None:
    cap = int(rows[0].result.capacity_bytes // 1024)
    model.add(sum(int(math.ceil(r.result.peak_bytes / 1024)) * v for r, v in zip(rows, x)) <= cap)


def _add_exclusion_constraints(model: cp_model.CpModel, x, excluded: list[int]) -> None:
    for i in excluded:
        model.add(x[i] == 0)


def _infeasible_reasons(model, cluster, training, fixed, configs, over, over_row,
                        closest) -> list[str]:
    if fixed and set(fixed) >= {"tp", "cp", "pp", "ep", "etp"}:
        errors, _ = mapping_errors(model, cluster, training, Mapping(**fixed))
        if errors:
            return [e.message for e in errors]
    capacity = hardware(cluster).memory_bytes
    if over_row is None and closest[1] is not None:
        need, lc, pp = closest
        world = cluster.world_size
        # With the state spread perfectly, the whole model's state over N GPUs must fit.
        min_gpus = math.ceil(world * (need - hardware(cluster).memory_reserve_bytes)
                             / (capacity - hardware(cluster).memory_reserve_bytes))
        return [
            f"no mapping fits in memory: even the best spread of weights, gradients and "
            f"optimizer state (tp={lc.tp} pp={pp} ep={lc.ep} etp={lc.etp}, distributed "
            f"optimizer) needs at least {need / GIB:.1f} GiB per GPU of {capacity / GIB:.1f} "
            f"GiB, at least {(need - capacity) / GIB:.1f} GiB more per GPU before "
            f"activations: raise pp or ep, or add GPUs (about {min_gpus} of this kind at the "
            f"least)"
        ]
    if not configs or over_row is None:
        pinned = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "none"
        return [f"no valid mapping of {model.name or 'this model'} on {cluster.world_size} GPUs "
                f"(pinned: {pinned}): check divisibility of heads, experts, layers and the "
                f"global batch by the parallel sizes"]
    m = over_row.mapping
    return [
        f"no mapping fits in memory: the closest ({_short(m)}) needs "
        f"{over_row.result.peak_bytes / GIB:.1f} GiB per GPU of "
        f"{over_row.result.capacity_bytes / GIB:.1f} GiB, at least {over / GIB:.1f} GiB more per "
        f"GPU: raise pp or ep, use full recompute, or add GPUs"
    ]


def _short(m: Mapping) -> str:
    return (f"tp={m.tp} cp={m.cp} pp={m.pp} vpp={m.vpp} ep={m.ep} etp={m.etp} dp={m.dp} "
            f"mbs={m.micro_batch_size} recompute={m.recompute}")
