"""Megatron-Core's rules for its newer options (cost_model/option_rules.py, stage_split.py,
ModelSpec): each refusal has its kind and field, and a valid combination is accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, GPUSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import InvalidMapping, mapping_errors, resolve_mapping

MIXTRAL = preset_model("mixtral-8x22b")  # 56 layers, 8 experts, no shared experts
LLAMA = preset_model("llama3-70b")  # dense
V2LITE = preset_model("deepseek-v2-lite")  # MLA, shared experts, first layer dense
H100x128 = ClusterSpec(num_nodes=16, gpus_per_node=8, gpu="h100")
BF16 = TrainingSpec(seq_length=4096, global_batch_size=256)
FP8 = BF16.model_copy(update={"precision": "fp8"})
OVERLAP = dict(tp=2, ep=8, moe_a2a_overlap=True)
SELECTIVE = dict(tp=2, ep=8, pp=8, recompute="selective")
PUBLIC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "calibration_public_h100.json"


def _errors(mapping, model=MIXTRAL, training=BF16, cluster=H100x128):
    return mapping_errors(model, cluster, training, mapping)[0]


REFUSED = [
    # moe_a2a_overlap: transformer_config.py `if self.overlap_moe_expert_parallel_comm:`
    (Mapping(tp=2, ep=1, moe_a2a_overlap=True), {}, "moe_a2a_overlap", "needs ep > 1"),
    (Mapping(**OVERLAP, dispatcher="allgather"), {}, "moe_a2a_overlap",
     "needs dispatcher 'alltoall' or 'flex' (got 'allgather')"),
    (Mapping(**OVERLAP, recompute="full"), {}, "moe_a2a_overlap", "recompute='full'"),
    (Mapping(**OVERLAP, pp=8), {}, "moe_a2a_overlap", "with pp=8 needs vpp > 1"),
    (Mapping(**OVERLAP), dict(training=BF16.model_copy(update={"precision": "fp32"})),
     "moe_a2a_overlap", "needs a bf16 model: precision='fp32'"),
    (Mapping(**OVERLAP, pp=8, vpp=7), dict(model=MIXTRAL.model_copy(update={"mtp_num_layers": 2})),
     "moe_a2a_overlap", "at most one MTP layer (got mtp_num_layers=2)"),
    (Mapping(**OVERLAP), dict(model=MIXTRAL.model_copy(update={"mtp_num_layers": 1})),
     "moe_a2a_overlap", "with an MTP layer (mtp_num_layers=1) needs pp > 1"),
    (Mapping(**OVERLAP, recompute="selective", recompute_modules=("moe",)), {},
     "recompute_modules", "'moe' recompute does not apply under the overlap"),
    # flex dispatcher: token_dispatcher.py MoEFlexTokenDispatcher
    (Mapping(tp=8, dispatcher="flex"), dict(model=LLAMA), "dispatcher", "needs a MoE model"),
    (Mapping(tp=2, dispatcher="flex"), {}, "dispatcher", "needs etp*ep > 1 (got etp=1, ep=1)"),
    (Mapping(tp=2, ep=8, flex_backend="hybridep"), {}, "flex_backend",
     "flex_backend='hybridep' needs dispatcher='flex' (got 'alltoall')"),
    # recompute_modules: transformer_config.py `if self.recompute_granularity == "selective":`
    (Mapping(tp=2, ep=8, pp=8, recompute_modules=("layernorm",)), {}, "recompute_modules",
     "recompute_modules=[layernorm] needs recompute='selective' (got 'none')"),
    (Mapping(tp=2, ep=8, pp=8, recompute="full", recompute_modules=("moe_act",)), {},
     "recompute_modules", "needs recompute='selective' (got 'full')"),
    (Mapping(**SELECTIVE, recompute_modules=("mla_up_proj",)), {}, "recompute_modules",
     "'mla_up_proj' needs multi_latent_attention"),
    (Mapping(tp=8, recompute="selective", recompute_modules=("moe_act",)), dict(model=LLAMA),
     "recompute_modules", "'moe_act' needs a MoE model"),
    (Mapping(tp=8, recompute="selective", recompute_modules=("core_attn", "shared_experts")),
     dict(model=LLAMA), "recompute_modules", "'shared_experts' needs a MoE model"),
    (Mapping(**SELECTIVE, recompute_modules=("shared_experts",)), {}, "recompute_modules",
     "'shared_experts' needs moe_shared_expert_intermediate_size"),
    (Mapping(**SELECTIVE, recompute_modules=("mlp",)), {}, "recompute_modules",
     "'mlp' recomputes dense MLP layers, but every layer of the model is MoE"),
    (Mapping(**SELECTIVE, recompute_modules=("layernorm", "moe_act")), dict(training=FP8),
     "recompute_modules", ("'moe_act' recompute with precision='fp8' needs an fp8_recipe other "
                           "than 'delayed'")),
    # fp8: fp8_utils.py get_fp8_recipe -> Transformer Engine's architecture checks
    (Mapping(tp=2, ep=8, pp=8), dict(training=BF16.model_copy(update={"fp8_recipe": "blockwise"})),
     "fp8_recipe", "fp8_recipe='blockwise' needs precision='fp8' (got 'bf16')"),
    (Mapping(tp=2, ep=8, pp=8), dict(training=FP8.model_copy(update={"fp8_recipe": "mxfp8"})),
     "fp8_recipe", "fp8_recipe='mxfp8' needs a Blackwell GPU"),
    (Mapping(tp=2, ep=8, pp=8), dict(training=FP8, cluster=H100x128.model_copy(
        update={"gpu": "a100-80gb"})), "precision", "precision='fp8' needs compute capability >= 8.9"),
    (Mapping(tp=2, ep=8, pp=8), dict(
        training=FP8.model_copy(update={"fp8_recipe": "blockwise"}),
        cluster=H100x128.model_copy(update={"gpu": GPUSpec(
            name="L40S", peak_tflops=362, memory_gib=44, hbm_GBps=864, compute_capability=8.9)})),
     "fp8_recipe", "fp8_recipe='blockwise' needs compute capability >= 9.0"),
]


@pytest.mark.parametrize("mapping, specs, field, message", REFUSED)
def test_option_rule_names_the_field_and_the_rule(mapping, specs, field, message):
    errors = _errors(mapping, **specs)
    # Rules on pp / vpp are kind "pipeline" (the planner settles them with the pipeline).
    kind = "pipeline" if ("needs vpp > 1" in message or "needs pp > 1" in message) else "option"
    assert [(e.kind, e.field) for e in errors if message in e.message] == [(kind, field)], errors
    section = "training" if field in ("fp8_recipe", "precision") else "mapping"
    assert {e.section for e in errors if e.field == field} == {section}  # the API's 422 loc
    with pytest.raises(InvalidMapping) as info:
        resolve_mapping(specs.get("model", MIXTRAL), specs.get("cluster", H100x128),
                        specs.get("training", BF16), mapping)
    assert any(message in r for r in info.value.reasons)


ACCEPTED = [
    (Mapping(**OVERLAP, pp=8, vpp=7, recompute="selective",
             recompute_modules=("layernorm", "moe_act")), {}),
    (Mapping(**OVERLAP, dispatcher="flex", pp=8, vpp=7), dict(
        training=FP8.model_copy(update={"fp8_recipe": "blockwise"}),
        model=MIXTRAL.model_copy(update={"mtp_num_layers": 1}))),
    (Mapping(tp=2, ep=8, dispatcher="flex", flex_backend="hybridep"), {}),
    (Mapping(tp=2, ep=1, etp=2, dispatcher="flex"), {}),  # etp x ep = 2 ranks
    (Mapping(**SELECTIVE, recompute_modules=("core_attn", "layernorm", "moe", "moe_act")),
     dict(training=FP8.model_copy(update={"fp8_recipe": "tensorwise"}))),
    (Mapping(tp=2, ep=8, recompute="selective",
             recompute_modules=("mla_up_proj", "mlp", "shared_experts")), dict(model=V2LITE)),
    (Mapping(tp=2, ep=8, recompute="selective", recompute_modules=()), {}),
    (Mapping(tp=2, ep=8, pp=8), dict(training=FP8.model_copy(update={"fp8_recipe": "mxfp8"}),
                                     cluster=H100x128.model_copy(update={"gpu": "b200"}))),
    # an architecture we do not know is not checked
    (Mapping(tp=2, ep=8, pp=8), dict(training=FP8.model_copy(update={"fp8_recipe": "mxfp8"}),
                                     cluster=H100x128.model_copy(update={"gpu": GPUSpec(
                                         name="x", peak_tflops=1, memory_gib=80, hbm_GBps=1)}))),
    (Mapping(tp=2, ep=8, pp=2, account_for_embedding_in_pipeline_split=True,
             account_for_loss_in_pipeline_split=True), {}),  # 58 slots over 2 ranks
    (Mapping(tp=2, ep=8, account_for_loss_in_pipeline_split=True), {}),  # pp 1: no effect
]


@pytest.mark.parametrize("mapping, specs", ACCEPTED)
def test_valid_option_combination_is_accepted(mapping, specs):
    assert _errors(mapping, **specs) == []


def test_public_megatron_runs_are_valid():
    """The public Megatron-Core runs of the round-2 reference (flex/DeepEP/HybridEP, selective
    recompute of layernorm and moe_act, embedding and loss in the pipeline split, fp8
    tensorwise) are combinations Megatron ran, so none is refused."""
    if not PUBLIC.exists():
        pytest.skip(f"reference data not found at {PUBLIC}")
    points = json.loads(PUBLIC.read_text())["points"]
    assert len(points) >= 3
    for p in points:
        model = ModelSpec(**p["model"])
        errors = _errors(Mapping(**p["mapping"]), model, TrainingSpec(**p["training"]),
                         ClusterSpec(**p["cluster"]))
        assert errors == [], (p["name"], errors)


def test_account_for_flags_refused_with_first_last_stage_layers():
    m = Mapping(tp=2, ep=8, pp=8, decoder_first_pipeline_num_layers=6,
                account_for_loss_in_pipeline_split=True)
    errors = _errors(m)
    assert [(e.kind, e.field) for e in errors] == [
        ("pipeline", "account_for_loss_in_pipeline_split")], errors
    assert "decoder_first_pipeline_num_layers=6" in errors[0].message


def test_account_for_flags_must_split_evenly():
    """56 layers + embedding = 57 slots do not divide over pp 8; + loss = 58 neither."""
    for flags in (dict(account_for_embedding_in_pipeline_split=True),
                  dict(account_for_embedding_in_pipeline_split=True,
                       account_for_loss_in_pipeline_split=True)):
        errors = _errors(Mapping(tp=2, ep=8, pp=8, **flags))
        assert [(e.kind, e.field) for e in errors] == [("stage_split", "pp")], errors
        assert all(f"{f}=true" in errors[0].message for f in flags)


@pytest.mark.parametrize("fields, message", [
    (dict(moe_router_enable_expert_bias=True),
     "moe_router_enable_expert_bias=true needs moe_router_score_function='sigmoid'"),
    (dict(moe_shared_expert_gate=True),
     "moe_shared_expert_gate=true needs moe_shared_expert_intermediate_size"),
])
def test_model_option_rules(fields, message):
    with pytest.raises(ValidationError, match=message):
        MIXTRAL.model_validate(MIXTRAL.model_dump() | fields)
    with pytest.raises(ValidationError, match="rotary_interleaved=true does not work with "
                                              "multi_latent_attention=true"):
        V2LITE.model_validate(V2LITE.model_dump() | {"rotary_interleaved": True})
    ok = MIXTRAL.model_validate(MIXTRAL.model_dump() | {
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "rotary_interleaved": True})
    assert ok.moe_router_enable_expert_bias and ok.rotary_interleaved
