"""CP-SAT: the layers of each pipeline stage and how many of them to recompute, jointly.

For one configuration (every mapping field fixed except the stage split and the recompute
depth, pp >= 2, no interleaving) choose
- n_f, n_l: layers of the first and last stage (they also carry the embedding and the output
  layer); the pp - 2 middle stages take k layers each, n_f + n_l + (pp - 2) k = L;
- r (only with recompute='full'): recompute the first r layers of every stage (Megatron's
  --recompute-method block); layers past the r-th keep their activations,
under a memory limit on every stage (stage i holds min(pp - i, m) micro-batches in flight, so
early stages want fewer layers or more recompute, late stages more layers).

Formulation. Variables: n_f, n_l, k, r; per stage s its range [lo_s, hi_s) (affine in n_f, k,
n_l), its recomputed count rc_s = min(r, hi_s - lo_s) and mid_s = lo_s + rc_s; table lookups
(AddElement) into prefix sums over layers of: time with and without recompute, forward and
backward compute, activation bytes with and without recompute, weight/gradient/optimizer
bytes, MoE-layer count; T = slowest stage time; e_r, e_g = exposed gradient reduce-scatter
and parameter all-gather of stage 0 (max(0, comm - compute window)).
Constraint families: `_add_layer_split_constraints` (layers sum to L, each stage >= 1),
`_add_recompute_constraints` (rc_s = min(r, stage size)), `_add_stage_constraints`
(per-stage time <= T, per-stage tensor bytes within the cost model's memory budget: the same
`cost_model.memory` arithmetic as the estimate, per-layer coefficients rounded to bytes),
`_add_dp_constraints`.
Objective: (m - 1) T + sum_s time_s + e_r + e_g + optimizer(stage 0), the cost model's step
time for these choices, times in integer units of `TIME_UNIT_S`, memory in bytes.
The answer is then evaluated by the cost model itself; the test suite checks the optimum
against exhaustive enumeration of splits and recompute depths.

Where every split has an exact floor (`stage_floor.split_floors`: no full recompute, or
recomputing a layer is never faster and never holds more than keeping it), the model is not
built: the splits are evaluated by the cost model in order of their floor until the floor
reaches the best estimate (branch and bound on the estimate itself; DeepSeek-V3 at 1,024
GPUs: most configurations settle in a few evaluations instead of a CP-SAT solve each).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ortools.sat.python import cp_model

from cost_model.estimate import evaluate, make_context, micro_batch_costs, pipeline_sends_time
from cost_model.hardware import hardware
from cost_model.kernels import memory_time, ring_time
from cost_model.memory import ADAM_STEP_BYTES, GRAD_BYTES, activation_bytes_per_layer
from cost_model.memory import edge_activation_bytes, memory_budget, optimizer_shards
from cost_model.memory import plain_mapping, static_bytes
from cost_model.params import edge_params, embedding_params, layer_params
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors

from .cpsat import Model
from .stage_floor import split_floors

TIME_UNIT_S = 1e-8


@dataclass(frozen=True)
class StageAnswer:
    mapping: Mapping
    objective_s: float
    status: str
    branches: int


def _linear(fn, p) -> tuple[float, float]:
    """(slope, intercept) of a collective's time in its bytes (exact: piecewise-free)."""
    if p.size <= 1:
        return 0.0, 0.0
    t1, t2 = fn(p, 1e9), fn(p, 2e9)
    return (t2 - t1) / 1e9, t1 - (t2 - t1)


def solve_stages(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, base: Mapping,
                 cache: dict, time_limit_s: float = 1.0, cutoff: float = math.inf,
                 method: str = "auto") -> StageAnswer | None:
    """Best (first, last, recompute depth) for `base` (resolved, pp >= 2, vpp == 1), or None
    when no split fits or none can get under `cutoff` seconds (`stage_floor.split_floors`).
    Where the floors of `split_floors` hold (no full recompute, or recompute never faster and
    never larger than keeping a layer), a branch and bound on the estimate finds the split;
    else the CP-SAT model below does (`method` "cpsat": always the model)."""
    assert base.pp >= 2 and base.vpp == 1
    hw = hardware(cluster)
    L, pp = model.num_layers, base.pp
    full = base.recompute == "full"
    m_rc = base.model_copy(update={"recompute_num_layers": None,
                                   "decoder_first_pipeline_num_layers": None,
                                   "decoder_last_pipeline_num_layers": None})
    m_plain = plain_mapping(m_rc.model_copy(update={"recompute_num_layers": 1})) if full else m_rc
    ctx = make_context(model, cluster, training, m_rc, hw)
    costs_rc, head, tail = micro_batch_costs(ctx, cache)
    costs_plain, _, _ = micro_batch_costs(make_context(model, cluster, training, m_plain, hw), cache)
    pattern = model.moe_layer_pattern()
    num_mb = training.global_batch_size // (base.micro_batch_size * base.dp)
    load = ctx.expert_load * ctx.capacity_scale
    act_b = ctx.act_bytes

    q = TIME_UNIT_S
    kinds = (False, True)

    def per_kind(fn, unit):
        """Integer per-layer coefficient of each layer kind (dense False, MoE True)."""
        return {e: int(round(fn(e) / unit)) if e in costs_plain else 0 for e in kinds}

    T_rc = per_kind(lambda e: costs_rc[e].total, q)
    T_pl = per_kind(lambda e: costs_plain[e].total, q)
    FW = per_kind(lambda e: costs_plain[e].fwd_compute, q)
    BW = per_kind(lambda e: costs_plain[e].bwd_compute, q)
    A_rc = per_kind(lambda e: activation_bytes_per_layer(model, training, m_rc, e, act_b, load), 1)
    A_pl = per_kind(lambda e: activation_bytes_per_layer(model, training, m_plain, e, act_b, load), 1)
    no_rc = m_rc.model_copy(update={"recompute": "none"})
    peak = per_kind(lambda e: activation_bytes_per_layer(model, training, no_rc, e, act_b, load), 1)
    shards = optimizer_shards(base)
    params = {e: layer_params(model, e, base) for e in kinds if e in costs_plain}
    PD = per_kind(lambda e: params[e][0], 1)  # parameters
    PE = per_kind(lambda e: params[e][1], 1)
    S = per_kind(lambda e: sum(static_bytes(*params[e], training.precision, shards)), 1)
    PM = [0]
    for x in pattern:
        PM.append(PM[-1] + x)

    vocab = embedding_params(model, base.tp)

    def edge_bytes(first: bool, last: bool) -> float:
        """Weights, gradients, optimizer state and activations of the embedding / output."""
        return (sum(static_bytes(*edge_params(model, base, first, last), training.precision,
                                 shards))
                + edge_activation_bytes(model, training, base, first, last, act_b, load))

    first_extra, last_extra = edge_bytes(True, False), edge_bytes(False, True)
    pp_comm = int(round(pipeline_sends_time(ctx) / q))
    head_t, tail_t = int(round(head.total / q)), int(round(tail.total / q))
    head_f, head_b = int(round(head.fwd_compute / q)), int(round(head.bwd_compute / q))
    budget = memory_budget(hw.memory_bytes, hw.memory_reserve_bytes)
    peak_term = max(peak[e] for e in kinds if e in costs_plain) if full else 0
    if not _may_fit(L, pp, num_mb, S, A_rc, A_pl, peak_term, first_extra, last_extra, budget,
                    [e for e in kinds if e in costs_plain]):
        return None  # no split fits: skip the model (exact: a necessary condition)
    kinds_present = [e for e in kinds if e in costs_plain]
    floors = split_floors(cutoff, pattern, pp, num_mb, full,
                          {e: costs_rc[e].total for e in kinds_present},
                          {e: costs_plain[e].total for e in kinds_present}, head.total,
                          tail.total, pipeline_sends_time(ctx), S, A_rc, A_pl, peak_term,
                          first_extra, last_extra, budget)
    if floors is not None and not floors:
        return None  # no split fits, or none gets under the cutoff: the answer stays as is
    if floors is not None and method == "auto":  # branch and bound on the estimate itself
        return _best_split(model, cluster, training, base, cache, floors, time_limit_s)

    cm = Model()
    n_f = cm.new_int_var(1, L, "n_first")
    n_l = cm.new_int_var(1, L, "n_last")
    k = cm.new_int_var(1 if pp > 2 else 0, L, "k_middle")
    r = cm.new_int_var(1, L, "recompute_depth") if full else None
    _add_layer_split_constraints(cm, n_f, n_l, k, L, pp)

    stages = []  # (lo, hi) affine expressions
    for s in range(pp):
        if s == 0:
            lo, hi = 0, n_f
        elif s == pp - 1:
            lo, hi = L - n_l, L
        else:
            lo, hi = n_f + (s - 1) * k, n_f + s * k
        stages.append((lo, hi))

    homogeneous = model.num_moe_layers in (0, L)  # every layer alike: sums are linear

    def var_of(expr, name):
        v = cm.new_int_var(0, L, name)
        cm.add(v == expr)
        return v

    def rsum(coef, a, b, name):
        """Sum over layers [a, b) of a per-layer quantity with coefficient coef[kind];
        `name` identifies the index pair so lookups are shared."""
        na, nb = name
        moe = moe_before(b, nb) - moe_before(a, na)
        return coef[True] * moe + coef[False] * ((b - a) - moe)

    moe_at: dict = {}
    first_moe = pattern.index(1) if 1 in pattern else L
    dense_prefix = first_moe if all(pattern[first_moe:]) else None

    def moe_before(index, name):
        """MoE layers among the first `index` layers (a table lookup unless all alike)."""
        if model.num_moe_layers in (0, L):
            return index if model.num_moe_layers else 0
        if isinstance(index, int):
            return PM[index]
        if name not in moe_at:
            v = cm.new_int_var(0, L, f"moe_{name}")
            if dense_prefix is not None:  # [0]*a + [1]*(L-a): MoE layers before x = max(0, x-a)
                cm.add_max_equality(v, [0, index - dense_prefix])
            else:
                cm.add_element(index, PM, v)
            moe_at[name] = v
        return moe_at[name]

    T = cm.new_int_var(0, max(max(T_rc.values()), max(T_pl.values())) * L + head_t + tail_t
                       + pp_comm, "T")
    # With identical layers the middle stages are alike: the second stage (most micro-batches
    # in flight) stands for all of them.
    middle_weight = {}
    for s in range(pp):
        if homogeneous and 2 <= s <= pp - 2:
            middle_weight[1] = middle_weight.get(1, 1) + 1
        else:
            middle_weight.setdefault(s, 1)
    stage_times = []
    for s, weight in middle_weight.items():
        lo, hi = stages[s]
        if homogeneous:
            lo_v, hi_v = lo, hi
        else:
            lo_v, hi_v = var_of(lo, f"lo{s}"), var_of(hi, f"hi{s}")
        rc = _add_recompute_constraints(cm, r, lo_v, hi_v, s, L) if full else 0
        mid_v = (lo_v + rc if homogeneous else var_of(lo_v + rc, f"mid{s}")) if full else lo_v
        lo_n, mid_n, hi_n = f"lo{s}", f"mid{s}", f"hi{s}"
        t = (rsum(T_rc, lo_v, mid_v, (lo_n, mid_n)) + rsum(T_pl, mid_v, hi_v, (mid_n, hi_n)) + pp_comm
             + (head_t if s == 0 else 0) + (tail_t if s == pp - 1 else 0))
        stage_times.append(weight * t)
        acts = rsum(A_rc, lo_v, mid_v, (lo_n, mid_n)) + rsum(A_pl, mid_v, hi_v, (mid_n, hi_n))
        static = rsum(S, lo_v, hi_v, (lo_n, hi_n))
        extra = (first_extra if s == 0 else 0) + (last_extra if s == pp - 1 else 0)
        inflight = min(pp - s, num_mb)
        # Full recompute: one layer of the model's largest kind holds its activations
        # (`peak_term`).
        _add_stage_constraints(cm, T, t, static + inflight * acts + peak_term, extra, budget)

    dp_terms = _add_dp_constraints(cm, ctx, hw, base, n_f, rsum, PD, PE, FW, BW, vocab, head_f,
                                   head_b, q)
    cm.minimize((num_mb - 1) * T + sum(stage_times) + dp_terms)
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    # With mixed dense/MoE layers (max/element lookups) presolve mostly costs more than it
    # saves: DeepSeek-V3 at 1,024 GPUs, ~970 solves, dropless 14.4 s with presolve and 6.2 s
    # without (capacity factor 1: 14.7 s and 16.1 s), same optima; the linear models of
    # homogeneous stacks solve faster with it (Qwen2-57B at 128 GPUs: 1.1 s with, 9.8 s without).
    solver.parameters.cp_model_presolve = homogeneous
    solver.parameters.max_time_in_seconds = max(0.01, time_limit_s)
    status = solver.solve(cm)
    assert status != cp_model.MODEL_INVALID, cm.validate()
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    nf, nl = solver.value(n_f), solver.value(n_l)
    depth = solver.value(r) if full else None
    sizes = [nf] + [solver.value(k)] * (pp - 2) + [nl]
    update: dict = {"decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None}
    if len(set(sizes)) > 1:
        update.update(decoder_first_pipeline_num_layers=nf, decoder_last_pipeline_num_layers=nl)
    if full:
        update["recompute_num_layers"] = depth if depth < max(sizes) else None
    return StageAnswer(base.model_copy(update=update), solver.objective_value * q,
                       solver.status_name(status), solver.num_branches)


def _best_split(model, cluster, training, base: Mapping, cache: dict, floors,
                time_limit_s: float) -> StageAnswer | None:
    """The split (and recompute depth) with the smallest estimate among `floors` (sorted
    (floor, n_f, k, depth), `stage_floor.split_floors`): each is evaluated by the cost model
    in order of its floor until the floor reaches the best estimate found, which is then
    optimal. A split whose smallest depth does not fit the estimate's own memory check goes
    one layer deeper at a time (deeper is never faster: split_floors checked it)."""
    deadline = time.perf_counter() + max(0.01, time_limit_s)
    pp, full = base.pp, base.recompute == "full"
    best, best_m, evaluated, status = math.inf, None, 0, "OPTIMAL"
    for floor, n_f, k, depth in floors:
        if floor * (1 - 1e-12) >= best:
            break
        if time.perf_counter() > deadline:
            status = "FEASIBLE"
            break
        sizes = [n_f] + [k] * (pp - 2) + [model.num_layers - n_f - (pp - 2) * k]
        update: dict = {"decoder_first_pipeline_num_layers": None,
                        "decoder_last_pipeline_num_layers": None}
        if len(set(sizes)) > 1:
            update.update(decoder_first_pipeline_num_layers=sizes[0],
                          decoder_last_pipeline_num_layers=sizes[-1])
        for r in range(depth, max(sizes) + 1) if full else (None,):
            if full:
                update["recompute_num_layers"] = r if r < max(sizes) else None
            m = base.model_copy(update=update)
            errors, resolved = mapping_errors(model, cluster, training, m)
            if errors:
                break
            res = evaluate(model, cluster, training, resolved, cache)
            evaluated += 1
            if res.fits_memory:
                if res.step_time_s < best:
                    best, best_m = res.step_time_s, m
                break
    if best_m is None:
        return None
    return StageAnswer(best_m, best, status, evaluated)


def _may_fit(L, pp, num_mb, S, A_rc, A_pl, peak_term, first_extra, last_extra, budget,
             kinds) -> bool:
    """Whether some split could fit: stage s holds at most the layers that fit with the
    cheapest layer kind's bytes (static + in-flight activations, recomputed or not); the
    first, the last and (pp - 2) equal middle stages must hold all L layers."""
    per_static = min(S[e] for e in kinds)
    per_act = min(min(A_rc[e], A_pl[e]) for e in kinds)

    def most(s: int) -> int:
        extra = (first_extra if s == 0 else 0) + (last_extra if s == pp - 1 else 0)
        room = budget - extra - peak_term
        per_layer = per_static + min(pp - s, num_mb) * per_act
        if room < per_layer:
            return 0
        return L if per_layer <= 0 else int(room // per_layer)

    middle = min((most(s) for s in range(1, pp - 1)), default=0)
    return min(most(0), most(pp - 1)) >= 1 and (pp == 2 or middle >= 1) and \
        most(0) + most(pp - 1) + (pp - 2) * middle >= L


def _add_layer_split_constraints(cm, n_f, n_l, k, L, pp) -> None:
    if pp == 2:
        cm.add(n_f + n_l == L)
        cm.add(k == 0)
    else:
        cm.add(n_f + n_l + (pp - 2) * k == L)


def _add_recompute_constraints(cm, r, lo_v, hi_v, s, L):
    """rc = min(r, stage size): Megatron's block method recomputes the first r layers."""
    size = cm.new_int_var(1, L, f"size{s}")
    cm.add(size == hi_v - lo_v)
    rc = cm.new_int_var(0, L, f"rc{s}")
    cm.add_min_equality(rc, [r, size])
    return rc


def _add_stage_constraints(cm, T, time_expr, stage_bytes, extra, budget) -> None:
    """The stage's time bounds T; its tensors (integer per-layer sums plus the embedding /
    output `extra`) fit the memory budget (`cost_model.memory.memory_budget`)."""
    cm.add(T >= time_expr)
    cm.add(stage_bytes <= int(budget - extra))


def _add_dp_constraints(cm, ctx, hw, base, n_f, rsum, PD, PE, FW, BW, vocab, head_f, head_b,
                        q):
    """Exposed DP communication and the optimizer step of stage 0, as the cost model has them,
    in units of TIME_UNIT_S with per-layer coefficients (small integers keep CP-SAT fast)."""
    pd, pe = ctx.place["dp_cp"], ctx.place["edp"]
    has_experts = ctx.model.is_moe

    def frac(p):
        return (p.size - 1) / p.size if p.size > 1 else 0.0

    def collective(nbytes):
        """Seconds of a ring collective over stage 0's gradients/parameters: per layer of each
        kind, plus the embedding and the fixed latency."""
        sd, id_ = _linear(lambda pl, b: ring_time(hw, pl, b), pd)
        se, ie = _linear(lambda pl, b: ring_time(hw, pl, b), pe) if has_experts else (0.0, 0.0)
        per_layer = {e: int(round((sd * PD[e] * frac(pd) + se * PE[e] * frac(pe)) * nbytes / q))
                     for e in (False, True)}
        const = int(round((sd * vocab * frac(pd) * nbytes + id_ + ie) / q))
        return rsum(per_layer, 0, n_f, ("zero", "hi0")) + const

    reduce = collective(GRAD_BYTES)
    overlap = hw.comm_overlap
    bwd = rsum(BW, 0, n_f, ("zero", "hi0")) + head_b if overlap else 0
    fwd = rsum(FW, 0, n_f, ("zero", "hi0")) + head_f if overlap else 0
    big = 10**13
    e_r = cm.new_int_var(0, big, "exposed_reduce")
    if base.distributed_optimizer:
        cm.add_max_equality(e_r, [0, reduce - bwd])
        gather = collective(ctx.act_bytes)
        e_g = cm.new_int_var(0, big, "exposed_gather")
        cm.add_max_equality(e_g, [0, gather - fwd])
        local_d, local_e = pd.size, pe.size
    else:
        cm.add_max_equality(e_r, [0, 2 * reduce - bwd])
        e_g, local_d, local_e = 0, 1, 1
    per_param = memory_time(hw, ADAM_STEP_BYTES) / q
    opt_layer = {e: int(round(per_param * (PD[e] / local_d + PE[e] / local_e)))
                 for e in (False, True)}
    opt = rsum(opt_layer, 0, n_f, ("zero", "hi0")) + int(round(per_param * vocab / local_d))
    return e_r + e_g + opt
