"""run_plan end to end (torchrun, 2 CPU ranks) and the refusals of unsupported plans."""

from __future__ import annotations

import json
import time

import pytest

from cost_model.presets import preset_model
from executor.config import UnsupportedPlan, load_run
from executor.launch import run_plan


def make_plan(**mapping):
    full = dict(tp=1, cp=1, pp=1, vpp=1, ep=1, etp=1, dp=2, edp=2, micro_batch_size=1,
                sequence_parallel=None, recompute="none", distributed_optimizer=True,
                dispatcher="alltoall", order="tp-cp-ep-dp-pp")
    full.update(mapping)
    return {
        "model": preset_model("tiny-moe").model_dump(),
        "cluster": {"num_nodes": 1, "gpus_per_node": 2, "gpu": "cpu"},
        "training": {"seq_length": 64, "global_batch_size": 4, "precision": "fp32",
                     "moe_expert_capacity_factor": None},
        "candidates": [{"mapping": full}],
    }


RUN_PLAN = make_plan(ep=2, edp=1, recompute="full")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, run_plan(RUN_PLAN, 0, 4, out, seed=1, echo=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_run_plan_two_ranks(full_run):
    out, metrics = full_run
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == [1, 2, 3, 4] and len(metrics["loss"]) == 4
    assert 4.0 < metrics["loss"][0] < 7.0  # about ln(256) = 5.5 at init
    assert metrics["loss"][-1] < metrics["loss"][0]
    assert metrics["step_time_s"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["comm_bytes"]["ep.all_to_all"] > 0
    # distributed optimizer: gradients reduce-scattered, parameters all-gathered over dp_cp
    assert metrics["comm_bytes"]["dp_cp.reduce_scatter"] > 0
    assert metrics["comm_bytes"]["dp_cp.params.all_gather"] > 0
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"


@pytest.mark.parametrize("fields,match", [
    (dict(tp=2, dp=1, edp=2, sequence_parallel=False), "tp=2 with a MoE model needs sequence_parallel"),
    (dict(pp=2, vpp=3, dp=1, edp=1), r"pp\*vpp = 2\*3 = 6 does not divide num_layers=4"),
    (dict(pp=2, dp=1, edp=1, decoder_first_pipeline_num_layers=3, decoder_last_pipeline_num_layers=3),
     "num_layers=4 minus first=3 and last=3 stage layers does not split evenly"),
    (dict(vpp=2), "vpp=2 needs pp > 1"),
    (dict(recompute="selective", recompute_num_layers=1), "recompute_num_layers=1 needs recompute='full'"),
    (dict(ep=3, edp=1), "ep=3"),
])
def test_refuses_unsupported_mappings(fields, match):
    with pytest.raises(UnsupportedPlan, match=match):
        load_run(make_plan(**fields))


@pytest.mark.parametrize("model,training,fields,match", [
    (dict(num_query_groups=1), {}, dict(tp=2, dp=1, edp=2), "tp=2 does not divide num_query_groups=1"),
    ({}, dict(seq_length=66), dict(cp=2, dp=1, edp=2), "seq_length=66 is not divisible by 2\\*cp=4"),
    ({}, dict(seq_length=63), dict(tp=2, dp=1, edp=2), "seq_length/cp = 63 is not divisible by tp=2"),
    ({}, dict(global_batch_size=3), dict(pp=2, vpp=2, dp=1, edp=1), "3 micro-batches is not a multiple of pp=2"),
    (dict(num_experts=0), {}, dict(tp=2, dp=1, edp=1, sequence_parallel=False),
     "sequence_parallel=false with tp=2"),
    (dict(vocab_size=257), {}, dict(tp=2, dp=1, edp=2), "tp=2 does not divide vocab_size=257"),
])
def test_refuses_unsupported_shapes(model, training, fields, match):
    plan = make_plan(**fields)
    plan["model"].update(model)
    plan["training"].update(training)
    with pytest.raises(UnsupportedPlan, match=match):
        load_run(plan)


@pytest.mark.parametrize("fields", [
    dict(tp=2, dp=1, edp=2), dict(tp=2, ep=2, dp=1, edp=1), dict(cp=2, dp=1, edp=1, ep=2),
    dict(pp=2, dp=1, edp=1), dict(pp=2, vpp=2, dp=1, edp=1),
    dict(pp=2, dp=1, edp=1, decoder_first_pipeline_num_layers=1),
    dict(recompute="full", recompute_num_layers=1, ep=2, edp=1),
])
def test_accepts_tp_cp_pp(fields):
    mapping = load_run(make_plan(**fields)).mapping
    assert all(getattr(mapping, k) == v for k, v in fields.items())


def test_refuses_mtp(tmp_path):
    plan = make_plan()
    plan["model"].update(mtp_num_layers=1)  # MLA runs now (test_exec_hf*.py); MTP not yet
    with pytest.raises(UnsupportedPlan, match="multi-token prediction"):
        run_plan(plan, 0, 1, tmp_path)


def test_accepts_every_mapping_field():
    run = load_run(make_plan(ep=2, edp=1, sequence_parallel=True, recompute="selective",
                             distributed_optimizer=False, dispatcher="allgather", order="tp-cp-dp-ep-pp"))
    assert run.mapping.dispatcher == "allgather" and run.world_size == 2


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_run_plan_one_gpu_nccl(tmp_path):
    plan = make_plan(dp=1, edp=1)
    plan["cluster"] = {"num_nodes": 1, "gpus_per_node": 1, "gpu": "h100"}
    plan["training"]["precision"] = "bf16"
    metrics = run_plan(plan, 0, 3, tmp_path, echo=False)
    assert metrics["backend"] == "nccl" and metrics["device"] == "cuda"
    assert metrics["loss"][-1] < metrics["loss"][0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_checkpoint_resume_continues_identically(full_run, tmp_path):
    """Resume on the same mapping (native files) and on pp2 / tp2 x ep2 (portable, resharded)."""
    full = full_run[1]
    first = run_plan(RUN_PLAN, 0, 2, tmp_path, seed=1, echo=False, save_every=2)
    assert (tmp_path / "checkpoints/step_00000002/COMPLETE").exists()
    second = run_plan(RUN_PLAN, 0, 4, tmp_path, seed=1, echo=False, resume=True)
    assert first["steps"] == [1, 2] and second["steps"] == [3, 4]
    for a, b in zip(first["loss"] + second["loss"], full["loss"]):
        assert abs(a - b) <= 1e-6 * abs(b)
    # the same step-2 checkpoint resumed on other mappings (pp2; tp2 x ep2): resharded state
    # (micro-batch 2 x dp 1 = the saved run's 1 x dp 2: the load-balancing loss is per micro-batch)
    for name, other in (("pp2", make_plan(pp=2, dp=1, edp=1, micro_batch_size=2)),
                        ("tp2", make_plan(tp=2, ep=2, dp=1, edp=1, micro_batch_size=2))):
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints/step_00000002").symlink_to(tmp_path / "checkpoints/step_00000002")
        resumed = run_plan(other, 0, 4, d, seed=1, echo=False, resume=True)
        assert "resharded" in (d / "train.log").read_text()
        assert resumed["steps"] == [3, 4]
        key = "pp.send" if name == "pp2" else "tp.all_gather"  # really ran that parallelism
        assert resumed["comm_bytes"][key] > 0
        for a, b in zip(resumed["loss"], full["loss"][2:]):
            assert abs(a - b) <= 2e-6 * abs(b), (name, resumed["loss"], full["loss"])


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_dying_rank_ends_the_job_and_is_named(monkeypatch, tmp_path):
    """Rank 1 exits at step 2 while rank 0 waits in a collective: the job ends non-zero fast."""
    monkeypatch.setenv("FOLDPLAN_FAIL_RANK", "1")
    monkeypatch.setenv("FOLDPLAN_FAIL_STEP", "1")
    monkeypatch.setenv("FOLDPLAN_DIST_TIMEOUT_S", "60")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exit [1-9]\d*\); rank 1 failed first"):
        run_plan(make_plan(ep=2, edp=1), 0, 3, tmp_path, echo=False)
    assert time.monotonic() - t0 < 150
    assert "rank 1 failed: injected failure at step 1" in (tmp_path / "train.log").read_text()
