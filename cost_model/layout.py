"""Megatron-Core rank layout of the folded mapping: which ranks form each group.

Pure arithmetic, no torch.distributed. It lives at the bottom of the package stack because
the cost model needs it (a group's link bandwidth depends on the links its ranks cross);
the planner, the service (`/v1/layout`, the plan page) and the executor import it from here.

Rule (Megatron-Core `RankGenerator` / `generate_masked_orthogonal_rank_groups`): the world is a
grid whose axes are the order string's tokens, leftmost fastest. Rank r has coordinates
c_i = (r // stride_i) % size_i with stride_i = prod(size_j for j < i). A group of kind K (one
token, or several joined by '-') is the set of ranks whose coordinates agree on every axis not
in K; inside a group ranks are listed with K's axes in order, leftmost fastest; groups are
listed by the remaining axes, leftmost fastest.

Two grids share the same ranks: the dense one with sizes (tp, cp, ep=1, dp, pp) and the expert
one with (tp=etp, cp=1, ep, dp=edp, pp), both in the same order string. Pipeline groups are
identical in both whenever etp*ep*edp == tp*cp*dp (checked).

Worked example: world 16, order tp-cp-ep-dp-pp, tp=2, cp=1, dp=4, pp=2; expert etp=1, ep=4,
edp=2. Dense strides: tp 1, cp 2, ep 2, dp 2, pp 8, so tp groups are [0,1],[2,3],...;
dp groups [0,2,4,6],[1,3,5,7],[8,10,12,14],...; pp groups [0,8],[1,9],....
Expert strides: etp 1, ep 1, edp 4, pp 8, so ep groups [0,1,2,3],[4,5,6,7],...; edp groups
[0,4],[1,5],...: expert parallelism is folded over the ranks that attention uses for tp and dp.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .specs import Mapping
from .validate import mapping_data_parallel

GROUP_KINDS = ("tp", "cp", "dp", "pp", "ep", "etp", "edp")
# Extra groups Megatron builds and the executor and cost model use.
EXTRA_KINDS = ("dp_cp", "tp_cp", "tp_ep")


def masked_orthogonal_rank_groups(
    world_size: int, sizes: tuple[int, ...], mask: tuple[bool, ...]
) -> list[list[int]]:
    """Megatron's `generate_masked_orthogonal_rank_groups`, vectorised.

    `sizes` are the axis sizes in order (leftmost fastest), `mask` marks the axes that vary
    inside a group. Example: sizes (2, 4), mask (False, True) -> [[0, 2, 4, 6], [1, 3, 5, 7]].
    """
    assert int(np.prod(sizes)) == world_size, (world_size, sizes)
    strides = np.cumprod((1,) + tuple(sizes[:-1]))
    inner = [i for i, m in enumerate(mask) if m]
    outer = [i for i, m in enumerate(mask) if not m]

    def offsets(axes: list[int]) -> np.ndarray:
        # All combinations of the axes' coordinates, first axis fastest, dotted with strides.
        off = np.zeros(1, dtype=np.int64)
        for a in axes:
            off = (off[None, :] + (np.arange(sizes[a]) * strides[a])[:, None]).reshape(-1)
            # reshape keeps the previous axes fastest: new axis varies slowest so far.
        return off

    inner_off = offsets(inner)
    outer_off = offsets(outer)
    return (outer_off[:, None] + inner_off[None, :]).tolist()


@dataclass(frozen=True)
class RankLayout:
    """Every group of one mapping: kind -> list of rank lists."""

    world_size: int
    gpus_per_node: int
    groups: dict[str, list[list[int]]]
    gpus_per_domain: int = 0  # 0: one NVLink domain per node
    tier_units: tuple[int, ...] = ()  # GPUs per unit of each network tier, innermost first

    def _spans(self, kind: str, unit: int) -> bool:
        g = np.asarray(self.groups[kind]) // unit
        return bool((g != g[:, :1]).any())

    def crosses_node(self, kind: str) -> bool:
        """Whether any group of this kind holds ranks of two different nodes."""
        return self._spans(kind, self.gpus_per_node)

    def crosses_domain(self, kind: str) -> bool:
        """Whether any group of this kind holds ranks of two NVLink domains."""
        return self._spans(kind, self.gpus_per_domain or self.gpus_per_node)

    def tier(self, kind: str) -> int:
        """The outermost link any group of this kind crosses (0 NVLink, i network tier i-1)."""
        if not self.crosses_domain(kind):
            return 0
        for i, unit in enumerate(self.tier_units, start=1):
            if not self._spans(kind, unit):
                return i
        return max(1, len(self.tier_units))

    def crosses(self) -> dict[str, bool]:
        return {k: self.crosses_node(k) for k in GROUP_KINDS}


def _axis_sizes(order: str, sizes: dict[str, int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    tokens = tuple(order.split("-"))
    return tokens, tuple(sizes[t] for t in tokens)


def _groups(world: int, tokens: tuple[str, ...], sizes: tuple[int, ...], kind: str):
    want = set(kind.split("-"))
    return masked_orthogonal_rank_groups(world, sizes, tuple(t in want for t in tokens))


def build_layout(world_size: int, gpus_per_node: int, mapping: Mapping,
                 gpus_per_domain: int = 0, tier_units: tuple[int, ...] = ()) -> RankLayout:
    """All dense and expert groups for `mapping` (dp/edp derived if omitted); the domain
    size and network tier units (`Hardware`) only matter for `crosses_domain` / `tier`.

    Raises ValueError when the sizes do not multiply to `world_size`.
    """
    m = mapping
    dp, edp = mapping_data_parallel(world_size, m)
    if m.tp * m.cp * dp * m.pp != world_size:
        raise ValueError(f"tp*cp*dp*pp = {m.tp}*{m.cp}*{dp}*{m.pp} != world_size {world_size}")
    if m.etp * m.ep * edp * m.pp != world_size:
        raise ValueError(f"etp*ep*edp*pp = {m.etp}*{m.ep}*{edp}*{m.pp} != world_size {world_size}")
    tokens, dense = _axis_sizes(m.order, {"tp": m.tp, "cp": m.cp, "ep": 1, "dp": dp, "pp": m.pp})
    _, expert = _axis_sizes(m.order, {"tp": m.etp, "cp": 1, "ep": m.ep, "dp": edp, "pp": m.pp})
    g = {
        "tp": _groups(world_size, tokens, dense, "tp"),
        "cp": _groups(world_size, tokens, dense, "cp"),
        "dp": _groups(world_size, tokens, dense, "dp"),
        "pp": _groups(world_size, tokens, dense, "pp"),
        "ep": _groups(world_size, tokens, expert, "ep"),
        "etp": _groups(world_size, tokens, expert, "tp"),
        "edp": _groups(world_size, tokens, expert, "dp"),
        "dp_cp": _groups(world_size, tokens, dense, "dp-cp"),
        "tp_cp": _groups(world_size, tokens, dense, "tp-cp"),
        "tp_ep": _groups(world_size, tokens, expert, "tp-ep"),
    }
    expert_pp = _groups(world_size, tokens, expert, "pp")
    if expert_pp != g["pp"]:
        raise ValueError(
            f"order={m.order!r}: the expert layout's pipeline groups differ from the dense "
            f"ones (Megatron needs edp == dp when pp is not last; edp={edp}, dp={dp})"
        )
    return RankLayout(world_size, gpus_per_node, g, gpus_per_domain, tier_units)


@dataclass(frozen=True)
class GroupPlacement:
    """How one group kind sits on the links (the same for every group of the kind here)."""

    size: int
    per_domain: int  # most members of one group in one NVLink domain
    tier: int  # outermost link its ranks cross: 0 NVLink, i >= 1 network tier i-1

    @property
    def crosses_domain(self) -> bool:
        return self.tier > 0


def outermost_tier(ranks: np.ndarray, gpus_per_domain: int, tier_units: tuple[int, ...]) -> int:
    """The outermost link the ranks of one group cross: 0 when they share an NVLink domain,
    else i for the first network tier (1-based) one of whose units holds them all."""
    if (ranks // gpus_per_domain == ranks[0] // gpus_per_domain).all():
        return 0
    for i, unit in enumerate(tier_units, start=1):
        if (ranks // unit == ranks[0] // unit).all():
            return i
    return len(tier_units)


@lru_cache(maxsize=65_536)
def group_placement(world_size: int, gpus_per_domain: int, tier_units: tuple[int, ...],
                    order: str, sizes: tuple[int, int, int, int, int],
                    kind: str) -> GroupPlacement:
    """Placement of the first group of `kind` on a grid with axis `sizes` (tp, cp, ep, dp, pp).

    The cost model calls this for every estimate, so it only builds the one group it needs.
    Every group of a kind is a translate of the first by an offset made of other axes'
    strides, so their domain spans match whenever the domain size aligns with those strides;
    the first group is taken as representative.
    """
    names = ("tp", "cp", "ep", "dp", "pp")
    size_of = dict(zip(names, sizes))
    tokens = order.split("-")
    strides: dict[str, int] = {}
    acc = 1
    for t in tokens:
        strides[t] = acc
        acc *= size_of[t]
    ranks = np.zeros(1, dtype=np.int64)
    for t in tokens:
        if t in kind.split("-"):
            ranks = (ranks[None, :] + (np.arange(size_of[t]) * strides[t])[:, None]).reshape(-1)
    _, counts = np.unique(ranks // gpus_per_domain, return_counts=True)
    return GroupPlacement(int(ranks.size), int(counts.max()),
                          outermost_tier(ranks, gpus_per_domain, tier_units))
