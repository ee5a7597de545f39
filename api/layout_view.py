"""The plan page's rank layout of one candidate, readable from 8 to 131,072 GPUs.

Small worlds (at most GPU_GRID_MAX_NODES nodes) are drawn GPU by GPU: one row per node, ranks
of one group in one colour. Larger ones are drawn one cell per node, or per NVLink domain when
a domain spans several nodes: for the selected group kind, cells whose ranks are tied together
by groups of that kind (directly or through other cells) share a colour, so "every group
inside one node", "EP groups span blocks of 8 nodes" and "DP groups span the whole world" read
at a glance. Clicking a cell zooms to that node: its GPUs, and for every kind, the group each
one is in and the nodes that group spans. The legend says which links each kind's groups
cross (node, NVLink domain, the outermost network tier), from cost_model.layout through the
same request model as POST /v1/layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cost_model.layout import GROUP_KINDS, RankLayout, build_layout

from .schemas import LayoutRequest, PlanAnswer

GPU_GRID_MAX_NODES = 32   # up to this many nodes, draw every GPU
MAX_COLUMNS = 64          # cells per row of the aggregated grid
GROUP_TITLES = {"tp": "tensor parallel", "cp": "context parallel", "dp": "data parallel",
                "pp": "pipeline parallel", "ep": "expert parallel",
                "etp": "expert tensor parallel", "edp": "expert data parallel"}


def color(i: int) -> str:
    """A colour per group or cell set: golden-angle hues, three lightness levels."""
    return f"hsl({(i * 137.508) % 360:.0f},62%,{52 + 10 * (i % 3)}%)"


def _layout(plan: PlanAnswer, candidate: int) -> tuple[RankLayout, LayoutRequest]:
    cl = plan.cluster
    req = LayoutRequest(world_size=cl.world_size, gpus_per_node=cl.gpus_per_node,
                        nvlink_domain_size=cl.nvlink_domain_size, network=cl.network,
                        mapping=plan.candidates[candidate].mapping)
    return build_layout(req.world_size, req.gpus_per_node, req.mapping, req.domain_size,
                        req.tier_units), req


def link_legend(layout: RankLayout, req: LayoutRequest) -> list[dict[str, Any]]:
    """Per group kind: its size, number of groups, whether its groups cross nodes and NVLink
    domains, and the outermost link they cross (`tier`: 'nvlink' or a network tier's name)."""
    return [{"kind": k, "title": GROUP_TITLES[k], "size": len(layout.groups[k][0]),
             "num_groups": len(layout.groups[k]), "crosses": layout.crosses_node(k),
             "crosses_domain": layout.crosses_domain(k),
             "tier": req.tier_names[layout.tier(k)]} for k in GROUP_KINDS]


def cell_sets(groups: np.ndarray, cell_gpus: int, num_cells: int) -> np.ndarray:
    """For each cell (a node or a domain of `cell_gpus` ranks), the smallest cell it is tied
    to through groups (connected components: two cells are tied when one group has ranks in
    both). Example: groups [[0, 8], [1, 9], [16, 24]] with 8 GPUs per cell and 4 cells ->
    [0, 0, 2, 2]."""
    cells = groups // cell_gpus  # groups x size
    label = np.arange(num_cells)
    while True:
        low = label[cells].min(axis=1)  # per group, the smallest label among its cells
        new = label.copy()
        np.minimum.at(new, cells, low[:, None])
        new = new[new]  # follow the chain to its root
        if np.array_equal(new, label):
            return label
        label = new


def _gpu_grid(layout: RankLayout, num_nodes: int, gpn: int) -> dict[str, Any]:
    cell = 22 if gpn <= 16 else max(4, 352 // gpn)
    kinds = {}
    for kind in GROUP_KINDS:
        g = np.asarray(layout.groups[kind])
        group_of = _group_of(g, layout.world_size)
        size = g.shape[1]
        kinds[kind] = [{"rank": r, "node": r // gpn, "gpu": r % gpn, "group": int(group_of[r]),
                        "color": color(int(group_of[r])) if size > 1 else "#d7dbe0"}
                       for r in range(layout.world_size)]
    return {"mode": "gpus", "cells": kinds, "cell": cell, "gpn": gpn, "num_nodes": num_nodes,
            "width": 40 + gpn * (cell + 2), "height": 18 + num_nodes * (cell + 2)}


def _node_grid(layout: RankLayout, req: LayoutRequest) -> dict[str, Any]:
    gpn = req.gpus_per_node
    by_domain = req.domain_size > gpn
    cell_gpus = req.domain_size if by_domain else gpn
    num_cells = req.world_size // cell_gpus
    sets = {}
    for kind in GROUP_KINDS:
        label = cell_sets(np.asarray(layout.groups[kind]), cell_gpus, num_cells)
        _, index, counts = np.unique(label, return_inverse=True, return_counts=True)
        sets[kind] = {"set": index.tolist(), "num_sets": len(counts),
                      "cells_per_set": int(counts.max())}
    cols = min(num_cells, MAX_COLUMNS)
    cell = max(6, min(22, 720 // cols - 2))
    rows = -(-num_cells // cols)
    return {"mode": "nodes", "unit": "NVLink domain" if by_domain else "node",
            "cell_gpus": cell_gpus, "num_cells": num_cells, "nodes_per_cell": cell_gpus // gpn,
            "cols": cols, "rows": rows, "cell": cell, "sets": sets,
            "width": 48 + cols * (cell + 2), "height": 4 + rows * (cell + 2)}


def _group_of(groups: np.ndarray, world_size: int) -> np.ndarray:
    """Rank -> index of its group, from the groups x size array of one kind."""
    group_of = np.empty(world_size, dtype=np.int64)
    group_of[groups.reshape(-1)] = np.repeat(np.arange(len(groups)), groups.shape[1])
    return group_of


def zoom(layout: RankLayout, gpn: int, node: int) -> dict[str, Any]:
    """One node's GPUs: for every kind, each GPU's group and the nodes that group spans."""
    ranks = range(node * gpn, (node + 1) * gpn)
    rows: list[dict[str, Any]] = [{"rank": r, "gpu": r - node * gpn, "groups": {}} for r in ranks]
    for kind in GROUP_KINDS:
        g = np.asarray(layout.groups[kind])
        group_of = _group_of(g, layout.world_size)
        for row in rows:
            gi = int(group_of[row["rank"]])
            nodes = np.unique(g[gi] // gpn)
            where = ("this node" if len(nodes) == 1 else
                     f"{len(nodes)} nodes, {nodes[0]}–{nodes[-1]}")
            row["groups"][kind] = {"group": gi, "where": where, "color": color(gi),
                                   "local": len(nodes) == 1}
    return {"node": node, "rows": rows}


def layout_grid(plan: PlanAnswer, candidate: int, node: int | None = None) -> dict[str, Any]:
    """Everything the layout section draws for one candidate (see the module docstring)."""
    layout, req = _layout(plan, candidate)
    num_nodes = req.world_size // req.gpus_per_node
    legend = link_legend(layout, req)
    sizes = {k["kind"]: k["size"] for k in legend}
    default = next((k for k in ("tp", "ep", "cp", "pp", "dp", "etp", "edp") if sizes[k] > 1),
                   "tp")
    view = (_gpu_grid(layout, num_nodes, req.gpus_per_node) if num_nodes <= GPU_GRID_MAX_NODES
            else _node_grid(layout, req))
    view.update(kinds=legend, default=default, world_size=req.world_size,
                gpus_per_node=req.gpus_per_node, domain_size=req.domain_size,
                num_nodes=num_nodes)
    if node is not None and 0 <= node < num_nodes:
        view["zoom"] = zoom(layout, req.gpus_per_node, node)
    return view
