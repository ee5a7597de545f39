"""`collective_bytes_and_steps`: the one convention for what a collective sends and how many
latency steps it takes, and the cost model's collective times built on it."""

from __future__ import annotations

import pytest

from cost_model.hardware import hardware
from cost_model.kernels import (
    COLLECTIVE_OPS,
    alltoall_time,
    collective_bytes_and_steps,
    collective_time,
    ring_time,
)
from cost_model.layout import GroupPlacement
from cost_model.specs import ClusterSpec

HW = hardware(ClusterSpec(num_nodes=2, gpus_per_node=8))
IN_NODE = GroupPlacement(size=4, per_domain=4, tier=0)
ACROSS = GroupPlacement(size=16, per_domain=8, tier=1)


def test_worked_example_of_the_docstring():
    # p = 4, 1000 bytes: ring all-reduce 2(p-1)/p S over 2(p-1) steps, all-gather (p-1) C,
    # reduce-scatter (p-1)/p S over p-1 steps, all-to-all (p-1)/p V over 1 + (p-1)/p.
    got = {op: collective_bytes_and_steps(op, 4, 1000.0) for op in COLLECTIVE_OPS}
    assert got == {"all_reduce": (1500.0, 6.0), "all_gather": (3000.0, 3.0),
                   "reduce_scatter": (750.0, 3.0), "all_to_all": (750.0, 1.75)}
    assert collective_bytes_and_steps("all_to_all", 16, 1600.0, ranks_per_node=8) == (1500.0, 2.875)
    assert collective_bytes_and_steps("all_reduce", 1, 1000.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="op='broadcast'"):
        collective_bytes_and_steps("broadcast", 4, 1000.0)


@pytest.mark.parametrize("place", [IN_NODE, ACROSS])
def test_collective_times_follow_the_convention(place):
    lat = HW.inter_latency_s if place.crosses_domain else HW.intra_latency_s
    size = 64e6
    # A ring's time is its bytes sent over the link plus its steps times the latency: an
    # all-reduce is exactly a reduce-scatter and an all-gather of the same bytes.
    rs = collective_time(HW, place, "reduce_scatter", size)
    sent, steps = collective_bytes_and_steps("reduce_scatter", place.size, size)
    assert rs == ring_time(HW, place, sent)
    assert collective_time(HW, place, "all_reduce", size) == pytest.approx(2 * rs, rel=1e-15)
    assert collective_time(HW, place, "all_gather", size / place.size) == pytest.approx(rs)
    # Latency alone: a tiny message costs its steps times the latency.
    assert ring_time(HW, place, 1e-9) == pytest.approx(steps * lat)
    _, a2a_steps = collective_bytes_and_steps("all_to_all", place.size, 1.0, place.per_domain)
    assert alltoall_time(HW, place, 1e-9) == pytest.approx(a2a_steps * lat)
    a2a = collective_time(HW, place, "all_to_all", size, 1.5)
    assert a2a == alltoall_time(HW, place, size, 1.5) > alltoall_time(HW, place, size)


def test_in_node_all_to_all_moves_its_bytes_sent_over_nvlink():
    size = 64e6
    sent, steps = collective_bytes_and_steps("all_to_all", IN_NODE.size, size)
    expect = sent / (HW.intra_bps * HW.intra_alltoall_eff) + steps * HW.intra_latency_s
    assert alltoall_time(HW, IN_NODE, size) == pytest.approx(expect, rel=1e-12)
