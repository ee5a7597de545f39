"""`training.runtime: foldplan` (cost_model/foldplan_runtime.py): hand-worked numbers from a
profile whose executor measurements are given, so each mechanism (ops x per-op cost, GEMMs by
shape, bandwidth by size, the step outside the micro-batches) can be checked on its own."""

from __future__ import annotations

import math

import pytest

from cost_model.estimate import estimate
from cost_model.foldplan_runtime import (
    gemm_seconds,
    gemm_shape_rate,
    linear_seconds,
    moe_layer_ops,
    moe_layer_ops_key,
    traffic_bps,
)
from cost_model.presets import preset_model
from cost_model.profile_model import ExecutorProfile, GemmShapeLaw, Profile
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec

FAST = GemmShapeLaw(tflops=1e8, m_half=0, n_half=0, k_half=0)  # GEMMs that cost nothing
TINY = preset_model("tiny-moe")  # 4 MoE layers, width 128, 8 experts top-2, vocab 256
TRAINING = TrainingSpec(seq_length=64, global_batch_size=4, precision="fp32",
                        runtime="foldplan")


def executor(**over) -> ExecutorProfile:
    """Executor numbers where only ops cost anything unless a test says otherwise."""
    base = {"us_per_op": 10.0, "edge_ops": 50, "dense_layer_ops": 80,
            "moe_layer_ops": {"local": 100, "alltoall_ep": 130, "alltoall_etp": 140},
            "step_ops": 20, "step_ops_per_layer": 5,
            "weight_bytes_per_param": {"moe_layer": 0.0, "dense_layer": 0.0, "edge": 0.0},
            "row_passes": {"moe_layer": 0.0, "dense_layer": 0.0, "edge": 0.0},
            "optimizer_ns_per_param": 1e-6, "step_rest_ns_per_param": 0.0, "gemm": FAST,
            "sdpa_tflops": 1e8, "traffic_GBps": {"1000": 1e8}}
    return ExecutorProfile(**(base | over))


def cluster(ex: ExecutorProfile | None, gpus: int = 1, gpu: str = "cpu") -> ClusterSpec:
    return ClusterSpec(num_nodes=1, gpus_per_node=gpus, gpu=gpu,
                       profile=Profile(gemm_tflops={"fp32": 0.05}, hbm_GBps=10.0,
                                       kernel_overhead_us=3.0, executor=ex))


def test_gemm_rate_falls_with_small_shapes_as_the_law_says():
    law = GemmShapeLaw(tflops=0.04, m_half=32, n_half=64, k_half=16)
    # The docstring's example: 0.04e12 * 256/288 * 128/192 * 512/528.
    assert gemm_shape_rate(law, 256, 128, 512) == pytest.approx(2.2985e10, rel=1e-4)
    # 2 * 256 * 128 * 512 FLOPs at that rate; a 16-row GEMM runs at 16/48 of the m efficiency.
    assert gemm_seconds(law, 256, 128, 512) == pytest.approx(33554432 / 2.2985e10, rel=1e-4)
    assert gemm_shape_rate(law, 16, 128, 512) / gemm_shape_rate(law, 256, 128, 512) == (
        pytest.approx((16 / 48) / (256 / 288)))
    # A linear layer: forward (T x n_out x n_in), dgrad (T x n_in x n_out), wgrad
    # (n_in x n_out x T): the wgrad's inner dimension is the token count.
    fwd, bwd = linear_seconds(law, 16, 128, 512)
    assert fwd == pytest.approx(gemm_seconds(law, 16, 512, 128))
    assert bwd == pytest.approx(gemm_seconds(law, 16, 128, 512) + gemm_seconds(law, 128, 512, 16))


def test_bandwidth_by_size_interpolates_in_log_size():
    ex = executor(traffic_GBps={"1024": 40.0, "1048576": 10.0})
    assert traffic_bps(ex, 100) == 40e9  # below the smallest size: the smallest's
    assert traffic_bps(ex, 1 << 30) == 10e9  # above the largest: the largest's
    assert traffic_bps(ex, 32768) == pytest.approx(25e9)  # halfway in log(size)


def test_moe_layer_ops_by_layout():
    ex = executor()
    assert moe_layer_ops_key("alltoall", 1, 1, False) == "local"
    assert moe_layer_ops_key("allgather", 2, 1, True) == "allgather_ep_capacity"
    assert moe_layer_ops(ex, "alltoall", 2, 1, False) == 130
    # ep x etp not measured: the ep layout plus what etp adds to the local one.
    assert moe_layer_ops(ex, "alltoall", 2, 2, False) == 130 + 140 - 100
    # capacity not measured: the dropless count; another dispatcher: alltoall's.
    assert moe_layer_ops(ex, "alltoall", 2, 1, True) == 130
    assert moe_layer_ops(ex, "allgather", 2, 1, False) == 130


def test_ops_times_per_op_cost_by_hand():
    # One CPU rank, 4 micro-batches of 4 MoE layers: compute = 4 * (4 * 100 + 50) ops * 10 us
    # = 18 ms; outside the micro-batches (20 + 4 * 5) ops * 10 us = 0.4 ms. No communication.
    est = estimate(TINY, cluster(executor()), TRAINING, Mapping(micro_batch_size=1))
    assert est.breakdown["compute"] == pytest.approx(0.018, rel=1e-6)
    assert est.breakdown["optimizer"] == pytest.approx(0.0004, rel=1e-3)
    assert est.step_time_s == pytest.approx(0.0184, rel=1e-3)
    # Twice the per-op cost: twice the time (nothing else costs anything here).
    double = estimate(TINY, cluster(executor(us_per_op=20.0)), TRAINING, Mapping())
    assert double.step_time_s == pytest.approx(2 * est.step_time_s, rel=1e-3)


def test_cpu_time_over_the_share_of_a_core_is_wall_time():
    # The same executor numbers as CPU time, each rank getting 0.4 of a core: every executor
    # term is 1 / 0.4 = 2.5 times as long (the first test's 18 ms and 0.4 ms); communication
    # (none here) would stay as measured.
    est = estimate(TINY, cluster(executor(cpu_share={"local": 0.4})), TRAINING, Mapping())
    assert est.breakdown["compute"] == pytest.approx(0.018 / 0.4, rel=1e-6)
    assert est.breakdown["optimizer"] == pytest.approx(0.0004 / 0.4, rel=1e-3)
    # Two ranks, ep 2: the expert-parallel layout's share (0.5); the all-to-alls and small
    # collectives do not scale with it.
    shares = {"local": 0.9, "local_dp": 0.8, "alltoall_ep": 0.5}
    shared = estimate(TINY, cluster(executor(cpu_share=shares), gpus=2), TRAINING,
                      Mapping(ep=2, micro_batch_size=1))
    alone = estimate(TINY, cluster(executor(), gpus=2), TRAINING,
                     Mapping(ep=2, micro_batch_size=1))
    assert shared.breakdown["compute"] == pytest.approx(2 * alone.breakdown["compute"], rel=1e-9)
    assert shared.breakdown["ep_comm"] == pytest.approx(alone.breakdown["ep_comm"], rel=1e-9)
    assert alone.breakdown["ep_comm"] > 0
    # GPU ranks: the host issues while the device runs; the share does not apply.
    gpu = estimate(TINY, cluster(executor(cpu_share={"local": 0.4}), gpu="h100"), TRAINING,
                   Mapping())
    assert gpu.step_time_s == pytest.approx(
        estimate(TINY, cluster(executor(), gpu="h100"), TRAINING, Mapping()).step_time_s)


def test_the_share_of_the_nearest_measured_layout():
    from cost_model.foldplan_runtime import cpu_share

    ex = executor(cpu_share={"local": 0.9, "local_dp": 0.8, "alltoall_ep": 0.5})
    assert cpu_share(ex, 2, 1, True) == 0.5  # ep 2
    assert cpu_share(ex, 1, 2, True) == 0.5  # etp 2: expert-parallel calls as well
    assert cpu_share(ex, 1, 1, True) == 0.8  # data-parallel only
    assert cpu_share(ex, 1, 1, False) == 0.9  # one rank
    # Missing layouts: the next down the list; nothing measured: 1 (wall-time numbers).
    assert cpu_share(executor(cpu_share={"local_dp": 0.7}), 4, 1, True) == 0.7
    assert cpu_share(executor(), 2, 1, True) == 1.0


def test_without_the_mechanism_the_estimate_is_megatrons():
    megatron = TRAINING.model_copy(update={"runtime": "megatron"})
    ours = estimate(TINY, cluster(executor()), TRAINING, Mapping()).step_time_s
    theirs = estimate(TINY, cluster(executor()), megatron, Mapping()).step_time_s
    assert ours != pytest.approx(theirs, rel=0.05)
    # No executor measurements in the profile: runtime foldplan predicts as megatron does.
    assert estimate(TINY, cluster(None), TRAINING, Mapping()).step_time_s == pytest.approx(
        estimate(TINY, cluster(None), megatron, Mapping()).step_time_s, rel=1e-12)


def test_every_gemm_shape_by_hand():
    # Only GEMMs cost (ops ~0, attention core ~0). Per micro-batch of 64 tokens, each of the 4
    # layers: q/k/v (128 -> (8 + 2*4) * 16 = 256), output projection (128 -> 128), router
    # (128 -> 8), 8 experts of 16.5 rows (64 tokens * top-2 / 8, times the busiest rank's
    # load (1.25 + 7) / 8) through w1 (128 -> 2 * 256) and w2 (256 -> 128); then the output
    # layer (128 -> 256). Each linear: forward, dgrad and wgrad at the law's rate.
    law = GemmShapeLaw(tflops=0.05, m_half=24, n_half=48, k_half=12)
    ex = executor(us_per_op=1e-6, edge_ops=0, moe_layer_ops={"local": 0}, step_ops=0,
                  step_ops_per_layer=0, gemm=law)
    got = estimate(TINY, cluster(ex), TRAINING, Mapping()).breakdown["compute"]
    rows = 64 * 2 / 8 * (1.25 + 7) / 8

    def lin(tokens, n_in, n_out, groups=1):
        return sum(linear_seconds(law, tokens, n_in, n_out, groups))

    layer = (lin(64, 128, 256) + lin(64, 128, 128) + lin(64, 128, 8)
             + lin(rows, 128, 512, 8) + lin(rows, 256, 128, 8))
    want = 4 * (4 * layer + lin(64, 128, 256))
    assert got == pytest.approx(want, rel=1e-4)  # the rest (ops, core, traffic) ~1e-7 of it
    # Removing the small-shape law (every half 0) makes it faster: the law is what is measured.
    flat = ex.model_copy(update={"gemm": law.model_copy(update={"m_half": 0, "n_half": 0,
                                                                 "k_half": 0})})
    assert estimate(TINY, cluster(flat), TRAINING, Mapping()).breakdown["compute"] < 0.8 * got


def test_traffic_terms_by_hand():
    # Row passes: 3 h-wide fp32 rows per token per MoE layer at 1e9 B/s: 4 mb * 4 layers *
    # 64 tokens * 3 * 128 * 4 B / 1e9 = 1.572864 ms more compute. Weight traffic: 2 B per
    # parameter of each layer (dense 2 * 128 + 8 * 128 + q/k/v/o 128 * 256 + 128 * 128;
    # experts 8 * 3 * 128 * 256) at the same rate.
    base = executor(traffic_GBps={"1000": 1.0})
    rows = base.model_copy(update={"row_passes": {"moe_layer": 3.0, "dense_layer": 0.0,
                                                  "edge": 0.0}})
    a = estimate(TINY, cluster(base), TRAINING, Mapping()).breakdown["compute"]
    b = estimate(TINY, cluster(rows), TRAINING, Mapping()).breakdown["compute"]
    assert b - a == pytest.approx(4 * 4 * 64 * 3 * 128 * 4 / 1e9, rel=1e-6)
    params = 2 * 128 + 8 * 128 + 128 * 256 + 128 * 128 + 8 * 3 * 128 * 256
    weights = base.model_copy(update={"weight_bytes_per_param": {"moe_layer": 2.0,
                                                                  "dense_layer": 0.0,
                                                                  "edge": 0.0}})
    c = estimate(TINY, cluster(weights), TRAINING, Mapping()).breakdown["compute"]
    assert c - a == pytest.approx(4 * 4 * params * 2 / 1e9, rel=1e-6)


def test_step_outside_micro_batches_by_hand():
    # 2 ranks, dp 2, ep 2: rank 0 holds every dense parameter and half the experts; AdamW runs
    # on half of each (distributed optimizer), the rest of the step on all of them.
    ex = executor(optimizer_ns_per_param=2.0, step_rest_ns_per_param=3.0)
    m = Mapping(ep=2, micro_batch_size=1)
    est = estimate(TINY, cluster(ex, gpus=2), TRAINING, m)
    h, f, v, layers = 128, 256, 256, 4
    attn = h * (8 + 2 * 4) * 16 + 8 * 16 * h
    dense = layers * (attn + 2 * h + h * 8) + v * h + h + v * h  # + embedding, norm, output
    expert = layers * 4 * 3 * h * f  # 4 local experts of 8
    ops = (20 + 5 * layers) * 10e-6
    want = ops + (dense + expert) * 3e-9 + (dense / 2 + expert / 1) * 2e-9  # edp = 1
    assert est.breakdown["optimizer"] == pytest.approx(want, rel=1e-9)


def test_gpu_ranks_take_the_longer_of_host_and_device():
    # On a GPU the host issues ops while the device computes: with 1e9 ops the host's
    # ops * us bounds each block, so compute is exactly the ops' time.
    ex = executor(moe_layer_ops={"local": 1e6}, edge_ops=1e6, us_per_op=10.0)
    gpu = TRAINING.model_copy(update={"precision": "bf16"})
    est = estimate(TINY, cluster(ex, gpu="h100"), gpu, Mapping())
    assert est.breakdown["compute"] == pytest.approx(4 * (4 + 1) * 1e6 * 10e-6, rel=1e-6)
    assert math.isfinite(est.step_time_s)


def test_a_runs_prediction_is_the_foldplan_runtimes():
    # api/prediction.py: a run is our executor, so its `predicted` uses runtime foldplan
    # whenever the profile carries executor measurements, and is the plan's estimate otherwise.
    from api.prediction import machine_prediction

    megatron = TRAINING.model_copy(update={"runtime": "megatron"})
    plan_cluster = cluster(executor())
    plan_est = estimate(TINY, plan_cluster, megatron, Mapping())
    plan = {"model": TINY.model_dump(mode="json"), "cluster": plan_cluster.model_dump(mode="json"),
            "training": megatron.model_dump(mode="json"),
            "candidates": [{"mapping": Mapping().model_dump(mode="json"),
                            "estimate": plan_est.model_dump(mode="json")}]}
    ours = estimate(TINY, plan_cluster, TRAINING, Mapping()).step_time_s
    assert machine_prediction(plan, 0, None)["step_time_s"] == pytest.approx(ours, rel=1e-12)
    # A server's run profile: the same.
    profile = plan_cluster.profile.model_dump(mode="json") | {"backend": "gloo"}
    assert machine_prediction(plan, 0, profile)["step_time_s"] == pytest.approx(ours, rel=1e-12)
    # Without executor measurements: the plan's estimate, unchanged.
    plain = cluster(None)
    plan["cluster"] = plain.model_dump(mode="json")
    plan["candidates"][0]["estimate"] = estimate(TINY, plain, megatron, Mapping()).model_dump(
        mode="json")
    assert machine_prediction(plan, 0, None)["step_time_s"] == plan["candidates"][0][
        "estimate"]["step_time_s"]


def test_the_planners_floors_read_the_executor_blocks():
    # The hook replaces the blocks the planner's floors are built from: each layer's floor is
    # its executor cost (no recompute here), not Megatron's.
    from cost_model.estimate import make_context, micro_batch_costs, micro_batch_floor
    from cost_model.hardware import hardware

    cl = cluster(executor(moe_layer_ops={"local": 1e4}))
    m = Mapping(micro_batch_size=1, dp=1, edp=1, sequence_parallel=False)
    ctx = make_context(TINY, cl, TRAINING, m, hardware(cl))
    layers = micro_batch_costs(ctx, {})[0]
    floors = micro_batch_floor(ctx, {})[0]
    assert floors[True] == pytest.approx(layers[True].total, rel=1e-9)
    assert floors[True] >= 1e4 * 10e-6  # the layer's ops at 10 us
