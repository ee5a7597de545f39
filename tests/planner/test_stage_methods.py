"""The stage split of one configuration: branch and bound on the estimate, the CP-SAT model,
and every split and recompute depth enumerated, on the same configurations."""

from __future__ import annotations

import math

import pytest

from cost_model.estimate import evaluate
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors
from exhaustive import all_splits, recompute_depths
from planner.stages import solve_stages

# Mixed dense / MoE stack, 11 layers (no even split on 2 or 4 stages).
MODEL = ModelSpec(num_layers=11, hidden_size=2048, num_attention_heads=16, num_query_groups=4,
                  ffn_hidden_size=8192, vocab_size=32000, num_experts=8,
                  moe_ffn_hidden_size=4096, moe_router_topk=2,
                  moe_layer_freq=[0, 0] + [1] * 9)
CLUSTER = ClusterSpec(num_nodes=1, gpus_per_node=8)


def _best_by_enumeration(base: Mapping, training: TrainingSpec) -> float:
    best = math.inf
    for first, last in all_splits(MODEL, base.pp, {}):
        for depth in recompute_depths(MODEL, base.recompute, base.pp, 1, first, last, {}):
            m = base.model_copy(update=dict(decoder_first_pipeline_num_layers=first,
                                            decoder_last_pipeline_num_layers=last,
                                            recompute_num_layers=depth))
            errors, resolved = mapping_errors(MODEL, CLUSTER, training, m)
            if errors:
                continue
            r = evaluate(MODEL, CLUSTER, training, resolved)
            if r.fits_memory:
                best = min(best, r.step_time_s)
    return best


@pytest.mark.parametrize("pp, recompute, gbs", [(2, "none", 16), (4, "selective", 16),
                                                (4, "full", 32), (2, "full", 64)])
def test_branch_and_bound_is_the_enumerated_optimum_and_cp_sat_agrees(pp, recompute, gbs):
    training = TrainingSpec(seq_length=4096, global_batch_size=gbs)
    dp = 8 // (2 * pp)
    base = Mapping(tp=2, pp=pp, ep=2, etp=1, dp=dp, edp=dp, recompute=recompute,
                   sequence_parallel=True)
    errors, base = mapping_errors(MODEL, CLUSTER, training, base.model_copy(update=dict(
        decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=1)))
    assert all(e.kind == "stage_split" for e in errors), errors
    base = base.model_copy(update=dict(decoder_first_pipeline_num_layers=None,
                                       decoder_last_pipeline_num_layers=None))
    want = _best_by_enumeration(base, training)
    assert math.isfinite(want)
    answers = {}
    for method in ("auto", "cpsat"):
        ans = solve_stages(MODEL, CLUSTER, training, base, {}, 30.0, math.inf, method)
        assert ans is not None and ans.status == "OPTIMAL"
        _, resolved = mapping_errors(MODEL, CLUSTER, training, ans.mapping)
        r = evaluate(MODEL, CLUSTER, training, resolved)
        assert r.fits_memory
        answers[method] = r.step_time_s
    # Branch and bound minimizes the estimate itself: the enumerated optimum exactly.
    assert answers["auto"] == pytest.approx(want, rel=1e-12)
    # CP-SAT minimizes its integer model of the estimate (1e-8 s per term, see stages.py).
    assert answers["cpsat"] == pytest.approx(want, rel=1e-5)
    # A cutoff under every split's floor (the estimate less data-parallel and optimizer
    # time): nothing can beat it, so no answer.
    assert solve_stages(MODEL, CLUSTER, training, base, {}, 30.0, want * 0.8) is None
