"""Fine-grained activation offloading (`mapping.offload_modules`): the bytes each module sends
to host memory, what stays on the GPU, the exposed copy time, Megatron's rules, the export."""

from __future__ import annotations

import pytest

from cost_model.estimate import estimate, evaluate
from cost_model.hardware import hardware
from cost_model.layers import COMPONENTS, Context, Cost, with_offload
from cost_model.memory import (OFFLOAD_RESIDENT_LAYERS, activation_bytes_per_layer,
                               inflight_chunks, offloaded_bytes_per_layer)
from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from cost_model.validate import mapping_errors, resolve_mapping
from planner.search import plan

MOE = ModelSpec(name="moe", num_layers=8, hidden_size=1024, num_attention_heads=16,
                num_query_groups=4, ffn_hidden_size=4096, vocab_size=32000, num_experts=8,
                moe_ffn_hidden_size=2048, moe_router_topk=2)
CLUSTER = ClusterSpec(num_nodes=1, gpus_per_node=8)
TRAINING = TrainingSpec(seq_length=4096, global_batch_size=64, moe_expert_load_imbalance=1.0)


@pytest.mark.parametrize("modules, per_token, per_row", [
    # tp 2 with sequence parallelism: T = 4096 tokens, h = 1024, head dim 64.
    (["attn_norm"], 1024 / 2, 0),           # the layer input, SP shard
    (["qkv_linear"], 1024 / 2, 0),          # the norm output
    (["mlp_norm"], 1024 / 2, 0),            # the MLP block's input
    (["core_attn"], (16 + 2 * 4) * 64 / 2, 0),  # q, k, v
    (["core_attn", "attn_proj"], (16 + 2 * 4) * 64 / 2 + 16 * 64 / 2, 0),  # + attention output
    (["expert_fc1"], 0, 1024),              # per routed row: the expert input (etp 1)
    (["moe_act"], 0, 2 * 2048),             # per routed row: the fc1 output (SwiGLU)
])
def test_offloaded_bytes_of_each_module(modules, per_token, per_row):
    m = resolve_mapping(MOE, CLUSTER, TRAINING, Mapping(tp=2, ep=4, offload_modules=modules))
    T = 4096
    routed_rows = T / 2 * 2  # tokens of the SP shard x top-2
    want = (T * per_token + routed_rows * per_row) * 2  # bf16
    assert offloaded_bytes_per_layer(MOE, TRAINING, m, True, 2.0, 1.0) == pytest.approx(want)
    # Never more than what the layer keeps.
    assert want < activation_bytes_per_layer(MOE, TRAINING, m, True, 2.0, 1.0)


def test_recompute_leaves_nothing_to_offload_where_it_drops_the_tensor():
    base = dict(tp=2, ep=4, recompute="selective")
    m = resolve_mapping(MOE, CLUSTER, TRAINING, Mapping(
        **base, recompute_modules=["layernorm"], offload_modules=["qkv_linear"]))
    assert offloaded_bytes_per_layer(MOE, TRAINING, m, True, 2.0, 1.0) == 0.0
    m = resolve_mapping(MOE, CLUSTER, TRAINING, Mapping(
        **base, recompute_modules=["moe"], offload_modules=["expert_fc1", "moe_act"]))
    assert offloaded_bytes_per_layer(MOE, TRAINING, m, True, 2.0, 1.0) == 0.0
    m = resolve_mapping(MOE, CLUSTER, TRAINING, Mapping(
        tp=2, ep=4, recompute="full", offload_modules=["attn_norm", "core_attn"]))
    assert offloaded_bytes_per_layer(MOE, TRAINING, m, True, 2.0, 1.0) == 4096 * 512 * 2


def test_offloaded_activations_leave_two_layers_worth_on_the_gpu():
    """pp 4: rank 0 holds 2 layers x 4 micro-batches in flight; of the offloaded bytes, two
    layers' worth stay (the last group of each module, and the one reloaded ahead)."""
    training = TrainingSpec(seq_length=4096, global_batch_size=64)
    plain = resolve_mapping(MOE, CLUSTER, training, Mapping(pp=4, ep=2))
    off = plain.model_copy(update={"offload_modules": ("expert_fc1", "moe_act")})
    a = evaluate(MOE, CLUSTER, training, plain)
    b = evaluate(MOE, CLUSTER, training, off)
    chunks = inflight_chunks(plain, 0, a.num_microbatches)
    assert chunks == 4 and OFFLOAD_RESIDENT_LAYERS == 2
    load = a.expert_load
    per_layer = offloaded_bytes_per_layer(MOE, training, off, True, 2.0, load)
    layers = 2  # 8 layers over pp 4
    saved = a.per_rank_memory[0].activations - b.per_rank_memory[0].activations
    assert saved == pytest.approx(layers * per_layer * chunks - 2 * per_layer, rel=1e-9)


def test_copies_are_exposed_only_beyond_the_compute_beside_them():
    hw = hardware(CLUSTER)
    m = resolve_mapping(MOE, CLUSTER, TRAINING, Mapping())
    ctx = Context(MOE, TRAINING, m, hw, "bf16", 2.0, 4096, 4096, 1.0, 1.0, {})
    c = Cost(fwd_compute=1.0, bwd_compute=2.0)
    c.parts["ep_comm"] = 0.4  # 0.2 s each way beside the copies
    nbytes = 1.5 * hw.host_copy_bps  # 1.5 s each way
    with_offload(ctx, c, nbytes)
    assert c.parts["offload"] == pytest.approx(0.3)  # forward: 1.5 - 1.0 - 0.2; backward hidden
    assert "offload" in COMPONENTS
    assert hw.host_copy_bps == pytest.approx(64e9 * 0.85)  # PCIe Gen5 x16, 85% achieved


def test_offloading_trades_step_time_for_memory_in_the_estimate():
    m = Mapping(tp=2, ep=4, micro_batch_size=2)
    a = estimate(MOE, CLUSTER, TRAINING, m)
    b = estimate(MOE, CLUSTER, TRAINING, m.model_copy(update={
        "offload_modules": ("attn_norm", "core_attn", "attn_proj", "expert_fc1", "moe_act")}))
    assert b.memory.activations_gib < a.memory.activations_gib
    # The copies are exposed beyond the layer's compute; this small model's layers wait for
    # the host's kernel launches (`layers.host_bound`) longer than that, so the step does not
    # grow: the host-bound wait (counted as compute) shrinks by what the copies take.
    assert b.breakdown["offload"] > 0
    assert b.step_time_s == pytest.approx(a.step_time_s, rel=1e-12)
    assert b.breakdown["compute"] == pytest.approx(
        a.breakdown["compute"] - b.breakdown["offload"], rel=1e-9)


@pytest.mark.parametrize("mapping, cluster, model, words", [
    (Mapping(ep=2, offload_modules=["attn_proj"]), CLUSTER, MOE, "'attn_proj' needs 'core_attn'"),
    (Mapping(offload_modules=["moe_act"]), CLUSTER,
     ModelSpec(name="dense", num_layers=4, hidden_size=512, num_attention_heads=8,
               ffn_hidden_size=2048, vocab_size=32000), "'moe_act' needs a MoE model"),
    (Mapping(offload_modules=["core_attn", "core_attn"]), CLUSTER, MOE, "listed twice"),
    (Mapping(offload_modules=["core_attn"]), ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu"),
     preset_model("tiny-moe"), "needs a GPU with a link to host memory"),
])
def test_megatron_and_foldplan_rules(mapping, cluster, model, words):
    training = TrainingSpec(seq_length=256, global_batch_size=8)
    errors, _ = mapping_errors(model, cluster, training, mapping)
    assert any(e.field == "offload_modules" and words in e.message for e in errors), errors


def test_unknown_module_is_refused_by_name():
    with pytest.raises(ValueError, match="offload_modules"):
        Mapping(offload_modules=["router"])


def test_export_and_pinned_planning():
    fixed = {"tp": 2, "ep": 4, "offload_modules": ["expert_fc1", "moe_act"]}
    result = plan(MOE, CLUSTER, TRAINING, top_k=2, fixed=fixed)
    assert result.search.status == "OPTIMAL"
    for c in result.candidates:
        assert c.mapping.offload_modules == ("expert_fc1", "moe_act")
        args = c.megatron_args
        i = args.index("--offload-modules")
        assert args[i - 1] == "--fine-grained-activation-offloading"
        assert args[i + 1:i + 3] == ["expert_fc1", "moe_act"]


def test_deepseek_v3_recipe_fits_with_offloading_where_it_did_not():
    """NVIDIA's DeepSeek-V3 layout (TP2 PP8 VPP4 EP64) on 1,024 H100 in fp8: without
    recompute or offloading its first stage holds 39 micro-batch chunks of activations
    (over 80 GB); offloading every module input brings it under the H100's memory and costs
    step time where the copies outlast the compute beside them."""
    model = preset_model("deepseek-v3")
    cluster = ClusterSpec(num_nodes=128, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=8192, precision="fp8",
                            fp8_recipe="blockwise")
    m = Mapping(tp=2, pp=8, vpp=4, ep=64, dispatcher="flex",
                pipeline_layout="Et*3|(tt|)*29,m|L")
    a = estimate(model, cluster, training, m)
    b = estimate(model, cluster, training, m.model_copy(update={"offload_modules": (
        "attn_norm", "core_attn", "attn_proj", "mlp_norm", "expert_fc1", "moe_act")}))
    assert not a.fits_memory and b.fits_memory
    assert b.breakdown["offload"] > 0 and b.step_time_s > a.step_time_s
