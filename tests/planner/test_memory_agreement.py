"""The planner's memory constraint is exactly `/v1/estimate`'s `fits_memory`, and every lower
bound the search prunes with stays at or below what the cost model evaluates."""

from __future__ import annotations

import math
import random

import pytest

from cost_model.estimate import estimate, evaluate
from cost_model.hardware import hardware
from cost_model.specs import ClusterSpec, GPUSpec, Mapping, ModelSpec, TrainingSpec
from exhaustive import enumerate_mappings
from planner.bounds import (group_members, layer_configs, memory_lower_bound, pipeline_bounds,
                            recompute_bounds, split_bound, without_recompute)
from planner.search import plan
from planner.space import CONTRACT_FIELDS, OPTION_FIELDS, candidate_values

# The model of the report: 16 layers, width 2048, vocabulary 128,256 (the planner's bound
# once counted two vocabulary copies for tied embeddings on one GPU).
DENSE = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8,
             ffn_hidden_size=8192, vocab_size=128256)
TRAIN = TrainingSpec(seq_length=4096, global_batch_size=8)


def _cluster(pp: int, memory_gib: float) -> ClusterSpec:
    gpu = GPUSpec(name="test-gpu", peak_tflops=989.5, memory_gib=memory_gib, hbm_GBps=3350)
    return ClusterSpec(num_nodes=1, gpus_per_node=pp, gpu=gpu)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("recompute", ["full", "selective"])
def test_fits_memory_and_planner_agree_at_the_boundary(tied, pp, recompute):
    model = ModelSpec(name="dense-16l", untie_embeddings_and_output_weights=not tied, **DENSE)
    modules = ("layernorm",) if recompute == "selective" else ("core_attn",)
    fixed = dict(tp=1, cp=1, pp=pp, vpp=1, ep=1, etp=1, micro_batch_size=1, recompute=recompute,
                 distributed_optimizer=True, dispatcher="alltoall", order="tp-cp-ep-dp-pp",
                 recompute_modules=modules, flex_backend="deepep", moe_a2a_overlap=False)
    # The whole mapping is pinned: one candidate.
    assert set(fixed) == set(CONTRACT_FIELDS + OPTION_FIELDS)

    def planner_fits(gib: float) -> bool:
        status = plan(model, _cluster(pp, gib), TRAIN, top_k=1, fixed=fixed).search.status
        assert status in ("OPTIMAL", "INFEASIBLE")
        return status == "OPTIMAL"

    lo, hi = 1.0, 200.0
    assert not planner_fits(lo) and planner_fits(hi)
    while hi - lo > 1e-5:  # bisect the GPU memory on the planner's answer
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if planner_fits(mid) else (mid, hi)
    assert estimate(model, _cluster(pp, hi), TRAIN, Mapping(**fixed)).fits_memory
    assert not estimate(model, _cluster(pp, lo), TRAIN, Mapping(**fixed)).fits_memory


def _small_moe(tied: bool) -> ModelSpec:
    return ModelSpec(name="moe-8l", num_layers=8, hidden_size=4096, num_attention_heads=32,
                     num_query_groups=8, ffn_hidden_size=14336, vocab_size=151936, num_experts=8,
                     moe_ffn_hidden_size=8192, moe_router_topk=2, moe_layer_freq=[0, 1, 1, 1, 1, 1, 1, 1],
                     untie_embeddings_and_output_weights=not tied)


@pytest.mark.parametrize("tied", [True, False])
def test_lower_bounds_never_exceed_the_estimate(tied):
    """Every mapping of a small space (stage splits and recompute depths included, sampled)
    against the bounds of its layer and pipeline configuration."""
    model = _small_moe(tied)
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=16, moe_expert_capacity_factor=1.0)
    values = candidate_values(model, cluster, training, {})
    cache: dict = {}
    grouped = layer_configs(model, cluster, training, values, cache)
    groups = [c for c in grouped if c.is_group]
    assert groups and len(groups) < len(grouped) * 2  # the floors are in use here
    # The search costs a group's members when its floor comes first: check both bounds.
    configs = [c for c in grouped if not c.is_group] + [
        x for g in groups for x in group_members(model, cluster, training, g, cache)]
    bounds, _ = pipeline_bounds(model, cluster, training, values, configs)
    by_config = {(_layer_key(b.lc.probe), b.pp, b.vpp): b for b in bounds}
    floors = {(_group_key(b.lc.probe), b.pp, b.vpp): b
              for b in pipeline_bounds(model, cluster, training, values, groups)[0]}
    mappings = list(enumerate_mappings(model, cluster, training, {}))
    random.Random(0).shuffle(mappings)
    hw = hardware(cluster)
    checked = checked_floors = 0
    for m in mappings[:600]:
        r = evaluate(model, cluster, training, m, cache)
        b = by_config.get((_layer_key(m), m.pp, m.vpp))
        lc = b.lc if b else next(c for c in configs if _layer_key(c.probe) == _layer_key(m))
        need = memory_lower_bound(model, training, lc, m.pp, m.dp, m.edp,
                                  m.distributed_optimizer, hw)
        assert need <= r.peak_bytes * (1 + 1e-12), m
        if b is None:  # pruned by memory: then the mapping cannot fit either
            assert not r.fits_memory, m
            continue
        assert b.step_s <= r.step_time_s * (1 + 1e-12), m
        floor = floors.get((_group_key(m), m.pp, m.vpp))
        if floor is not None:
            assert floor.step_s <= b.step_s * (1 + 1e-12), m
            checked_floors += 1
        if m.pp >= 2 and m.vpp == 1:
            assert split_bound(model, cluster, training, values, lc, m.pp) <= \
                r.step_time_s * (1 + 1e-12), m
        checked += 1
    assert checked > 100 and checked_floors > 100


def _group_key(m: Mapping) -> tuple:
    return (m.tp, m.cp, m.ep, m.etp, m.micro_batch_size, m.dispatcher)


def _layer_key(m: Mapping) -> tuple:
    return (m.tp, m.cp, m.ep, m.etp, m.micro_batch_size, m.recompute, m.dispatcher,
            m.recompute_modules, m.flex_backend, m.moe_a2a_overlap)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_members_with_recompute_never_bound_below_their_group_without(precision):
    """The search costs a group's members without recompute first and queues the others at
    the smallest of their bounds (`without_recompute`): every member with recompute has a
    bound at least that, at every (pp, vpp) it has one."""
    model = _small_moe(False)
    cluster = ClusterSpec(num_nodes=2, gpus_per_node=4)
    training = TrainingSpec(seq_length=4096, global_batch_size=16, precision=precision)
    values = candidate_values(model, cluster, training, {})
    cache: dict = {}
    checked = 0
    for group in [c for c in layer_configs(model, cluster, training, values, cache)
                  if c.is_group]:
        base, rest = without_recompute(group)
        if rest is None:
            continue
        assert {o["recompute"] for o in base.options} == {"none"}
        assert len(base.options) + len(rest.options) == len(group.options)
        first = pipeline_bounds(model, cluster, training, values,
                                group_members(model, cluster, training, base, cache))[0]
        floor = {(b.pp, b.vpp): b.step_s for b in recompute_bounds(rest, first)}
        for b in pipeline_bounds(model, cluster, training, values,
                                 group_members(model, cluster, training, rest, cache))[0]:
            assert floor[(b.pp, b.vpp)] <= b.step_s, (b.lc.probe, b.pp, b.vpp)
            checked += 1
    assert checked > 100


def test_a_bound_that_beats_every_row_gives_feasible_not_a_crash():
    """The selection's unexplored-space variable can win (a time cut, a loose bound): the
    planner then answers FEASIBLE with the best it evaluated."""
    from planner.candidates import Row
    from planner.select import select

    model = _small_moe(False)
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=16)
    rows = [Row(m, evaluate(model, cluster, training, m))
            for m in (Mapping(tp=2, ep=4, pp=2, dp=2, edp=1, sequence_parallel=True),
                      Mapping(tp=4, ep=2, pp=2, dp=1, edp=2, sequence_parallel=True))]
    rows = [r for r in rows if r.result.fits_memory]
    assert rows
    best = min(r.step for r in rows)
    status, chosen, _, _ = select(rows, best / 2, top_k=2, stopped_early=False, time_left_s=1.0)
    assert status == "FEASIBLE" and chosen[0].step == best
    assert not math.isnan(chosen[0].step)
