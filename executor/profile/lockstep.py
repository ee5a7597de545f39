"""The share of a core that each rank gets while the ranks train together: the profile's
`executor.cpu_share` (cost_model/foldplan_runtime.py divides the executor's CPU time by it).

On CPU ranks every other executor measurement (executor_ops.py, `work_clock`) is the CPU time
the rank spent, which does not depend on what else runs on the host (same-minute probes on
this 2-core host, 2026-12-02: a tiny-moe step took 0.43-0.51 s of CPU at load averages from
3 to 14, while its wall time went from 0.44 to 1.6 s). A step's wall time is that CPU time
over the share of a core the rank gets: ranks that time-share a core (4 ranks on 2 cores get at
most half each), other processes on the host, and, in a real step, the waits at each
collective call for the rank that was descheduled or slower, which a rank measured alone
never sees. All three are measured here at once, on the executor: a 4-layer model
(`LOCKSTEP_MODEL`) trains over the profile's ranks in each of `LOCKSTEP_LAYOUTS` (data-parallel
only, and expert-parallel over all ranks, whose calls come six times as often), with the
gradient reduction and the step's numbers as the executor's steps run them; the share of a
layout is the rank's CPU time over the wall time of its steps, summed over `LOCKSTEP_STEPS`
steps. The same model alone on every rank (`local`) takes its turn too (one step of each
layout in turn, so all see the same load): its share has no waits at calls, and with one
rank it is the only one. On GPUs the shares are 1 (the executor measurements are wall time
there).
"""

from __future__ import annotations

import time
from typing import Any

# (hidden, seq, micro-batch, MoE layers): the first in-place traffic model of executor_ops.py.
LOCKSTEP_MODEL = (96, 256, 1, 4)
LOCKSTEP_STEPS = 10
# (key, mapping fields) of the layouts trained in lockstep with several ranks (keys as
# `cost_model.foldplan_runtime.moe_layer_ops_key`): data-parallel only (one small all-reduce
# per MoE layer and micro-batch) and expert-parallel over all ranks (six calls: the router's
# counts, the count exchange, dispatch and combine forward and backward).
LOCKSTEP_LAYOUTS = ("local_dp", "alltoall_ep")


def lockstep_layouts(world: int) -> dict[str, dict]:
    """{key: mapping fields} of `LOCKSTEP_LAYOUTS` on `world` ranks (alltoall_ep where the
    model's 8 experts split over them). Example: 4 -> {"local_dp": {"ep": 1},
    "alltoall_ep": {"ep": 4}}."""
    out: dict[str, dict] = {"local_dp": {"ep": 1}}
    if 8 % world == 0:
        out["alltoall_ep"] = {"ep": world}
    return out


def _timed(tr, step: int, clock) -> tuple[float, float]:
    """(wall seconds, `clock` seconds) of one step of `tr`."""
    t0, c0 = time.perf_counter(), clock()
    tr.step(step)
    return time.perf_counter() - t0, clock() - c0


def measure_lockstep(layouts, dist, world: int, quick: bool) -> dict[str, Any]:
    """Wall and CPU seconds of each step, alone (`local`) and with several ranks in each
    `LOCKSTEP_LAYOUTS` layout, one step of each in turn, and their shares ({layout: sum of
    CPU over sum of wall})."""
    from .executor_ops import tiny_spec

    hidden, seq, mbs, layers = LOCKSTEP_MODEL
    spec = tiny_spec(layers, hidden=hidden, ffn=2 * hidden, heads=hidden // 32,
                     groups=max(1, hidden // 64))
    runs = {"local": layouts.trainer(spec, {}, None, seq, mbs)}
    if world > 1 and dist.is_initialized():
        for key, layout in lockstep_layouts(world).items():
            runs[key] = layouts.trainer(spec, layout, None, seq, mbs)
    for tr in runs.values():
        tr.step(0)  # warm-up: lazily built state
    out: dict[str, Any] = {"model": list(LOCKSTEP_MODEL), "clock": layouts.clock.__name__}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for s in range(4 if quick else LOCKSTEP_STEPS):
        for key, tr in runs.items():
            if dist.is_initialized():
                dist.barrier()
            times[key].append(_timed(tr, 1 + s, layouts.clock))
    out["wall_s"] = {k: [w for w, _ in pairs] for k, pairs in times.items()}
    out["cpu_s"] = {k: [c for _, c in pairs] for k, pairs in times.items()}
    out["share"] = {k: sum(c for _, c in pairs) / max(sum(w for w, _ in pairs), 1e-9)
                    for k, pairs in times.items()}
    return out
