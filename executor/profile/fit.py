"""From the ranks' raw measurements to a `Profile`: medians, and the fits of the cost model's
laws. Pure functions (numpy, no torch), testable on synthetic numbers.

- GEMM: per shape the median over ranks of each rank's median window; `gemm_tflops` is the
  median over shapes. The k sweep is fitted to the cost model's short-k law
  rate(k) = R k / (k + k_half) (`fit_k_half`).
- Memory and op overhead: the median over ranks.
- The executor (`executor` of the profile, read by `training.runtime: foldplan`): medians over
  ranks of the per-op time, the op counts and bytes turned into per-layer, per-token and
  per-parameter numbers (`executor_profile`), the small-GEMM grid fitted to
  `cost_model.foldplan_runtime.gemm_shape_rate` (`fit_gemm_shape_law`), the share of a core
  the ranks got in lockstep (`cpu_share`).
- Collectives: a call ends when its slowest rank does, so each call counts as the slowest
  rank's time, and each (op, size) point as the median over calls. Bytes sent per rank and
  latency steps are `cost_model.kernels.collective_bytes_and_steps`, the convention the cost
  model prices collectives with; one fit of t = steps * latency + bytes_sent / bandwidth over
  all points (`fit_latency_bandwidth`) gives the link's bandwidth and latency per step.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from cost_model.kernels import collective_bytes_and_steps
from cost_model.profile_model import ExecutorProfile, GemmShapeLaw, Profile

HALF_GRID = np.concatenate([[0.0], np.geomspace(1, 4096, 25)])


def fit_latency_bandwidth(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Fit t = steps * L + bytes / B to (bytes, steps, seconds) points, minimizing relative
    residuals; returns (L seconds, B bytes/s), both clamped positive."""
    a = np.array([[s / t, b / t] for b, s, t in points])
    y = np.ones(len(points))
    (lat, inv_bw), *_ = np.linalg.lstsq(a, y, rcond=None)
    if inv_bw <= 0:  # latency-bound everywhere: bandwidth from the largest message alone
        b, s, t = max(points)
        inv_bw = max(t - s * max(lat, 0.0), 1e-12) / b
    if lat <= 0:
        b, s, t = min(points)
        lat = max(t - b * inv_bw, 1e-7) / s
    return float(lat), float(1.0 / inv_bw)


def fit_k_half(tflops_by_k: dict[str, float]) -> tuple[float, float]:
    """Fit rate(k) = R * k / (k + k_half) (the cost model's short-k law, cost_model/kernels.py):
    1/rate = 1/R + (k_half/R) / k is linear in 1/k. Returns (R TFLOP/s, k_half >= 0)."""
    k = np.array([float(x) for x in tflops_by_k])
    inv = 1.0 / np.array(list(tflops_by_k.values()))
    slope, icpt = np.polyfit(1.0 / k, inv, 1)
    if icpt <= 0:
        return float(1.0 / inv.min()), 0.0
    return float(1.0 / icpt), float(max(0.0, slope / icpt))


def fit_gemm_shape_law(tflops_by_shape: dict[str, float]) -> GemmShapeLaw:
    """Fit rate(m, n, k) = R * m/(m+m_half) * n/(n+n_half) * k/(k+k_half) to {"mxnxk":
    TFLOP/s}: least squares in log(rate) over a grid of halves (0 and 1..4096), R in closed
    form (the mean log residual) for each."""
    shapes = np.array([[float(x) for x in key.split("x")] for key in tflops_by_shape])
    log_rate = np.log(np.array(list(tflops_by_shape.values())))
    # log efficiency of each dimension for each half value: [half, point]
    eff = [np.log(shapes[:, i][None, :] / (shapes[:, i][None, :] + HALF_GRID[:, None]))
           for i in range(3)]
    total = eff[0][:, None, None, :] + eff[1][None, :, None, :] + eff[2][None, None, :, :]
    resid = log_rate - total
    log_r = resid.mean(-1)
    err = ((resid - log_r[..., None]) ** 2).sum(-1)
    i, j, k = np.unravel_index(np.argmin(err), err.shape)
    return GemmShapeLaw(tflops=float(np.exp(log_r[i, j, k])), m_half=float(HALF_GRID[i]),
                        n_half=float(HALF_GRID[j]), k_half=float(HALF_GRID[k]))


def cpu_share(per_rank: list[dict | None]) -> dict[str, float]:
    """`ExecutorProfile.cpu_share` from each rank's lockstep measurement (lockstep.py):
    {layout: the median over ranks of its share}; {} when not measured. Example: ranks with
    local_dp shares 0.4 and 0.5 -> {"local_dp": 0.45}."""
    shares = [r["share"] for r in per_rank if isinstance(r, dict) and "share" in r]
    if not shares:
        return {}
    return {k: float(statistics.median(s[k] for s in shares)) for k in shares[0]
            if all(s.get(k, 0) > 0 for s in shares)}


def executor_profile(ranks: list[dict]) -> tuple[ExecutorProfile, dict[str, Any]]:
    """The `executor` section (`ExecutorProfile`) and its raw numbers from the ranks'
    measurements (measure.py, executor_ops.py): medians over ranks; per layer = the 2-layer
    model less the 1-layer one; per token = the difference between sequence lengths SEQ and
    2 * SEQ over SEQ tokens, in rows of 4 * width bytes (h for layers, V for the edge); the
    rest of a part's bytes over its parameters."""
    med = statistics.median
    ex = [r["executor"] for r in ranks]
    seq = ex[0]["seq"]

    def count(layout: str, run: str, key: str) -> float:
        return med(e["counts"][layout][run][key] for e in ex)

    moe_ops = {layout: count(layout, "moe2", "sched_ops") - count(layout, "moe1", "sched_ops")
               for layout in ex[0]["counts"]}

    def per_part(bigger: str, smaller: str, width: float) -> tuple[float, float, float]:
        """(bytes, row passes, params) of the part that `bigger` adds to `smaller`."""
        at = {s: count("local", bigger + s, "sched_bytes")
              - (count("local", smaller + s, "sched_bytes") if smaller else 0.0)
              for s in ("", "_2s")}
        params = count("local", bigger, "params") - (
            count("local", smaller, "params") if smaller else 0.0)
        per_token = max(0.0, (at["_2s"] - at[""]) / seq)
        return max(0.0, at[""] - per_token * seq), per_token / (4 * width), params

    h, vocab = ex[0]["hidden"], ex[0]["vocab"]  # the tiny model's widths
    moe_w, moe_rows, moe_p = per_part("moe2", "moe1", h)
    dense_w, dense_rows, dense_p = per_part("dense", "moe1", h)
    one_w, one_rows_h, one_p = per_part("moe1", "", h)
    edge_w = max(0.0, one_w - moe_w)
    edge_rows = max(0.0, one_rows_h * 4 * h - moe_rows * 4 * h) / (4 * vocab)
    edge_p = one_p - moe_p
    step = {k: med(e["step_time"][k] for e in ex) for k in ex[0]["step_time"]}
    moe1_rest, moe2_rest = count("local", "moe1", "rest_ops"), count("local", "moe2", "rest_ops")
    gemm_points = {s: med(r["small_gemm"]["tflops"][s] for r in ranks)
                   for s in ranks[0]["small_gemm"]["tflops"]}
    law = fit_gemm_shape_law(gemm_points)
    # In place the non-GEMM ops cannot move data faster than the same op on hot buffers: the
    # in-place rate (a residual of two timings on a shared machine) is capped by the best
    # elementwise rate measured.
    hot = max(med(r["elementwise_GBps"][s] for r in ranks) for s in ranks[0]["elementwise_GBps"])
    traffic = {str(t["row_bytes"]): min(hot, med(e["traffic"][i]["GBps"] for e in ex))
               for i, t in enumerate(ex[0]["traffic"])}
    def calls(layout: str, run: str, key: str) -> dict[str, float]:
        kinds = set().union(*(e["counts"][layout][run].get(key, {}) for e in ex))
        return {k: med(e["counts"][layout][run].get(key, {}).get(k, 0) for e in ex)
                for k in sorted(kinds)}

    layer_calls = {}
    for layout in ex[0]["counts"]:
        two, one = calls(layout, "moe2", "sched_collectives"), calls(layout, "moe1",
                                                                   "sched_collectives")
        layer_calls[layout] = {k: max(0.0, two.get(k, 0) - one.get(k, 0)) for k in two}
    multi = [k for k in ex[0]["counts"] if k.startswith(("alltoall_ep", "allgather_ep"))]
    share = cpu_share([e.get("lockstep") for e in ex])
    step_calls = calls(multi[0], "moe1", "rest_collectives") if multi else {}
    out = ExecutorProfile(
        moe_layer_collectives=layer_calls,
        step_collectives=step_calls,
        us_per_op=med(e["op_time"]["us_per_op"] for e in ex),
        edge_ops=count("local", "moe1", "sched_ops") - moe_ops["local"],
        dense_layer_ops=count("local", "dense", "sched_ops") - count("local", "moe1", "sched_ops"),
        moe_layer_ops=moe_ops,
        step_ops=max(0.0, 2 * moe1_rest - moe2_rest),
        step_ops_per_layer=max(0.0, moe2_rest - moe1_rest),
        weight_bytes_per_param={"moe_layer": moe_w / moe_p, "dense_layer": dense_w / dense_p,
                                "edge": edge_w / edge_p},
        row_passes={"moe_layer": moe_rows, "dense_layer": dense_rows, "edge": edge_rows},
        optimizer_ns_per_param=max(1e-6, step["optimizer_s_per_param"] * 1e9),
        step_rest_ns_per_param=step["rest_s_per_param"] * 1e9,
        gemm=law,
        sdpa_tflops=med(r["sdpa"]["tflops"] for r in ranks),
        traffic_GBps=traffic,
        cpu_share=share,
    )
    raw = {"small_gemm": {"precision": ranks[0]["small_gemm"]["precision"],
                          "tflops": gemm_points},
           "elementwise_GBps": {s: med(r["elementwise_GBps"][s] for r in ranks)
                                for s in ranks[0]["elementwise_GBps"]},
           "sdpa": {"shape_bhsd": ranks[0]["sdpa"]["shape_bhsd"],
                    "tflops_per_rank": [r["sdpa"]["tflops"] for r in ranks]},
           "executor": ex}
    return out, raw


def _gemm(ranks: list[dict]) -> tuple[dict[str, float], dict[str, Any], float]:
    """(gemm_tflops, raw.gemm, gemm_k_half)."""
    med = statistics.median
    gemm_tflops, gemm_raw = {}, {}
    for prec in ranks[0]["gemm"]:
        per = [r["gemm"][prec] for r in ranks]
        if "error" in per[0]:
            gemm_raw[prec] = per[0]
            continue
        shapes = {s: {"tflops_per_rank": [p[s]["tflops"] for p in per],
                      "tflops": med([p[s]["tflops"] for p in per])} for s in per[0]}
        gemm_raw[prec] = shapes
        gemm_tflops[prec] = med(v["tflops"] for v in shapes.values())
    sweep = ranks[0]["k_sweep"]
    by_k = {k: med(r["k_sweep"]["tflops_by_k"][k] for r in ranks) for k in sweep["tflops_by_k"]}
    rate_inf, k_half = fit_k_half(by_k)
    gemm_raw["k_sweep"] = {"precision": "bf16" if ranks[0]["device"].startswith("cuda") else "fp32",
                           "m": sweep["m"], "n": sweep["n"], "tflops_by_k": by_k,
                           "fit_tflops": rate_inf, "fit_k_half": k_half}
    return gemm_tflops, gemm_raw, k_half


def _collectives(ranks: list[dict]) -> tuple[dict[str, Any], float, float]:
    """(raw.collectives, latency s per step, bandwidth bytes/s) of the joint fit."""
    world = len(ranks)
    coll: dict[str, Any] = {"points": [], "fits": {}}
    every = []
    for op, by_size in ranks[0]["collectives"].items():
        pts = []
        for size in by_size:
            per_call = zip(*(r["collectives"][op][size] for r in ranks))
            t = statistics.median(max(c) for c in per_call)
            sent, steps = collective_bytes_and_steps(op, world, float(size))
            pts.append((sent, steps, t))
            coll["points"].append({"op": op, "bytes_per_rank_buffer": int(size),
                                   "bytes_sent_per_rank": sent, "latency_steps": steps,
                                   "median_s": t})
        lat, bw = fit_latency_bandwidth(pts)
        coll["fits"][op] = {"latency_us_per_step": lat * 1e6, "GBps": bw / 1e9}
        every += pts
    lat, bw = fit_latency_bandwidth(every)
    coll["fits"]["joint"] = {"latency_us_per_step": lat * 1e6, "GBps": bw / 1e9}
    return coll, lat, bw


def profile_from_ranks(ranks: list[dict], elapsed_s: float, machine: dict[str, Any],
                       ranks_per_host: int | None = None) -> Profile:
    """The profile of the ranks' measurements (`measure.measure_rank` results, one per rank).

    With every rank on one host (`ranks_per_host` None or = len(ranks)) the collectives
    measured the host's links: intra_node_* and, as the best guess without a network,
    inter_node_* too. Ranks on several hosts measured the network: inter_node_* only.
    """
    world = len(ranks)
    med = statistics.median
    gemm_tflops, gemm_raw, k_half = _gemm(ranks)
    mem = [r["memory"]["GBps"] for r in ranks]
    ovh = {k: med(r["overhead"][k]["us_per_op"] for r in ranks) for k in ranks[0]["overhead"]}
    raw: dict[str, Any] = {"gemm": gemm_raw,
                           "memory": {"buffer_bytes": ranks[0]["memory"]["buffer_bytes"],
                                      "GBps_per_rank": mem},
                           "overhead_us_per_op": ovh, "wall_s": elapsed_s}
    executor = None
    if "executor" in ranks[0]:  # measured by this version of measure.py
        executor, raw_executor = executor_profile(ranks)
        raw.update(raw_executor)
    links: dict[str, float | None] = {}
    if world == 1:
        notes = "nproc=1: no collectives measured; link keys are null (preset values apply)"
    else:
        raw["collectives"], lat, bw = _collectives(ranks)
        links = {"inter_node_GBps": bw / 1e9, "inter_node_latency_us": lat * 1e6}
        if ranks_per_host is not None and ranks_per_host < world:
            notes = (f"{world} ranks, {ranks_per_host} per host: the collectives crossed "
                     "hosts, so only inter_node_* is measured; take intra_node_* from "
                     "a one-host profile")
        else:
            links.update(intra_node_GBps=bw / 1e9, intra_node_latency_us=lat * 1e6)
            notes = ("inter_node_* = intra_node_*: measured with all ranks on one host; "
                     "profile across nodes for real inter-node numbers (docs/CALIBRATION.md)")
    return Profile(
        gemm_tflops=gemm_tflops,
        hbm_GBps=med(mem),
        kernel_overhead_us=ovh["add"],
        gemm_k_half=k_half,
        **links,
        executor=executor,
        nproc=world,
        threads_per_rank=ranks[0]["threads"],
        backend=ranks[0]["backend"],
        notes=notes,
        raw=raw,
        machine=machine,
    )
