"""View data for the HTML pages: chart geometry and the rank-layout grid, as plain dicts.

Kept out of the templates so they stay declarative and this stays testable. All drawing is
inline SVG; no external assets. The runs table is drawn only in the browser, by
api/static/runs.js, from the run answers the plan page ships (api/routers/pages.py) and then
from the API.
"""

from __future__ import annotations

from typing import Any

from cost_model.estimate import BREAKDOWN_KEYS
from cost_model.layout import GROUP_KINDS, build_layout

from .schemas import PlanAnswer

# Colours of the step-time components, in the order of cost_model.estimate.BREAKDOWN_KEYS
# (the order the bars stack in).
BREAKDOWN_COLORS = {
    "compute": "#3b6fb6", "recompute": "#7fa7dc", "tp_comm": "#e3892b", "cp_comm": "#f1c232",
    "ep_comm": "#c0392b", "pp_comm": "#8e5ea2", "bubble": "#9aa0a6", "dp_comm": "#2e9c6a",
    "optimizer": "#5d4037",
}
MEMORY_KEYS = ("weights_gib", "gradients_gib", "optimizer_gib", "activations_gib", "buffers_gib")
MEMORY_COLORS = {"weights_gib": "#3b6fb6", "gradients_gib": "#7fa7dc", "optimizer_gib": "#8e5ea2",
                 "activations_gib": "#e3892b", "buffers_gib": "#9aa0a6"}
MAX_DRAWN_NODES = 64
GROUP_TITLES = {"tp": "tensor parallel", "cp": "context parallel", "dp": "data parallel",
                "pp": "pipeline parallel", "ep": "expert parallel",
                "etp": "expert tensor parallel", "edp": "expert data parallel"}

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


def _color(i: int) -> str:
    return f"hsl({(i * 137.508) % 360:.0f},62%,{52 + 10 * (i % 3)}%)"


def layout_grid(plan: PlanAnswer, candidate: int) -> dict[str, Any]:
    """Nodes x GPUs grid of one candidate, with each rank's group index for every kind."""
    c = plan.candidates[candidate]
    n_nodes, gpn = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    layout = build_layout(plan.cluster.world_size, gpn, c.mapping)
    drawn_nodes = min(n_nodes, MAX_DRAWN_NODES)
    drawn_ranks = drawn_nodes * gpn
    cell = 22 if gpn <= 16 else max(4, 352 // gpn)
    kinds = []
    for kind in GROUP_KINDS:
        group_of = {}
        for gi, ranks in enumerate(layout.groups[kind]):
            for r in ranks:
                if r < drawn_ranks:
                    group_of[r] = gi
        size = len(layout.groups[kind][0])
        kinds.append({
            "kind": kind, "title": GROUP_TITLES[kind], "size": size,
            "num_groups": len(layout.groups[kind]), "crosses": layout.crosses_node(kind),
            "cells": [
                {"rank": r, "node": r // gpn, "gpu": r % gpn, "group": group_of[r],
                 "color": _color(group_of[r]) if size > 1 else "#d7dbe0"}
                for r in range(drawn_ranks)
            ],
        })
    sizes = {k["kind"]: k["size"] for k in kinds}
    default = next((k for k in ("tp", "ep", "cp", "pp", "dp", "etp", "edp") if sizes[k] > 1), "tp")
    return {"kinds": kinds, "default": default, "cell": cell, "gpn": gpn,
            "drawn_nodes": drawn_nodes,
            "num_nodes": n_nodes, "truncated": n_nodes > drawn_nodes,
            "width": 40 + gpn * (cell + 2), "height": 18 + drawn_nodes * (cell + 2)}


def mapping_rows(plan: PlanAnswer) -> list[tuple[str, list[Any]]]:
    fields = ("tp", "cp", "pp", "vpp", "ep", "etp", "dp", "edp", "micro_batch_size",
              "sequence_parallel", "recompute", "dispatcher", "distributed_optimizer", "order")
    rows = []
    for f in fields:
        vals = [getattr(c.mapping, f) for c in plan.candidates]
        if f == "vpp" and all(v == 1 for v in vals):
            continue
        rows.append((f, vals))
    rows.append(("folded", [c.folded for c in plan.candidates]))
    return rows


def megatron_text(args: list[str]) -> str:
    """One `--flag value` per line, shell continuation style, ready to paste."""
    lines: list[str] = []
    for token in " ".join(args).split():
        if token.startswith("--") or not lines:
            lines.append(token)
        else:
            lines[-1] += " " + token
    return " \\\n".join(lines)
