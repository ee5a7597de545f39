"""Today's Megatron-Core mechanisms, each against a hand-worked number (docs/COST_MODEL.md,
"Today's Megatron-Core"): each test fails if its mechanism is removed."""

from __future__ import annotations

from math import comb

import pytest

from cost_model.dispatch import (dispatch_time, expected_distinct_bins, overlapped_comm,
                                 overlapped_layer)
from cost_model.dispatch import routing_fanout
from cost_model.estimate import estimate
from cost_model.flops import megatron_flops_per_sequence
from cost_model.hardware import hardware
from cost_model.layers import Cost, host_bound
from cost_model.layout import group_placement
from cost_model.memory import activation_bytes_per_layer
from cost_model.params import layer_params, mtp_params
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec

QWEN3_30B = ModelSpec(name="qwen3-30b-a3b", num_layers=48, hidden_size=2048, num_attention_heads=32,
                      num_query_groups=4, kv_channels=128, ffn_hidden_size=6144, vocab_size=151936,
                      num_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8)


def test_distinct_destinations_of_a_token():
    # 128 experts, top-8: on 16 GPUs (8 each) and on 2 nodes (64 each).
    assert expected_distinct_bins(128, 8, 8) == pytest.approx(16 * (1 - comb(120, 8) / comb(128, 8)))
    assert expected_distinct_bins(128, 8, 8) == pytest.approx(6.5965, abs=1e-4)
    assert expected_distinct_bins(128, 64, 8) == pytest.approx(1.9938, abs=1e-4)
    assert expected_distinct_bins(128, 128, 8) == 1.0  # one bin holds everything


def test_node_limited_routing_reaches_at_most_group_topk_nodes():
    """DeepSeek-V3: 256 experts in 8 groups, 4 groups per token, EP64 = 8 nodes of 8 GPUs:
    a group per node, so C(8,4) choices put a token on exactly 4 nodes; inside a group of 32
    experts (8 GPUs of 4) its 2 experts land on 8 * (1 - C(28,2)/C(32,2)) GPUs."""
    v3 = ModelSpec(num_layers=4, hidden_size=7168, num_attention_heads=128, ffn_hidden_size=18432,
                   vocab_size=129280, num_experts=256, moe_ffn_hidden_size=2048, moe_router_topk=8,
                   moe_router_num_groups=8, moe_router_group_topk=4)
    gpus, nodes = routing_fanout(v3, ep=64, ranks_per_node=8)
    assert nodes == pytest.approx(4.0)
    assert gpus == pytest.approx(4 * 8 * (1 - comb(28, 2) / comb(32, 2)))
    free = v3.model_copy(update={"moe_router_num_groups": None, "moe_router_group_topk": None})
    assert routing_fanout(free, 64, 8)[1] == pytest.approx(expected_distinct_bins(256, 32, 8))
    assert routing_fanout(free, 64, 8)[1] == pytest.approx(5.2947, abs=1e-4)  # 5.3 nodes without


def test_flex_dispatch_sends_a_token_once_per_node():
    """EP16 over two H100 nodes, 4096 tokens of h = 2048 in bf16: the network carries each
    token once per remote node it needs (1.994 nodes, half of them remote), NVLink once per
    destination GPU not the sender; both run at once."""
    cluster = ClusterSpec(num_nodes=2, gpus_per_node=8)
    hw = hardware(cluster)
    place = {k: group_placement(16, 8, (16,), "tp-cp-ep-dp-pp", (1, 1, 16, 1, 1), k)
             for k in ("ep", "tp")}
    place["etp"] = place["tp"]
    T, row = 4096, 2048 * 2
    gpus, nodes = 6.5965, 1.9938
    rdma = T * row * nodes * 0.5 / (50e9 * 0.9)
    nvl = T * row * gpus * (1 - 1 / 8) / (450e9 * 0.95)
    want = max(rdma, nvl) + 2 * hw.inter_latency_s
    got = dispatch_time(hw, QWEN3_30B, "flex", place, T, row, 1.0, 1.0, 16)
    assert got == pytest.approx(want, rel=1e-3)
    # NCCL all-to-all sends every (token, expert) copy: 8 copies, half over the network.
    a2a = dispatch_time(hw, QWEN3_30B, "alltoall", place, T, row, 1.0, 1.0, 16)
    assert a2a > 3 * got


def test_a2a_overlap_schedule_pairs_each_all_to_all_with_one_module():
    """Hand-worked on Megatron's per-layer 1F1B schedule (dispatch.overlapped_layer)."""
    # Every all-to-all (1 s) is shorter than the module beside it: all four hide, the
    # layer takes its 8 s of compute, and that compute runs 4 s beside communication.
    assert overlapped_layer(1.0, (2.0, 2.0), (2.0, 2.0)) == pytest.approx(8.0)
    assert overlapped_comm(1.0, (2.0, 2.0), (2.0, 2.0), 0.18) == pytest.approx((0.0, 0.72))
    # Attention of 0.25 s each way: the combine backward waits beside the attention forward
    # and the combine forward beside the attention backward, 0.75 s exposed each; the
    # dispatches hide under the experts' 2 s (4.5 s of compute -> 6 s per layer).
    assert overlapped_layer(1.0, (0.25, 0.25), (2.0, 2.0)) == pytest.approx(6.0)
    assert overlapped_comm(1.0, (0.25, 0.25), (2.0, 2.0), 0.0) == pytest.approx((1.5, 0.0))
    # Communication-bound: the four all-to-alls back to back (12 s), compute hidden (4 s).
    assert overlapped_layer(3.0, (1.0, 1.0), (1.0, 1.0)) == pytest.approx(12.0)
    assert overlapped_comm(3.0, (1.0, 1.0), (1.0, 1.0), 0.0) == pytest.approx((8.0, 0.0))
    # One pooled window (all compute against all communication) would hide the first case's
    # 1.5 s: the pairing is what exposes it.
    assert 4 * 1.0 < 0.25 + 0.25 + 2.0 + 2.0


def test_a2a_overlap_hides_communication_under_the_other_micro_batch():
    cluster = ClusterSpec(num_nodes=2, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=64, moe_expert_load_imbalance=1.0)
    base = Mapping(ep=16, dispatcher="flex")
    plain = estimate(QWEN3_30B, cluster, training, base)
    hidden = estimate(QWEN3_30B, cluster, training, base.model_copy(update={"moe_a2a_overlap": True}))
    assert hidden.breakdown["ep_comm"] < 0.5 * plain.breakdown["ep_comm"]
    # Its memory cost: the next micro-batch's forward runs beside this one's backward, so
    # two micro-batches' activations are held (pp = 1).
    assert hidden.memory.activations_gib > 1.5 * plain.memory.activations_gib


def _acts(m: Mapping, moe: bool, model: ModelSpec = QWEN3_30B) -> float:
    training = TrainingSpec(seq_length=4096, global_batch_size=8)
    return activation_bytes_per_layer(model, training, m, moe, 2.0, 1.0)


@pytest.mark.parametrize("tp", [1, 2])
def test_memory_saved_by_each_recompute_module(tp):
    """Per micro-batch of 4096 tokens in bf16, tp-way sequence parallel: `layernorm` drops
    the two norm outputs (2 x 4096 x 2048 / tp elements); `moe_act` the routed activation
    outputs (4096/tp tokens x 8 experts x 768); `mlp` the dense fc1 and activation outputs
    (3 x 6144 / tp per token); `core_attn` nothing under fused attention."""
    dense = QWEN3_30B.model_copy(update={"num_experts": None, "moe_ffn_hidden_size": None,
                                         "moe_router_topk": None})
    none = Mapping(tp=tp)

    def sel(*modules):
        return Mapping(tp=tp, recompute="selective", recompute_modules=modules)

    T, h = 4096, 2048
    assert _acts(none, True) - _acts(sel("layernorm"), True) == pytest.approx(2 * T * h / tp * 2)
    assert _acts(none, True) - _acts(sel("moe_act"), True) == pytest.approx(T / tp * 8 * 768 * 2)
    assert _acts(none, False, dense) - _acts(sel("mlp"), False, dense) == \
        pytest.approx(T * 3 * 6144 / tp * 2)
    assert _acts(none, True) == _acts(sel("core_attn"), True)
    assert _acts(sel("moe"), True) < _acts(sel("moe_act"), True)


def test_multi_token_prediction_adds_a_layer_on_the_last_stage():
    mtp = QWEN3_30B.model_copy(update={"mtp_num_layers": 1})
    m = Mapping(tp=2, ep=8)
    d, e = layer_params(QWEN3_30B, True, m)
    h = 2048
    assert mtp_params(mtp, m) == pytest.approx((d + 2 * h + 2 * h * h / 2, e))
    assert mtp_params(QWEN3_30B, m) == (0.0, 0.0)
    s = 4096
    extra = megatron_flops_per_sequence(mtp, s) - megatron_flops_per_sequence(QWEN3_30B, s)
    per_layer_mlp = 12 * h * 1.5 * 768 * 8
    attn = 12 * h * h * (1 + 4 / 32 + s / h * 0.5) * (128 * 32 / h)
    logits = 6 * h * 151936  # already a multiple of 128
    assert extra == pytest.approx(s * (12 * h * h + attn + per_layer_mlp + logits), rel=1e-9)
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    training = TrainingSpec(seq_length=4096, global_batch_size=64)
    pp = Mapping(ep=4, pp=2)
    with_mtp, without = (estimate(x, cluster, training, pp) for x in (mtp, QWEN3_30B))
    assert with_mtp.memory.per_stage_gib[1] > without.memory.per_stage_gib[1]
    assert with_mtp.memory.per_stage_gib[0] == pytest.approx(without.memory.per_stage_gib[0])
    assert with_mtp.step_time_s > without.step_time_s


def test_fp8_recipes_differ_in_gemm_rate_and_quantization():
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)
    m = Mapping(ep=8, micro_batch_size=8)  # enough work per layer that the GPU, not the host, binds
    steps = {r: estimate(QWEN3_30B, cluster, TrainingSpec(seq_length=4096, global_batch_size=64,
                                                           precision="fp8", fp8_recipe=r), m)
             .breakdown["compute"] for r in ("delayed", "tensorwise", "blockwise")}
    # tensorwise reads each input once more for its amax; blockwise runs its GEMMs slower
    assert steps["delayed"] < steps["tensorwise"] and steps["delayed"] < steps["blockwise"]
    hw = hardware(cluster)
    assert hw.peak_flops["fp8_blockwise"] == pytest.approx(0.9 * hw.peak_flops["fp8"])


def test_a_layer_takes_at_least_its_host_launch_time():
    hw = hardware(ClusterSpec(num_nodes=1, gpus_per_node=8))
    c = Cost(launches=100)
    c.parts["compute"] = 1e-3
    assert host_bound(hw, c).parts["compute"] == pytest.approx(100 * 40e-6)
    big = Cost(launches=100)
    big.parts["compute"] = 1.0
    assert host_bound(hw, big).parts["compute"] == 1.0
    cpu = hardware(ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu"))
    assert cpu.host_launch_s == 0.0  # CPU ranks count their op overhead as compute already


def test_dispatch_data_movement_rows():
    """100 tokens, 800 routed rows: alltoall 2T + 10C with several local experts (8C with
    one); flex lands R = T x 6.60 rows per GPU (EP16, 8 per node) and moves 2T + 4R + 2C."""
    from cost_model.dispatch import routed_traffic

    assert routed_traffic(QWEN3_30B, "alltoall", 16, 8, 100, 800) == 2 * 100 + 10 * 800
    assert routed_traffic(QWEN3_30B, "alltoall", 128, 8, 100, 800) == 2 * 100 + 8 * 800
    rows = 100 * expected_distinct_bins(128, 8, 8)
    assert routed_traffic(QWEN3_30B, "flex", 16, 8, 100, 800) == pytest.approx(
        2 * 100 + 4 * rows + 2 * 800)
