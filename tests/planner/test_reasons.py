"""Why nothing fits: reasons that name the numbers, whatever the GPU."""

from __future__ import annotations

from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, TrainingSpec
from planner.search import plan


def test_a_reserve_that_takes_all_memory_is_named_not_a_crash():
    gpu = {"name": "tiny", "peak_tflops": 1, "memory_gib": 2, "hbm_GBps": 10,
           "memory_reserve_gib": 2}
    res = plan(preset_model("tiny-moe"), ClusterSpec(num_nodes=1, gpus_per_node=2, gpu=gpu),
               TrainingSpec(seq_length=128, global_batch_size=8))
    assert res.search.status == "INFEASIBLE" and not res.candidates
    assert "gpu.memory_reserve_gib" in res.search.reasons[0]
