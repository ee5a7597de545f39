"""`executor.profile`: a real quick profile of 2 gloo ranks feeds the cost model; the
latency/bandwidth fit recovers known constants."""

from __future__ import annotations

import json
import math

import pytest

from cost_model.estimate import estimate
from cost_model.hardware import hardware
from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec
from executor.profile import _coll_bytes_steps, fit_latency_bandwidth, run_profile

KEYS = ("hbm_GBps", "kernel_overhead_us", "intra_node_GBps", "intra_node_latency_us",
        "inter_node_GBps", "inter_node_latency_us")


def test_fit_recovers_latency_and_bandwidth():
    lat, bw = 150e-6, 1.2e9
    pts = []
    for op in ("all_reduce", "all_gather", "all_to_all"):
        for size in (4e3, 2.6e5, 4e6):
            sent, steps = _coll_bytes_steps(op, 4, size)
            pts.append((sent, steps, steps * lat + sent / bw))
    got_lat, got_bw = fit_latency_bandwidth(pts)
    assert got_lat == pytest.approx(lat, rel=1e-6)
    assert got_bw == pytest.approx(bw, rel=1e-6)


def test_bytes_convention_matches_cost_model():
    # all-reduce of S: 2(p-1)/p S; all-gather of C per rank: (p-1) C; all-to-all: (p-1)/p V
    assert _coll_bytes_steps("all_reduce", 4, 1000.0) == (1500.0, 6.0)
    assert _coll_bytes_steps("all_gather", 4, 1000.0) == (3000.0, 3.0)
    assert _coll_bytes_steps("all_to_all", 4, 1000.0) == (750.0, 1.75)


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    prof = run_profile(out, nproc=2, quick=True, timeout_s=120)
    assert json.loads(out.read_text()) == prof
    return prof


def test_quick_profile_has_sane_numbers(quick_profile):
    p = quick_profile
    assert p["nproc"] == 2 and p["backend"] == "gloo"
    # One CPU rank: between 1 GFLOP/s and 10 TFLOP/s; memory 0.1-1000 GB/s; loopback
    # gloo 1 MB/s-1000 GB/s, latency 1 us-100 ms; an eager op 0.1-1000 us.
    assert 1e-3 < p["gemm_tflops"]["fp32"] < 10
    assert 0.1 < p["hbm_GBps"] < 1000
    assert 1e-3 < p["intra_node_GBps"] < 1000
    assert 1 < p["intra_node_latency_us"] < 1e5
    assert 0.1 < p["kernel_overhead_us"] < 1000
    assert p["inter_node_GBps"] == p["intra_node_GBps"]
    for k in KEYS:
        assert math.isfinite(p[k]) and p[k] > 0, k
    assert len(p["raw"]["collectives"]["points"]) == 9
    assert set(p["raw"]["collectives"]["fits"]) == {"all_reduce", "all_gather", "all_to_all", "joint"}
    assert p["machine"]["cpu_count"] >= 1
    assert p["gemm_k_half"] >= 0 and len(p["raw"]["gemm"]["k_sweep"]["tflops_by_k"]) == 5


def test_profile_feeds_the_cost_model(quick_profile):
    p = quick_profile
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu", profile=p)
    hw = hardware(cluster)
    # The GEMM rate the cost model uses is the measured one (efficiency folded in).
    assert hw.peak_flops["fp32"] * hw.gemm_efficiency == pytest.approx(p["gemm_tflops"]["fp32"] * 1e12)
    assert hw.intra_bps == pytest.approx(p["intra_node_GBps"] * 1e9)
    assert hw.intra_latency_s == pytest.approx(p["intra_node_latency_us"] * 1e-6)
    training = TrainingSpec(seq_length=256, global_batch_size=8, precision="fp32")
    est = estimate(preset_model("tiny-moe"), cluster, training, Mapping(ep=2, micro_batch_size=2))
    assert est.fits_memory and 0 < est.step_time_s < 1000
    assert est.breakdown["ep_comm"] > 0


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nproc=0"):
        run_profile(tmp_path / "p.json", nproc=0)
    with pytest.raises(ValueError, match="backend='mpi'"):
        run_profile(tmp_path / "p.json", nproc=1, backend="mpi")


@pytest.mark.slow
def test_single_rank_profile_has_no_links(tmp_path):
    p = run_profile(tmp_path / "p1.json", nproc=1, quick=True, timeout_s=120)
    assert p["intra_node_GBps"] is None and "collectives" not in p["raw"]
    hw = hardware(ClusterSpec(num_nodes=1, gpus_per_node=1, gpu="cpu", profile=p))
    assert hw.intra_bps > 0  # the preset's value applies


def test_k_half_fit_recovers_the_short_k_law():
    from executor.profile import fit_k_half

    rate, k_half = 0.04, 96.0
    by_k = {str(k): rate * k / (k + k_half) for k in (64, 128, 256, 512, 1024)}
    got_rate, got_k_half = fit_k_half(by_k)
    assert got_rate == pytest.approx(rate, rel=1e-6)
    assert got_k_half == pytest.approx(k_half, rel=1e-6)
