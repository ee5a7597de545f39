"""Rank layout: identical to Megatron-Core's rule, checked against an independent version."""

from __future__ import annotations

import itertools
import random

import pytest

from cost_model.layout import build_layout, group_placement
from cost_model.specs import Mapping


def reference_groups(world, sizes_by_name, order, kind):
    """Independent implementation: coordinates of every rank, grouped by the other axes."""
    names = order.split("-")
    sizes = [sizes_by_name[n] for n in names]
    inner = [i for i, n in enumerate(names) if n in kind.split("-")]
    coords = {}
    for rank in range(world):
        c, r = [], rank
        for s in sizes:
            c.append(r % s)
            r //= s
        coords[rank] = c
    groups = {}
    for rank in range(world):
        c = coords[rank]
        outer_key = tuple(reversed([c[i] for i in range(len(names)) if i not in inner]))
        inner_key = tuple(reversed([c[i] for i in inner]))
        groups.setdefault(outer_key, []).append((inner_key, rank))
    return [[r for _, r in sorted(g)] for _, g in sorted(groups.items())]


def test_worked_example_from_docstring():
    lay = build_layout(16, 8, Mapping(tp=2, pp=2, ep=4, etp=1))
    assert lay.groups["tp"][:2] == [[0, 1], [2, 3]]
    assert lay.groups["dp"][:3] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14]]
    assert lay.groups["pp"][:2] == [[0, 8], [1, 9]]
    assert lay.groups["ep"][:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.groups["edp"][:2] == [[0, 4], [1, 5]]
    assert lay.crosses() == {"tp": False, "cp": False, "dp": False, "pp": True, "ep": False,
                             "etp": False, "edp": False}


def _random_mappings(n, seed=0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        tp, cp, pp, ep, etp = (rng.choice([1, 2, 4]) for _ in range(5))
        dp = rng.choice([1, 2, 4])
        world = tp * cp * dp * pp
        if world % (ep * etp * pp):
            continue
        order = rng.choice(["tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp"])
        edp = world // (ep * etp * pp)
        if order != "tp-cp-ep-dp-pp" and pp > 1 and edp != dp:
            continue
        out.append((world, Mapping(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, dp=dp, edp=edp, order=order)))
    return out


@pytest.mark.parametrize("world, m", _random_mappings(150))
def test_groups_match_independent_rule(world, m):
    lay = build_layout(world, 4, m)
    dense = {"tp": m.tp, "cp": m.cp, "ep": 1, "dp": m.dp, "pp": m.pp}
    expert = {"tp": m.etp, "cp": 1, "ep": m.ep, "dp": m.edp, "pp": m.pp}
    for kind, sizes, token in [("tp", dense, "tp"), ("cp", dense, "cp"), ("dp", dense, "dp"),
                               ("pp", dense, "pp"), ("dp_cp", dense, "dp-cp"),
                               ("ep", expert, "ep"), ("etp", expert, "tp"), ("edp", expert, "dp")]:
        assert lay.groups[kind] == reference_groups(world, sizes, m.order, token), kind
    # Every rank appears exactly once per kind; expert and dense pp groups agree.
    for kind in ("tp", "cp", "dp", "pp", "ep", "etp", "edp"):
        flat = sorted(itertools.chain.from_iterable(lay.groups[kind]))
        assert flat == list(range(world))
    assert lay.groups["pp"] == reference_groups(world, expert, m.order, "pp")


@pytest.mark.parametrize("world, m", _random_mappings(60, seed=1))
def test_group_placement_agrees_with_full_layout(world, m):
    g = 4
    lay = build_layout(world, g, m)
    dense = (m.tp, m.cp, 1, m.dp, m.pp)
    expert = (m.etp, 1, m.ep, m.edp, m.pp)
    for kind, sizes, token in [("tp", dense, "tp"), ("cp", dense, "cp"), ("dp", dense, "dp"),
                               ("pp", dense, "pp"), ("ep", expert, "ep"), ("etp", expert, "tp"),
                               ("edp", expert, "dp")]:
        p = group_placement(world, g, (world,), m.order, sizes, token)
        assert p.crosses_domain == lay.crosses_node(kind), kind
        assert p.size == len(lay.groups[kind][0])


def test_alternative_order_needs_equal_data_parallel_sizes():
    with pytest.raises(ValueError, match="edp == dp"):
        build_layout(16, 8, Mapping(tp=2, pp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp"))
    lay = build_layout(16, 8, Mapping(tp=2, cp=2, pp=2, ep=2, etp=2, order="tp-cp-ep-pp-dp"))
    assert lay.groups["pp"][0] == [0, 4]
    assert lay.groups["dp"][0] == [0, 8]
