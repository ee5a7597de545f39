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


def test_gemm_shape_law_fit_recovers_the_law():
    from cost_model.foldplan_runtime import gemm_shape_rate
    from cost_model.profile_model import GemmShapeLaw
    from executor.profile.fit import fit_gemm_shape_law

    law = GemmShapeLaw(tflops=0.05, m_half=16, n_half=64, k_half=8)  # halves on the fit's grid
    grid = {f"{m}x{n}x{k}": gemm_shape_rate(law, m, n, k) / 1e12
            for m in (16, 64, 256, 1024) for n in (64, 256, 1024) for k in (32, 128, 512)}
    got = fit_gemm_shape_law(grid)
    assert (got.m_half, got.n_half, got.k_half) == pytest.approx((16, 64, 8), rel=1e-9)
    assert got.tflops == pytest.approx(0.05, rel=1e-9)


def _executor_rank(us: float) -> dict:
    """One rank's executor measurements (executor_ops.measure_executor's format), made from
    a known layer: 100 ops and 12 B/param + 1000 B/token per MoE layer, a dense layer 60 ops
    and 8 B/param + 600 B/token, the edge 40 ops, 4 B/param and 2048 B/token."""
    seq, h, vocab = 16, 32, 256

    def run(moe: int, dense: int, s: int, extra_rest: int = 0) -> dict:
        params = {"moe": 5000, "dense": 2000, "edge": 1000}
        p = moe * params["moe"] + dense * params["dense"] + params["edge"]
        b = (moe * (12 * params["moe"] + 1000 * s) + dense * (8 * params["dense"] + 600 * s)
             + 4 * params["edge"] + 2048 * s)
        return {"sched_ops": 40 + 100 * moe + 60 * dense, "sched_bytes": float(b),
                "rest_ops": 30 + 7 * (moe + dense) + extra_rest, "params": p}

    counts = {"local": {"moe1": run(1, 0, seq), "moe2": run(2, 0, seq), "dense": run(1, 1, seq),
                        "moe1_2s": run(1, 0, 2 * seq), "moe2_2s": run(2, 0, 2 * seq),
                        "dense_2s": run(1, 1, 2 * seq)},
              "alltoall_ep": {"moe1": run(1, 0, seq) | {"sched_ops": 40 + 130},
                              "moe2": run(2, 0, seq) | {"sched_ops": 40 + 260}}}
    return {"seq": seq, "hidden": h, "vocab": vocab, "counts": counts,
            "op_time": {"us_per_op": us},
            "traffic": [{"row_bytes": 98304, "GBps": 3.0 + us / 2},
                        {"row_bytes": 393216, "GBps": 100.0}],
            "step_time": {"optimizer_s_per_param": 2e-9, "rest_s_per_param": 3e-9}}


def test_executor_numbers_from_the_ranks_counts():
    from executor.profile.fit import executor_profile

    ranks = []
    for r, us in enumerate((10.0, 14.0)):
        rank = _rank(r, 2, 1.0)
        grid = {f"{m}x{n}x{k}": 0.04 for m in (16, 256) for n in (64, 1024) for k in (32, 512)}
        rank |= {"executor": _executor_rank(us),
                 "sdpa": {"shape_bhsd": [1, 4, 256, 32], "tflops": 0.01},
                 "elementwise_GBps": {"65536": 20.0 + r, "1048576": 8.0},
                 "small_gemm": {"precision": "fp32", "tflops": grid}}
        ranks.append(rank)
    ex, raw = executor_profile(ranks)
    assert ex.us_per_op == 12.0  # median over ranks
    assert ex.moe_layer_ops == {"local": 100, "alltoall_ep": 130}
    assert (ex.dense_layer_ops, ex.edge_ops) == (60, 40)
    assert (ex.step_ops, ex.step_ops_per_layer) == (30, 7)
    # per token: 1000 B over 4 * 32 B rows, 600 B likewise; the edge's 2048 B over 4 * 256.
    assert ex.row_passes == {"moe_layer": pytest.approx(1000 / 128),
                             "dense_layer": pytest.approx(600 / 128),
                             "edge": pytest.approx(2048 / 1024)}
    assert ex.weight_bytes_per_param == {"moe_layer": pytest.approx(12),
                                         "dense_layer": pytest.approx(8),
                                         "edge": pytest.approx(4)}
    assert ex.optimizer_ns_per_param == pytest.approx(2)
    assert ex.step_rest_ns_per_param == pytest.approx(3)
    # median of 8 and 10; a rate above the hot-buffer elementwise one (20.5) is capped at it
    assert ex.traffic_GBps == {"98304": 9.0, "393216": 20.5}
    assert raw["elementwise_GBps"] == {"65536": 20.5, "1048576": 8.0}
    assert ex.gemm.tflops == pytest.approx(0.04) and ex.gemm.m_half == 0
    assert len(raw["executor"]) == 2
    assert ex.cpu_share == {}  # no lockstep measurement: the executor numbers as they are
    # The whole profile carries it; ranks without executor measurements give none.
    assert profile_from_ranks(ranks, 1.0, {}).executor == ex
    assert profile_from_ranks([_rank(0, 2, 1.0), _rank(1, 2, 1.0)], 1.0, {}).executor is None


def test_cpu_share_is_the_lockstep_share_of_the_ranks():
    from executor.profile.fit import cpu_share, executor_profile

    # Per layout, the median over ranks of the share (CPU over wall of the steps the ranks
    # trained together in that layout; `local`: each alone).
    got = cpu_share([{"share": {"local": 0.9, "local_dp": 0.4, "alltoall_ep": 0.3}},
                     {"share": {"local": 0.8, "local_dp": 0.5, "alltoall_ep": 0.2}}])
    assert got == pytest.approx({"local": 0.85, "local_dp": 0.45, "alltoall_ep": 0.25})
    # Older profiles (no lockstep measurement, wall-time numbers): none.
    assert cpu_share([None, None]) == {}
    ranks = []
    for r in range(2):
        rank = _rank(r, 2, 1.0)
        grid = {f"{m}x{n}x{k}": 0.04 for m in (16, 256) for n in (64, 1024) for k in (32, 512)}
        rank |= {"executor": _executor_rank(10.0) | {"lockstep": {
                     "share": {"local": 0.9, "local_dp": 0.3 + 0.2 * r}}},
                 "sdpa": {"shape_bhsd": [1, 4, 256, 32], "tflops": 0.01},
                 "elementwise_GBps": {"65536": 20.0, "1048576": 8.0},
                 "small_gemm": {"precision": "fp32", "tflops": grid}}
        ranks.append(rank)
    assert executor_profile(ranks)[0].cpu_share == pytest.approx({"local": 0.9,
                                                                  "local_dp": 0.4})
