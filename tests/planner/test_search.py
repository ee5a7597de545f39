"""The planner returns the cost model's optimum: checked against exhaustive enumeration."""

from __future__ import annotations

import pytest

from cost_model.estimate import estimate
from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec
from planner.search import _equivalence_key, _tie_key, is_classic, plan
from planner.space import enumerate_mappings

# Resolution of the solver's integer objective: 1e-5 of the best step time (module docstring);
# the issue allows at most 0.1%. Orders are compared at that resolution.
RESOLUTION = 1e-5


class _Row:
    def __init__(self, m, est):
        self.mapping, self.est = m, est
        self.step = est.step_time_s

    @property
    def result(self):  # for _equivalence_key
        return type("R", (), {"peak_bytes": self.est.memory.peak_gib * 2**30})()


def exhaustive_top_k(model, cluster, training, k, fixed=None):
    rows = []
    for m in enumerate_mappings(model, cluster, training, fixed or {}):
        est = estimate(model, cluster, training, m)
        if est.fits_memory:
            rows.append(_Row(m, est))
    rows.sort(key=lambda r: (r.step, _tie_key(r.mapping)))
    seen, out = set(), []
    for r in rows:
        key = _equivalence_key(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out[:k], len(rows)


@pytest.mark.parametrize("name, nodes, gbs", [("deepseek-v2-lite", 1, 32), ("qwen3-30b-a3b", 1, 16)])
def test_plan_equals_exhaustive_enumeration(name, nodes, gbs):
    model = preset_model(name)
    cluster = ClusterSpec(num_nodes=nodes, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=gbs, moe_expert_capacity_factor=1.0)
    expected, num_fit = exhaustive_top_k(model, cluster, training, 5)
    assert num_fit > 5  # memory binds somewhere but leaves a choice
    result = plan(model, cluster, training, top_k=5)
    assert result.search.status == "OPTIMAL"
    got = [c.estimate.step_time_s for c in result.candidates]
    want = [r.step for r in expected]
    assert got == pytest.approx(want, rel=RESOLUTION)
    assert [c.mapping for c in result.candidates][0] == expected[0].mapping
    for c in result.candidates:
        # The reported estimate is the cost model's own answer for that mapping.
        assert c.estimate == estimate(model, cluster, training, c.mapping)
        assert c.estimate.fits_memory


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
