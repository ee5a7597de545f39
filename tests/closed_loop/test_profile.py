"""`executor.profile`: a real quick profile of 2 gloo ranks feeds the cost model, and the
file it writes reads back as the same typed profile (the pure fits: test_profile_fit.py)."""

from __future__ import annotations

import math

import pytest

from cost_model.estimate import estimate
from cost_model.hardware import hardware
from cost_model.presets import preset_model
from cost_model.profile_model import Profile, load_profile
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec
from executor.profile import run_profile

KEYS = ("hbm_GBps", "kernel_overhead_us", "intra_node_GBps", "intra_node_latency_us",
        "inter_node_GBps", "inter_node_latency_us")


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory) -> Profile:
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    prof = run_profile(out, nproc=2, quick=True, timeout_s=120)
    assert load_profile(out) == prof  # what the profiler writes reads back unchanged
    return prof


def test_quick_profile_has_sane_numbers(quick_profile):
    p = quick_profile
    assert p.nproc == 2 and p.backend == "gloo"
    # One CPU rank: between 1 GFLOP/s and 10 TFLOP/s; memory 0.1-1000 GB/s; loopback
    # gloo 1 MB/s-1000 GB/s, latency 1 us-100 ms; an eager op 0.1-1000 us.
    assert 1e-3 < p.gemm_tflops["fp32"] < 10
    assert 0.1 < p.hbm_GBps < 1000
    assert 1e-3 < p.intra_node_GBps < 1000
    assert 1 < p.intra_node_latency_us < 1e5
    assert 0.1 < p.kernel_overhead_us < 1000
    assert p.inter_node_GBps == p.intra_node_GBps
    for k in KEYS:
        assert math.isfinite(getattr(p, k)) and getattr(p, k) > 0, k
    assert len(p.raw["collectives"]["points"]) == 9
    assert set(p.raw["collectives"]["fits"]) == {"all_reduce", "all_gather", "all_to_all", "joint"}
    assert p.machine["cpu_count"] >= 1
    assert p.gemm_k_half >= 0 and len(p.raw["gemm"]["k_sweep"]["tflops_by_k"]) == 5


def test_profile_feeds_the_cost_model(quick_profile):
    p = quick_profile
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu", profile=p)
    hw = hardware(cluster)
    # The GEMM rate the cost model uses is the measured one (efficiency folded in).
    assert hw.peak_flops["fp32"] * hw.gemm_efficiency == pytest.approx(p.gemm_tflops["fp32"] * 1e12)
    assert hw.intra_bps == pytest.approx(p.intra_node_GBps * 1e9)
    assert hw.intra_latency_s == pytest.approx(p.intra_node_latency_us * 1e-6)
    training = TrainingSpec(seq_length=256, global_batch_size=8, precision="fp32")
    est = estimate(preset_model("tiny-moe"), cluster, training, Mapping(ep=2, micro_batch_size=2))
    assert est.fits_memory and 0 < est.step_time_s < 1000
    assert est.breakdown["ep_comm"] > 0


def test_profile_measures_the_executor(quick_profile):
    import torch

    from executor.profile.executor_ops import _counts, _Layouts

    ex = quick_profile.executor
    assert ex is not None and 0.1 < ex.us_per_op < 1000
    assert {"local", "local_capacity", "local_dp", "alltoall_ep", "allgather_ep",
            "alltoall_etp"} <= set(ex.moe_layer_ops)
    assert all(v > 0 for v in ex.moe_layer_ops.values()) and ex.dense_layer_ops > 0
    # ep 2 moves tokens: dispatch and combine all-to-alls forward and backward at least.
    assert ex.moe_layer_ops["alltoall_ep"] > ex.moe_layer_ops["local"]
    assert ex.moe_layer_collectives["alltoall_ep"]["all_to_all"] >= 4
    assert ex.row_passes["moe_layer"] > 0 and ex.weight_bytes_per_param["moe_layer"] > 0
    assert ex.gemm.tflops > 0 and ex.sdpa_tflops > 0 and len(ex.traffic_GBps) == 1 and ex.traffic_GBps["98304"] > 0
    # On CPU the executor numbers are CPU time and the share of a core turns them into wall
    # time: a rank's threads get at most a core each (timer granularity aside).
    lock = quick_profile.raw["executor"][0]["lockstep"]
    threads = quick_profile.threads_per_rank
    assert lock["clock"] == ("thread_time" if threads == 1 else "process_time")
    assert len(lock["wall_s"]["alltoall_ep"]) == 4
    assert set(ex.cpu_share) == {"local", "local_dp", "alltoall_ep"}
    assert all(0 < x <= threads + 0.05 for x in ex.cpu_share.values())
    # The counts are what the executor does now, not constants: counted again here, the same.
    again = _counts(_Layouts(None, 1, torch.device("cpu")), {}, None, full=False)
    assert ex.moe_layer_ops["local"] == again["moe2"]["sched_ops"] - again["moe1"]["sched_ops"]
    # runtime foldplan predicts with it: another number than runtime megatron.
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu", profile=quick_profile)
    training = TrainingSpec(seq_length=256, global_batch_size=8, precision="fp32")
    m = Mapping(ep=2, micro_batch_size=2)
    ours = estimate(preset_model("tiny-moe"), cluster,
                    training.model_copy(update={"runtime": "foldplan"}), m)
    theirs = estimate(preset_model("tiny-moe"), cluster, training, m)
    assert 0 < ours.step_time_s < 1000 and ours.step_time_s != theirs.step_time_s


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nproc=0"):
        run_profile(tmp_path / "p.json", nproc=0)
    with pytest.raises(ValueError, match="backend='mpi'"):
        run_profile(tmp_path / "p.json", nproc=1, backend="mpi")


@pytest.mark.slow
def test_single_rank_profile_has_no_links(tmp_path):
    p = run_profile(tmp_path / "p1.json", nproc=1, quick=True, timeout_s=120)
    assert p.intra_node_GBps is None and "collectives" not in p.raw
    hw = hardware(ClusterSpec(num_nodes=1, gpus_per_node=1, gpu="cpu", profile=p))
    assert hw.intra_bps > 0  # the preset's value applies
