"""View data for the HTML pages: chart geometry, candidate rows, headroom, as plain dicts
(the rank layout: api/layout_view.py; the run page: api/run_view.py).

Kept out of the templates so they stay declarative and this stays testable. All drawing is
inline SVG; no external assets. The runs table is drawn only in the browser, by
api/static/runs.js, from the run answers the plan page ships (api/routers/pages.py) and then
from the API.
"""

from __future__ import annotations

import math
import os
from typing import Any

from cost_model.estimate import BREAKDOWN_KEYS, MemoryEstimate
from cost_model.specs import ClusterSpec, Mapping
from planner.export import arg_lines

from .layout_view import layout_grid  # noqa: F401 - the page's layout, re-exported
from .schemas import PlanAnswer

# Colours of the step-time components, in the order of cost_model.estimate.BREAKDOWN_KEYS
# (the order the bars stack in).
BREAKDOWN_COLORS = {
    "compute": "#3b6fb6", "recompute": "#7fa7dc", "tp_comm": "#e3892b", "cp_comm": "#f1c232",
    "ep_comm": "#c0392b", "pp_comm": "#8e5ea2", "offload": "#b07d2b", "bubble": "#9aa0a6",
    "dp_comm": "#2e9c6a",
    "optimizer": "#5d4037",
}
MEMORY_KEYS = ("weights_gib", "gradients_gib", "optimizer_gib", "activations_gib", "buffers_gib")
MEMORY_COLORS = {"weights_gib": "#3b6fb6", "gradients_gib": "#7fa7dc", "optimizer_gib": "#8e5ea2",
                 "activations_gib": "#e3892b", "buffers_gib": "#9aa0a6"}

BAR_W = 560  # px of the longest bar


def _stacked(values: list[dict[str, float]], keys: tuple[str, ...], colors: dict[str, str],
             scale_max: float) -> list[list[dict[str, Any]]]:
    bars = []
    for v in values:
        x, segs = 0.0, []
        for k in keys:
            val = float(v.get(k, 0.0) or 0.0)
            if val <= 0:
                continue
            w = BAR_W * val / scale_max if scale_max > 0 else 0
            segs.append({"key": k, "x": x, "w": w, "value": val, "color": colors[k]})
            x += w
        bars.append(segs)
    return bars


def time_chart(plan: PlanAnswer) -> dict[str, Any]:
    vals = [c.estimate.breakdown for c in plan.candidates]
    longest = max((c.estimate.step_time_s for c in plan.candidates), default=0.0)
    scale = max(longest, max((sum(v.get(k, 0) for k in BREAKDOWN_KEYS) for v in vals), default=0))
    return {"bars": _stacked(vals, BREAKDOWN_KEYS, BREAKDOWN_COLORS, scale), "max": scale,
            "keys": [(k, BREAKDOWN_COLORS[k]) for k in BREAKDOWN_KEYS], "width": BAR_W}


def memory_chart(plan: PlanAnswer) -> dict[str, Any]:
    mems = [c.estimate.memory.model_dump() for c in plan.candidates]
    scale = max([m["capacity_gib"] for m in mems] + [m["peak_gib"] for m in mems] + [1e-9])
    return {
        "bars": _stacked(mems, MEMORY_KEYS, MEMORY_COLORS, scale),
        "capacity_x": [BAR_W * m["capacity_gib"] / scale for m in mems],
        "max": scale, "keys": [(k, MEMORY_COLORS[k]) for k in MEMORY_KEYS], "width": BAR_W,
    }


# Mapping fields the candidates table always shows (the sizes people compare first); every
# other field of cost_model.specs.Mapping is shown when it differs between candidates or is
# not its default, so two columns never look the same while the mappings differ.
CORE_FIELDS = ("tp", "cp", "pp", "vpp", "ep", "etp", "dp", "edp", "micro_batch_size",
               "recompute")

# Headroom under this share of the GPU's memory is flagged. The estimate already carries the
# GPU's fixed reserve and 5% for the allocator (MemoryEstimate.buffers_gib), but measured peaks
# drift above estimates by a few GiB: allocator fragmentation after long runs, NCCL buffers
# that grow with the number of communicators, and dropless MoE layers whose busiest expert
# takes more tokens than the assumed load imbalance.
HEADROOM_WARN_FRACTION = 0.10
HEADROOM_WHY = (f"under {HEADROOM_WARN_FRACTION:.0%} of the GPU's memory left: allocator "
                "fragmentation, NCCL buffers and an unlucky expert load can take that much "
                "beyond the estimate")


def mapping_value(mapping: Mapping, field: str) -> Any:
    """The effective value of one mapping field (defaults resolved where the mapping has a
    rule for them, e.g. sequence_parallel = tp > 1)."""
    if field == "sequence_parallel":
        return mapping.sp
    value = getattr(mapping, field)
    return list(value) if isinstance(value, tuple) else value


def display_value(value: Any) -> str:
    """How a mapping value reads in a table: yes/no, '—' for none, lists comma-separated."""
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value is None:
        return "—"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "—"
    return str(value)


def mapping_rows(mappings: list[Mapping]) -> list[dict[str, Any]]:
    """The mapping rows of a candidates table: the core sizes, then every other field that
    differs between the candidates or is not its default. Each row: `field`, `values`
    (display strings, one per candidate) and `differs` (the values are not all equal)."""
    defaults = Mapping()
    rows = []
    for field in Mapping.model_fields:
        values = [mapping_value(m, field) for m in mappings]
        differs = any(v != values[0] for v in values)
        default = mapping_value(defaults, field) if field != "sequence_parallel" else None
        if field in CORE_FIELDS or differs or any(
                field != "sequence_parallel" and v != default for v in values):
            rows.append({"field": field, "values": [display_value(v) for v in values],
                         "differs": differs})
    return rows


def headroom(memory: MemoryEstimate) -> dict[str, Any]:
    """Memory left on the worst pipeline rank: `gib`, `fraction` of capacity, `percent` (the
    fraction as text, rounded down to 0.1%), and `warn` when under HEADROOM_WARN_FRACTION (or
    over capacity)."""
    left = memory.capacity_gib - memory.peak_gib
    fraction = left / memory.capacity_gib if memory.capacity_gib > 0 else 0.0
    # rounded down, so a flagged 9.97% never reads as the threshold itself
    return {"gib": left, "fraction": fraction, "warn": fraction < HEADROOM_WARN_FRACTION,
            "percent": f"{math.floor(1000 * fraction) / 10:.1f}%"}


def megatron_text(args: list[str]) -> str:
    """One `--flag value` per line, shell continuation style, ready to paste."""
    return " \\\n".join(arg_lines(args))


def prediction_caveat(cluster: ClusterSpec, predicted: dict[str, Any] | None,
                      backend: str = "local") -> str | None:
    """Why a CPU run's measured step time can sit far above its prediction, or None.

    Without a run profile (FOLDPLAN_RUN_PROFILE) a run's prediction is the plan's own estimate
    for its cluster; with the `cpu` GPU preset that estimate gives every rank a CPU of its own,
    while a local run puts all ranks on this host's cores."""
    if backend != "local" or cluster.gpu != "cpu" or not predicted:
        return None
    if "profile" in str(predicted.get("machine", "")):
        return None
    cores = os.cpu_count() or 1
    ranks = cluster.world_size
    if ranks <= cores:
        return None
    return (f"The prediction gives each of the {ranks} ranks a CPU of its own (the cpu preset, "
            f"no run profile); this host has {cores} cores, so the ranks share them and a step "
            f"can take about {ranks / cores:.1f}x as long. For a prediction of this host, plan "
            "with its `foldplan profile` in cluster.profile, or give the server one "
            "(FOLDPLAN_RUN_PROFILE).")
