"""executor/profile/fit.py on synthetic measurements: the fits recover the constants the
numbers were made with, counted by the cost model's own collective convention."""

from __future__ import annotations

import pytest

from cost_model.kernels import collective_bytes_and_steps
from cost_model.profile_model import Profile
from executor.profile.fit import fit_k_half, fit_latency_bandwidth, profile_from_ranks

LAT, BW = 150e-6, 1.2e9  # seconds per step, bytes/s
SIZES = ("4096", "262144", "4194304")


def test_fit_recovers_latency_and_bandwidth():
    pts = []
    for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"):
        for size in (4e3, 2.6e5, 4e6):
            sent, steps = collective_bytes_and_steps(op, 4, size)
            pts.append((sent, steps, steps * LAT + sent / BW))
    got_lat, got_bw = fit_latency_bandwidth(pts)
    assert got_lat == pytest.approx(LAT, rel=1e-6)
    assert got_bw == pytest.approx(BW, rel=1e-6)


def test_k_half_fit_recovers_the_short_k_law():
    rate, k_half = 0.04, 96.0
    by_k = {str(k): rate * k / (k + k_half) for k in (64, 128, 256, 512, 1024)}
    got_rate, got_k_half = fit_k_half(by_k)
    assert got_rate == pytest.approx(rate, rel=1e-6)
    assert got_k_half == pytest.approx(k_half, rel=1e-6)


def _rank(rank: int, world: int, slow: float) -> dict:
    """One rank's measurements as measure.measure_rank returns them; collective calls take
    the convention's time, `slow` times longer on this rank."""
    coll = {}
    for op in ("all_reduce", "all_gather", "all_to_all"):
        coll[op] = {}
        for size in SIZES:
            sent, steps = collective_bytes_and_steps(op, world, float(size))
            coll[op][size] = [(steps * LAT + sent / BW) * slow] * 3
    shape = {"tflops_windows": [0.02, 0.03], "tflops": 0.02 + 0.01 * rank}
    return {"rank": rank, "threads": 1, "device": "cpu", "backend": "gloo",
            "gemm": {"fp32": {"512x512x512": shape}, "fp8": {"error": "RuntimeError: no fp8"}},
            "k_sweep": {"m": 512, "n": 512,
                        "tflops_by_k": {str(k): 0.04 * k / (k + 32.0) for k in (64, 256, 1024)}},
            "memory": {"buffer_bytes": 1 << 20, "GBps": 2.0 + rank},
            "overhead": {"add": {"us_per_op": 8.0 + rank}},
            "collectives": coll, "world": world, "local_world": world}


def test_profile_from_ranks_takes_the_slowest_rank_of_each_call():
    # Rank 1 is the slow one: every call ends when it does, so its times are the fitted ones.
    ranks = [_rank(0, 2, 0.5), _rank(1, 2, 1.0)]
    prof = profile_from_ranks(ranks, 12.5, {"cpu_count": 2})
    assert isinstance(prof, Profile) and prof.nproc == 2 and prof.backend == "gloo"
    assert prof.intra_node_GBps == pytest.approx(BW / 1e9, rel=1e-6)
    assert prof.intra_node_latency_us == pytest.approx(LAT * 1e6, rel=1e-6)
    assert (prof.inter_node_GBps, prof.inter_node_latency_us) == (
        prof.intra_node_GBps, prof.intra_node_latency_us)
    # Median over the two ranks; a precision that failed to run is kept in raw only.
    assert prof.gemm_tflops == {"fp32": pytest.approx(0.025)}
    assert prof.raw["gemm"]["fp8"] == {"error": "RuntimeError: no fp8"}
    assert prof.hbm_GBps == 2.5 and prof.kernel_overhead_us == 8.5
    assert prof.gemm_k_half == pytest.approx(32.0, rel=1e-6)
    points = prof.raw["collectives"]["points"]
    assert len(points) == 9 and set(prof.raw["collectives"]["fits"]) == {
        "all_reduce", "all_gather", "all_to_all", "joint"}
    ar = next(p for p in points if p["op"] == "all_reduce" and p["bytes_per_rank_buffer"] == 4096)
    assert (ar["bytes_sent_per_rank"], ar["latency_steps"]) == (4096.0, 2.0)


def test_ranks_on_several_hosts_measure_only_the_network():
    ranks = [_rank(0, 2, 1.0), _rank(1, 2, 1.0)]
    prof = profile_from_ranks(ranks, 3.0, {}, ranks_per_host=1)
    assert prof.intra_node_GBps is None and prof.intra_node_latency_us is None
    assert prof.inter_node_GBps == pytest.approx(BW / 1e9, rel=1e-6)
    assert "only inter_node_*" in prof.notes


def test_one_rank_has_no_links():
    one = _rank(0, 1, 1.0)
    del one["collectives"]
    prof = profile_from_ranks([one], 1.0, {})
    assert prof.intra_node_GBps is None and "collectives" not in prof.raw
