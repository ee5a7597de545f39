"""What the executor runs of the round-2 options: each option it cannot run is refused naming
it (kind "executor", from the one table in cost_model/runtimes.py), what it runs is accepted,
and the routing options it runs reach its router."""

from __future__ import annotations

import pytest
import torch

from cost_model.presets import preset_model
from cost_model.runtimes import FOLDPLAN_SUPPORT, runtime_supports
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors
from executor.config import UnsupportedPlan, load_run, unsupported_reasons
from executor.parallel_dims import ParallelDims
from executor.router import Router, RouterConfig

TINY = preset_model("tiny-moe")  # 4 layers, 8 experts, top-2, no shared experts
CLUSTER = {"num_nodes": 1, "gpus_per_node": 2, "gpu": "cpu"}
TRAINING = {"seq_length": 64, "global_batch_size": 4, "precision": "fp32"}


def make_plan(model: dict | None = None, training: dict | None = None, **mapping) -> dict:
    full = dict(tp=1, cp=1, pp=1, vpp=1, ep=1, etp=1, micro_batch_size=1, recompute="none",
                dispatcher="alltoall") | mapping
    return {"model": TINY.model_dump() | (model or {}), "cluster": CLUSTER,
            "training": TRAINING | (training or {}), "candidates": [{"mapping": full}]}


REFUSED = [
    (dict(model=dict(mtp_num_layers=1)), "mtp_num_layers", "multi-token prediction"),
    (dict(ep=2, dispatcher="flex"), "dispatcher", "flex dispatcher"),
    (dict(ep=2, dispatcher="flex", flex_backend="hybridep"), "flex_backend", "HybridEP"),
    (dict(ep=2, moe_a2a_overlap=True), "moe_a2a_overlap", "all-to-all overlap"),
    (dict(ep=2, recompute="selective", recompute_modules=("core_attn", "moe_act")),
     "recompute_modules", "recompute_modules=[core_attn, moe_act]"),
]


@pytest.mark.parametrize("plan_fields, field, what", REFUSED)
def test_refuses_options_the_executor_cannot_run(plan_fields, field, what):
    plan = make_plan(**plan_fields)
    with pytest.raises(UnsupportedPlan, match=field) as info:
        load_run(plan)
    assert any(what in r and "not supported by the executor" in r for r in info.value.reasons)
    run_model = ModelSpec(**plan["model"])
    errors = unsupported_reasons(run_model, ClusterSpec(**CLUSTER), TrainingSpec(**TRAINING),
                                 Mapping(**plan["candidates"][0]["mapping"]))
    assert [(e.kind, e.field) for e in errors if what in e.message] == [("executor", field)]


@pytest.mark.parametrize("plan_fields", [
    dict(model=dict(moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5)),
    dict(model=dict(rotary_interleaved=True)),
    dict(pp=2, vpp=3, account_for_embedding_in_pipeline_split=True,
         account_for_loss_in_pipeline_split=True),
    dict(ep=2, recompute="selective", recompute_modules=("core_attn",)),
    dict(training=dict(precision="fp8", fp8_recipe="tensorwise")),  # fp8 plans run in bf16
    dict(training=dict(runtime="foldplan"), ep=2),
    # the exact-architecture options of issue 14 (executor/mla.py, router.py, attention.py)
    dict(model=dict(multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=32, qk_head_dim=16,
                    qk_pos_emb_head_dim=8, v_head_dim=16)),
    dict(model=dict(moe_router_num_groups=2, moe_router_group_topk=1)),
    dict(model=dict(qk_layernorm=True, add_qkv_bias=True)),
    dict(model=dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True)),
    dict(model=dict(moe_shared_expert_intermediate_size=256, moe_shared_expert_gate=True)),
])
def test_accepts_options_the_executor_runs(plan_fields):
    run = load_run(make_plan(**plan_fields))
    for key, value in plan_fields.items():
        if key in ("model", "training"):  # a dict of that section's fields
            assert all(getattr(getattr(run, key), k) == v for k, v in value.items())
        else:  # a mapping field
            assert getattr(run.mapping, key) == value


def test_runtime_foldplan_estimates_only_what_the_executor_runs():
    """training.runtime='foldplan' makes the executor's refusals validation errors of the
    estimate; 'megatron' (the default) accepts what Megatron-Core runs."""
    model = TINY.model_copy(update={"mtp_num_layers": 1})
    cluster = ClusterSpec(**CLUSTER)
    m = Mapping(ep=2, dispatcher="flex")
    megatron = TrainingSpec(**TRAINING)
    assert mapping_errors(model, cluster, megatron, m)[0] == []
    foldplan = megatron.model_copy(update={"runtime": "foldplan"})
    errors = mapping_errors(model, cluster, foldplan, m)[0]
    assert {(e.kind, e.field) for e in errors} == {("executor", "mtp_num_layers"),
                                                   ("executor", "dispatcher")}
    # the executor's refusals appear once when the plan already predicted the executor
    reasons = unsupported_reasons(model, cluster, foldplan, m)
    assert len(reasons) == len(errors) == 2


def test_runtime_table_answers_the_planner():
    assert runtime_supports("foldplan", "dispatcher", "alltoall")
    assert not runtime_supports("foldplan", "dispatcher", "flex")
    assert runtime_supports("megatron", "dispatcher", "flex")
    assert runtime_supports("foldplan", "recompute_modules", ("core_attn",))
    assert not runtime_supports("foldplan", "recompute_modules", ("layernorm", "moe_act"))
    assert runtime_supports("foldplan", "moe_router_score_function", "sigmoid")
    assert not runtime_supports("foldplan", "moe_a2a_overlap", True)
    assert runtime_supports("foldplan", "account_for_loss_in_pipeline_split", True)
    sections = {"model": ModelSpec, "mapping": Mapping, "training": TrainingSpec}
    for field, support in FOLDPLAN_SUPPORT.items():  # every row names a real field and
        default = sections[support.section].model_fields[field].default  # runs its default
        assert support.runs(default), field


def test_router_follows_the_spec_routing():
    """RouterConfig.for_model: sigmoid scores and the routed scaling factor of the spec reach
    the router; the weights are the normalised sigmoid scores times the factor."""
    spec = TINY.model_copy(update={"moe_router_score_function": "sigmoid",
                                   "moe_router_topk_scaling_factor": 2.5})
    cfg = RouterConfig.for_model(spec, TrainingSpec(**TRAINING))
    assert (cfg.score_function, cfg.topk_scaling_factor, cfg.pre_softmax) == ("sigmoid", 2.5, False)
    assert RouterConfig.for_model(TINY.model_copy(update={"moe_router_topk": 1}),
                                  TrainingSpec(**TRAINING)).pre_softmax
    torch.manual_seed(0)
    scaled = Router(16, 8, 2, cfg)
    plain = Router(16, 8, 2, RouterConfig(score_function="sigmoid"))
    with torch.no_grad():
        scaled.weight_ED.normal_()
        plain.weight_ED.copy_(scaled.weight_ED)
    x = torch.randn(32, 16)
    a, b = scaled(x, ParallelDims.single(), None), plain(x, ParallelDims.single(), None)
    assert torch.equal(a.indices_TK, b.indices_TK)
    torch.testing.assert_close(a.probs_TK, 2.5 * b.probs_TK)
    torch.testing.assert_close(b.probs_TK.sum(-1), torch.ones(32))
