"""The planner returns the cost model's optimum: checked against exhaustive enumeration."""

from __future__ import annotations

import pytest

from cost_model.estimate import estimate
from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec
from cost_model.estimate import evaluate
from cost_model.specs import ModelSpec
from exhaustive import enumerate_mappings
from planner.candidates import Row, class_key, equivalence_key, is_classic, tie_key
from planner.search import plan

# Resolution: the selection's integer objective is 1e-5 of the best step time, the stage
# solver's 1e-8 s per term (planner/search.py, planner/stages.py); the issue allows 0.1%.
# Step times of the top-k are compared at 1e-5 relative.
RESOLUTION = 1e-5


def exhaustive_top_k(model, cluster, training, k, fixed=None):
    """Every mapping of the space (all stage splits and recompute depths) through the cost
    model; each configuration represented by its best variant; top-k after the planner's
    stated merge rule for indistinguishable candidates."""
    best = {}
    num_fit = 0
    for m in enumerate_mappings(model, cluster, training, fixed or {}):
        r = evaluate(model, cluster, training, m)
        if not r.fits_memory:
            continue
        num_fit += 1
        row = Row(m, r)
        key = class_key(m)
        cur = best.get(key)
        if cur is None or (row.step, tie_key(m)) < (cur.step, tie_key(cur.mapping)):
            best[key] = row
    seen, out = set(), []
    for row in sorted(best.values(), key=lambda r: (r.step, tie_key(r.mapping))):
        if equivalence_key(row) not in seen:
            seen.add(equivalence_key(row))
            out.append(row)
    return out[:k], num_fit


def _small_moe(vocab=32000, freq=(0, 1, 1, 1, 1, 1, 1, 1)):
    """Eight Mixtral-8x22B-sized layers: big enough that memory binds on one 8 x H100 node,
    small enough to enumerate every stage split and recompute depth."""
    return ModelSpec(name="moe-8l", num_layers=8, hidden_size=6144, num_attention_heads=48,
                     num_query_groups=8, ffn_hidden_size=16384, vocab_size=vocab, num_experts=8,
                     moe_ffn_hidden_size=16384, moe_router_topk=2, moe_layer_freq=list(freq))


CASES = [
    # (model, global batch, pinned fields, what must show up in the answer)
    (_small_moe(), 32, {"tp": 1, "ep": 1, "etp": 1}, None),
    (_small_moe(vocab=151936), 32, {"tp": 1, "ep": 2, "etp": 1, "vpp": 1}, "uneven"),
    (_small_moe(vocab=151936), 16, {"ep": 1, "etp": 1, "cp": 1, "recompute": "full"}, "partial"),
    (_small_moe(freq=[1] * 8), 16, {"ep": 1, "etp": 1, "cp": 1, "recompute": "full"}, "partial"),
    # interleaved dense/MoE layers: the stage model's table lookups (AddElement), no presolve
    (_small_moe(vocab=151936, freq=(1, 0, 1, 0, 1, 0, 1, 0)), 16,
     {"ep": 1, "etp": 1, "cp": 1, "recompute": "full"}, None),
]


@pytest.mark.parametrize("model, gbs, fixed, expect", CASES)
def test_plan_equals_exhaustive_enumeration(model, gbs, fixed, expect):
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=gbs, moe_expert_capacity_factor=1.0)
    expected, num_fit = exhaustive_top_k(model, cluster, training, 5, fixed)
    assert num_fit > 5  # memory binds somewhere but leaves a choice
    result = plan(model, cluster, training, top_k=5, fixed=fixed)
    assert result.search.status == "OPTIMAL"
    got = [c.estimate.step_time_s for c in result.candidates]
    want = [r.step for r in expected]
    assert got == pytest.approx(want, rel=RESOLUTION)
    assert result.candidates[0].mapping == expected[0].mapping
    for c in result.candidates:
        # The reported estimate is the cost model's own answer for that mapping.
        assert c.estimate == estimate(model, cluster, training, c.mapping)
        assert c.estimate.fits_memory
    best = result.candidates[0].mapping
    if expect == "uneven":  # the stage solver moved layers off the output-heavy last stage
        assert best.decoder_first_pipeline_num_layers is not None
        assert best.decoder_last_pipeline_num_layers < best.decoder_first_pipeline_num_layers
    if expect == "partial":  # recomputing only some layers beat recomputing all
        assert best.recompute == "full" and best.recompute_num_layers is not None
        assert "--recompute-method" in result.candidates[0].megatron_args
        args = result.candidates[0].megatron_args
        assert args[args.index("--recompute-num-layers") + 1] == str(best.recompute_num_layers)


def test_fully_pinned_mapping_is_returned_exactly():
    model = preset_model("mixtral-8x22b")
    cluster = ClusterSpec(num_nodes=16, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=256, moe_expert_capacity_factor=1.0)
    fixed = dict(tp=2, cp=1, pp=8, vpp=1, ep=8, etp=1, dp=8, edp=2, micro_batch_size=1,
                 recompute="none", distributed_optimizer=True, dispatcher="alltoall",
                 order="tp-cp-ep-dp-pp", sequence_parallel=True)
    result = plan(model, cluster, training, fixed=fixed)
    assert result.search.status == "OPTIMAL"
    assert len(result.candidates) == 1
    m = result.candidates[0].mapping
    assert m.model_dump(include=set(fixed)) == fixed
    assert m.decoder_first_pipeline_num_layers is None
    assert result.candidates[0].estimate == estimate(model, cluster, training, Mapping(**fixed))


def test_pinned_invalid_mapping_is_infeasible_with_reasons():
    model = preset_model("mixtral-8x22b")
    cluster = ClusterSpec(num_nodes=16, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=256)
    result = plan(model, cluster, training, fixed=dict(tp=2, cp=1, pp=8, ep=3, etp=1))
    assert result.search.status == "INFEASIBLE"
    assert any("ep=3" in r for r in result.search.reasons)


def test_model_that_cannot_fit_says_how_much_is_missing():
    model = preset_model("mixtral-8x22b")
    result = plan(model, ClusterSpec(num_nodes=1, gpus_per_node=1),
                  TrainingSpec(seq_length=4096, global_batch_size=8))
    assert result.search.status == "INFEASIBLE" and not result.candidates
    (reason,) = result.search.reasons
    assert "GiB more per GPU" in reason and "raise pp or ep" in reason


def test_partial_pin_is_respected_and_unknown_field_refused():
    model = preset_model("mixtral-8x22b")
    cluster = ClusterSpec(num_nodes=16, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=256, moe_expert_capacity_factor=1.0)
    result = plan(model, cluster, training, fixed={"tp": 2, "ep": 8}, top_k=3)
    assert result.candidates and all(c.mapping.tp == 2 and c.mapping.ep == 8 for c in result.candidates)
    steps = [c.estimate.step_time_s for c in result.candidates]
    assert steps == sorted(steps)
    with pytest.raises(ValueError, match="unknown mapping field"):
        plan(model, cluster, training, fixed={"tensor_parallel": 2})


def test_megatron_args_write_every_parallel_size():
    model = preset_model("qwen2-57b-a14b")
    cluster = ClusterSpec(num_nodes=8, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=256, moe_expert_capacity_factor=1.0)
    result = plan(model, cluster, training, top_k=2)
    c = result.candidates[0]
    args = c.megatron_args
    for flag, value in [("--tensor-model-parallel-size", c.mapping.tp),
                        ("--pipeline-model-parallel-size", c.mapping.pp),
                        ("--context-parallel-size", c.mapping.cp),
                        ("--expert-model-parallel-size", c.mapping.ep),
                        ("--expert-tensor-parallel-size", c.mapping.etp),
                        ("--micro-batch-size", c.mapping.micro_batch_size),
                        ("--moe-token-dispatcher-type", c.mapping.dispatcher),
                        ("--moe-expert-capacity-factor", 1.0)]:
        assert args[args.index(flag) + 1] == str(value), flag
    assert "--use-distributed-optimizer" in args and "--overlap-grad-reduce" in args
    assert "torchrun" in c.launch_scripts["torchrun"] and "#SBATCH --nodes=8" in c.launch_scripts["sbatch"]
    assert result.search.best_unfolded is not None
    assert c.folded == (not is_classic(c.mapping))


def test_time_limit_cuts_the_search_without_failing():
    model = preset_model("mixtral-8x22b")
    cluster = ClusterSpec(num_nodes=128, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=1024, moe_expert_capacity_factor=1.0)
    result = plan(model, cluster, training, time_limit_s=0.3)
    assert result.search.status in ("FEASIBLE", "UNKNOWN", "OPTIMAL")
    assert result.search.wall_time_s < 0.3 + 1.0  # the selection itself after the cut
    if result.search.status == "UNKNOWN":
        assert "time limit" in result.search.reasons[0] and not result.candidates
    else:
        assert result.candidates
