"""Find the fastest mappings that fit: bounded search, CP-SAT for the stage layout, CP-SAT
selection with an optimality proof.

The step time is not separable over the mapping's axes (the micro-batch count couples dp with
the batch, the bubble couples pp with every layer's time, memory couples pp with
activations), so whole mappings are evaluated by the cost model; the space factors so that
most of it is never evaluated. The jobs, one module each:

1. `bounds.py`: layer configurations and a floor on the step time and memory of every
   pipeline configuration (layer configuration, pp, vpp).
2. Pass 1 (`expand.expand`): the pipeline configurations in increasing bound with their even
   stage split, every rank order and optimizer choice; it stops where the bound reaches the
   k-th best configuration found and the best classic, unfolded one (a folded configuration
   is left as soon as its bound reaches the k-th best: only unfolded ones can still change
   the best unfolded mapping the answer reports).
3. Pass 2 (`stages.py`): every remaining candidate configuration with pp >= 2 and no
   interleaving goes to the CP-SAT stage solver (layers of the first and last stage and the
   recompute depth, jointly, under a memory limit per stage); its answer is evaluated by the
   cost model like any other mapping.
4. `select.py`: the top-k with CP-SAT; unevaluated configurations enter at their bound, so
   an optimum on an evaluated one is proven (OPTIMAL). If the time limit cuts a pass, the
   answer is FEASIBLE (best found, not proven), or UNKNOWN when nothing fitting was found.
This module runs them in order over one `SearchState` and writes the answer.

Candidates are configurations (`candidates.py`): mappings that differ only in stage split or
recompute depth are one candidate (its best variant), and configurations that differ only in
rank order, optimizer sharding or (without expert parallelism) dispatcher with the same time
and memory are merged, keeping the one closest to the defaults.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field

from cost_model.estimate import evaluate, to_estimate
from cost_model.profile_model import step_time_scale
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors

from .bounds import PipelineBound, group_members, layer_configs, pipeline_bounds
from .bounds import recompute_bounds, split_bound, without_recompute
from .candidates import Row, class_key, is_classic, sizes_classic, super_key, tie_key
from .expand import check_fixed, expand, stage_bases, stages_free
from .export import megatron_args, sbatch_script, torchrun_script
from .reasons import infeasible_reasons
from .result import Candidate, PlanResult, SearchInfo
from .select import select
from .space import candidate_values
from .stages import solve_stages

DEFAULT_TIME_LIMIT_S = 30.0


@dataclass
class SearchState:
    """What the search has found so far."""

    top_k: int
    is_moe: bool
    class_best: dict = field(default_factory=dict)  # configuration -> best fitting Row
    super_best: dict = field(default_factory=dict)  # merged configuration -> best step
    leaders: dict = field(default_factory=dict)  # the k best merged configurations -> step
    kth_best: float = math.inf  # k-th best step among `leaders`
    best_classic: float = math.inf  # best unfolded mapping's step
    over: float = math.inf  # smallest excess over capacity among mappings that do not fit
    over_row: Row | None = None
    evaluated: int = 0
    proven: bool = True  # every stage solve proved its split optimal

    def consider(self, row: Row) -> None:
        """Account for one evaluated mapping."""
        self.evaluated += 1
        r, m = row.result, row.mapping
        if not r.fits_memory:
            if r.peak_bytes - r.capacity_bytes < self.over:
                self.over, self.over_row = r.peak_bytes - r.capacity_bytes, row
            return
        ck = class_key(m)
        cur = self.class_best.get(ck)
        if cur is None or (row.step, tie_key(m)) < (cur.step, tie_key(cur.mapping)):
            self.class_best[ck] = row
        sk = super_key(m)
        if row.step < self.super_best.get(sk, math.inf):
            self.super_best[sk] = row.step
            if row.step < self.kth_best or sk in self.leaders:
                self.leaders[sk] = row.step
                if len(self.leaders) > self.top_k:
                    del self.leaders[max(self.leaders, key=self.leaders.get)]
                if len(self.leaders) == self.top_k:
                    self.kth_best = max(self.leaders.values())
        if is_classic(m):
            self.best_classic = min(self.best_classic, row.step)

    def cutoff(self) -> float:
        """A configuration whose bound reaches this cannot change the answer."""
        return max(self.kth_best, self.best_classic if self.is_moe else 0.0)

    def cutoff_for(self, classic: bool) -> float:
        """The cutoff of one configuration: a folded one can only enter the top-k (it has to
        beat the k-th best); an unfolded one may also be the best unfolded mapping."""
        return self.cutoff() if classic else self.kth_best


def plan(model: ModelSpec, cluster: ClusterSpec, training: TrainingSpec, top_k: int = 5,
         fixed: dict | None = None, time_limit_s: float | None = None) -> PlanResult:
    """The `top_k` fastest mappings that fit, best first, with the search's account."""
    t0 = time.perf_counter()
    fixed = check_fixed(fixed or {})
    limit = time_limit_s if time_limit_s is not None else DEFAULT_TIME_LIMIT_S
    deadline = t0 + limit * 0.9
    values = candidate_values(model, cluster, training, fixed)
    cache: dict = {}  # per-layer costs shared by every mapping of this request
    configs = layer_configs(model, cluster, training, values, cache, deadline)
    state = SearchState(top_k, model.is_moe)
    if configs is None:  # the time limit passed while costing the layer configurations
        return _answer(model, cluster, training, state, [], None, (math.inf, None, 0), fixed,
                       limit, t0, True, 0, 0)
    counts = {"groups_costed": 0, "layer_configs_costed": sum(not c.is_group for c in configs),
              "pruned_by_memory_bound": 0}
    rests: list = []  # groups' members with recompute, queued apart (`without_recompute`)
    memo: dict = {}
    bounds, closest = pipeline_bounds(model, cluster, training, values, configs, counts, memo)
    tie = itertools.count()
    queue = [(b.step_s, next(tie), b) for b in bounds]  # sorted: already a heap
    skipped_min = math.inf  # smallest bound of a folded configuration left at its cutoff
    past_kth = 0  # folded configurations left there (the best unfolded one needs the rest)

    def classic(b: PipelineBound) -> bool:
        """Whether (b.lc, b.pp)'s mappings are unfolded (`candidates.is_classic`)."""
        lc = b.lc
        dp = cluster.world_size // (lc.tp * lc.cp * b.pp)
        return sizes_classic(lc.tp, lc.cp, lc.ep, lc.etp, dp)

    def cutoff_of(b: PipelineBound) -> float:
        return state.cutoff_for(classic(b))

    def consider(m: Mapping) -> None:
        state.consider(Row(m, evaluate(model, cluster, training, m, cache)))

    def next_bound() -> PipelineBound | None:
        """The smallest bound left, once the groups below it are costed: a group's members
        are costed when its floor comes first, and their bounds (never below it) queued."""
        nonlocal skipped_min
        while queue:
            b = queue[0][2]
            if not b.lc.is_group or (b.step_s >= state.cutoff() and id(b.lc) not in costed):
                return b  # a group at or above the cutoff: its floor ends the search
            heapq.heappop(queue)
            if b.step_s >= cutoff_of(b) and id(b.lc) not in costed:
                skipped_min = min(skipped_min, b.step_s)  # folded, past the k-th best
                continue
            if id(b.lc) in costed:  # its members' own bounds are queued
                continue
            costed.add(id(b.lc))
            # The members without recompute first; the others queued as a group of their own
            # at the smallest of those bounds (never below it: `bounds.without_recompute`).
            group, rest = without_recompute(b.lc)
            members = group_members(model, cluster, training, group, cache)
            counts["groups_costed"] += 1
            counts["layer_configs_costed"] += len(members)
            costed_bounds = pipeline_bounds(model, cluster, training, values, members, None,
                                            memo)[0]
            if rest is not None:
                rests.append(rest)
                costed_bounds += recompute_bounds(rest, costed_bounds)
            for nb in costed_bounds:
                heapq.heappush(queue, (nb.step_s, next(tie), nb))
        return None

    stage_solves = skipped = 0
    solved: set[int] = set()  # indices into `popped` whose stage split was solved

    def solve(i: int, b: PipelineBound) -> None:
        """The CP-SAT stage split (and recompute depth) of popped configuration i."""
        nonlocal stage_solves, skipped
        solved.add(i)
        if split_bound(model, cluster, training, values, b.lc, b.pp) >= cutoff_of(b):
            skipped += 1
            return
        for base in stage_bases(model, cluster, training, values, fixed, b.lc, b.pp):
            stage_solves += 1
            ans = solve_stages(model, cluster, training, base, cache,
                               max(0.01, deadline - time.perf_counter()), cutoff_of(b))
            if ans is not None:
                # A stage solve cut by the time limit found a split, not the best one.
                state.proven = state.proven and ans.status == "OPTIMAL"
                errors, resolved = mapping_errors(model, cluster, training, ans.mapping)
                assert not errors, errors  # the solver picks only valid splits
                consider(resolved)

    # Pass 1: every configuration with its even stage split, best bound first. Where no even
    # split exists (61 layers on 4 stages), its stage split is solved at once: waiting for
    # pass 2 would leave the cutoff open meanwhile.
    costed: set[int] = set()
    popped: list[PipelineBound] = []
    stopped_early = False
    can_split = stages_free(fixed)
    while (b := next_bound()) is not None and b.step_s < state.cutoff():
        if time.perf_counter() > deadline:
            stopped_early = True
            break
        heapq.heappop(queue)
        if b.step_s >= cutoff_of(b):  # folded, and past the k-th best: not in the answer
            skipped_min = min(skipped_min, b.step_s)
            past_kth += 1
            continue
        popped.append(b)
        found = state.evaluated
        for m in expand(model, cluster, training, values, fixed, b.lc, b.pp, b.vpp):
            consider(m)
        if can_split and state.evaluated == found and b.vpp == 1 and b.pp >= 2:
            solve(len(popped) - 1, b)
    expanded = len(popped)
    next_b = next_bound() if not stopped_early else None
    # Pass 2: uneven stages and recompute depth where they can still beat the k-th best.
    if not stopped_early and can_split:
        for i, b in enumerate(popped):
            if b.step_s >= state.cutoff():
                break
            if b.vpp != 1 or b.pp < 2 or i in solved or b.step_s >= cutoff_of(b):
                continue
            if time.perf_counter() > deadline:
                stopped_early = True
                break
            solve(i, b)
    left = [b for _, _, b in queue if not (b.lc.is_group and id(b.lc) in costed)]
    counts |= {"pipeline_configs_pruned_by_step_bound": len(left),
               "layer_configs_skipped_by_floor": sum(
                   len(c.options) for c in configs + rests
                   if c.is_group and id(c) not in costed),
               "stage_solves_skipped_by_split_bound": skipped,
               "folded_configs_past_kth_best": past_kth}
    return _answer(model, cluster, training, state, configs, next_b, closest, fixed, limit, t0,
                   stopped_early, expanded, stage_solves, counts, skipped_min)


def _answer(model, cluster, training, state: SearchState, configs, next_b, closest, fixed,
            limit: float, t0: float, stopped_early: bool, expanded: int,
            stage_solves: int, counts: dict | None = None,
            skipped_min: float = math.inf) -> PlanResult:
    """Select the top-k from what the search found and write the answer."""
    top_k = state.top_k
    rows = list(state.class_best.values())
    # Unevaluated configurations enter the selection at their bound (the smallest of the
    # queue's next and the folded ones left past the k-th best), unless the time limit cut
    # the search (then nothing is proven and the answer is FEASIBLE).
    bound = min(next_b.step_s if next_b is not None else math.inf, skipped_min)
    if stopped_early or bound == math.inf:
        bound = None
    status, chosen, stats, resolution = select(rows, bound, top_k, stopped_early,
                                               max(0.05, t0 + limit - time.perf_counter()))
    if status == "OPTIMAL" and not state.proven:
        status = "FEASIBLE"
    candidates = [_candidate(model, cluster, training, row) for row in chosen]
    reasons: list[str] = []
    if not candidates:
        if stopped_early:
            status = "UNKNOWN"
            reasons = [f"time limit of {limit:g} s reached after {state.evaluated} mappings "
                       f"without one that fits; raise time_limit_s or pin more of the mapping"]
        else:
            status = "INFEASIBLE"
            reasons = infeasible_reasons(model, cluster, training, fixed, configs, state.over,
                                         state.over_row, closest)
    unfolded = None
    classic = [r for r in rows if is_classic(r.mapping)]
    if classic:
        bc = min(classic, key=lambda r: (r.step, tie_key(r.mapping)))
        unfolded = {"mapping": bc.mapping.model_dump(),
                    "step_time_s": bc.step * step_time_scale(cluster.profile)}
    return PlanResult(
        candidates=candidates,
        search=SearchInfo(
            status=status, wall_time_s=time.perf_counter() - t0, reasons=reasons,
            space_size=state.evaluated,
            num_feasible=len(rows), solver=stats | {
                "layer_configs": len(configs), "pipeline_configs_expanded": expanded,
                "mappings_evaluated": state.evaluated, "stage_solves": stage_solves}
            | (counts or {}),
            objective_resolution_s=resolution, best_unfolded=unfolded,
        ),
    )


def _candidate(model, cluster, training, row: Row) -> Candidate:
    args = megatron_args(model, training, row.mapping)
    return Candidate(
        mapping=row.mapping, estimate=to_estimate(model, cluster, training, row.result),
        megatron_args=args,
        launch_scripts={
            "torchrun": torchrun_script(args, cluster.num_nodes, cluster.gpus_per_node),
            "sbatch": sbatch_script(args, cluster.num_nodes, cluster.gpus_per_node),
        },
        folded=model.is_moe and not is_classic(row.mapping))
