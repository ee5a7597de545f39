"""From the ranks' raw measurements to a `Profile`: medians, and the fits of the cost model's
laws. Pure functions (numpy, no torch), testable on synthetic numbers.

- GEMM: per shape the median over ranks of each rank's median window; `gemm_tflops` is the
  median over shapes. The k sweep is fitted to the cost model's short-k law
  rate(k) = R k / (k + k_half) (`fit_k_half`).
- Memory and op overhead: the median over ranks.
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
from cost_model.profile_model import Profile


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
        nproc=world,
        threads_per_rank=ranks[0]["threads"],
        backend=ranks[0]["backend"],
        notes=notes,
        raw=raw,
        machine=machine,
    )
