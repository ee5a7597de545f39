"""NVLink domains beyond a node and multi-tier networks: the specs, the placement of each
group on the tiers, the pricing, and what the planner does with them."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cost_model.estimate import estimate
from cost_model.hardware import hardware
from cost_model.layout import build_layout, group_placement
from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
from planner.search import plan

SPINE = [{"name": "leaf", "gpus": 256, "GBps": 50}, {"name": "spine", "gpus": 512, "GBps": 50}]


@pytest.mark.parametrize("fields, message", [
    (dict(gpus_per_node=8, nvlink_domain_size=12), "multiple or a divisor of gpus_per_node=8"),
    (dict(gpus_per_node=4, nvlink_domain_size=48), "do not make whole NVLink domains"),
    (dict(network=SPINE, inter_node_GBps=25), "network and inter_node_GBps are both given"),
    (dict(network=[{"name": "leaf", "gpus": 128, "GBps": 50}]), "must connect all 256 GPUs"),
    (dict(network=[{"name": "leaf", "gpus": 12, "GBps": 50}, {"name": "spine", "gpus": 256,
                                                              "GBps": 50}]),
     "network\\[0\\].gpus=12 must be a multiple of nvlink_domain_size=8"),
    (dict(network=[{"name": "nvlink", "gpus": 256, "GBps": 50}]), "not 'nvlink'"),
    (dict(network=[{"name": "leaf", "gpus": 256, "GBps": 50, "oversubscription": 0.5}]),
     "greater than or equal to 1"),
])
def test_bad_topology_names_the_field(fields, message):
    base = dict(num_nodes=256 // fields.get("gpus_per_node", 8), gpus_per_node=8)
    with pytest.raises(ValidationError, match=message):
        ClusterSpec(**(base | fields))


def test_domains_and_tiers_resolve_into_links():
    cluster = ClusterSpec(num_nodes=64, gpus_per_node=4, gpu="gb200", nvlink_domain_size=64,
                          network=[{"name": "leaf", "gpus": 128, "GBps": 50, "latency_us": 10},
                                   {"name": "spine", "gpus": 256, "GBps": 50, "latency_us": 20,
                                    "oversubscription": 2}])
    hw = hardware(cluster)
    assert (hw.gpus_per_domain, hw.tier_units) == (64, (128, 256))
    assert hw.tier_names == ("nvlink", "leaf", "spine")
    assert hw.link_bps == (900e9, 50e9, 25e9)  # the spine after its 2:1 oversubscription
    assert hw.link_latency_s == pytest.approx((5e-6, 10e-6, 20e-6))
    # Without `network`: one tier from inter_node_GBps, one domain per node (today's model).
    plain = hardware(ClusterSpec(num_nodes=4, gpus_per_node=8, inter_node_GBps=25))
    assert (plain.gpus_per_domain, plain.tier_units, plain.link_bps) == (8, (32,), (450e9, 25e9))


def test_each_group_sits_on_the_outermost_tier_it_crosses():
    # 256 GPUs, nodes of 4, 64-GPU NVLink domains, leaves of 128, a spine over all.
    w, d, units = 256, 64, (128, 256)
    m = Mapping(tp=2, ep=32, etp=1, pp=2)  # dp = 64, edp = 4
    dense, expert = (m.tp, 1, 1, 64, m.pp), (m.etp, 1, m.ep, 4, m.pp)
    order = "tp-cp-ep-dp-pp"
    assert group_placement(w, d, units, order, dense, "tp").tier == 0
    ep = group_placement(w, d, units, order, expert, "ep")
    assert (ep.size, ep.per_domain, ep.tier) == (32, 32, 0)  # EP 32 inside one domain
    dp = group_placement(w, d, units, order, dense, "dp")
    assert (dp.per_domain, dp.tier) == (32, 1)  # ranks 0, 2, ..., 126: two domains, one leaf
    pp = group_placement(w, d, units, order, dense, "pp")
    assert (pp.tier, pp.per_domain) == (2, 1)  # ranks 0 and 128: across the spine
    lay = build_layout(w, 4, m, d, units)
    assert lay.crosses_node("ep") and not lay.crosses_domain("ep")
    assert [lay.tier(k) for k in ("tp", "ep", "dp", "pp")] == [0, 0, 1, 2]


def test_a_group_is_priced_on_the_slowest_tier_it_crosses():
    model = preset_model("mixtral-8x7b")
    training = TrainingSpec(seq_length=4096, global_batch_size=256)
    m = Mapping(tp=2, pp=2, ep=8, etp=1)  # pp crosses the spine: ranks 0 and 256

    def step(spine_over: float) -> dict:
        net = [SPINE[0], SPINE[1] | {"oversubscription": spine_over}]
        e = estimate(model, ClusterSpec(num_nodes=64, gpus_per_node=8, network=net), training, m)
        return e.breakdown

    one, two = step(1.0), step(2.0)
    assert two["pp_comm"] > one["pp_comm"]
    # Groups inside a leaf do not see the spine.
    assert two["tp_comm"] == one["tp_comm"] and two["ep_comm"] == one["ep_comm"]
    # One explicit tier equal to the defaults is today's cluster exactly.
    plain = estimate(model, ClusterSpec(num_nodes=64, gpus_per_node=8), training, m)
    same = estimate(model, ClusterSpec(num_nodes=64, gpus_per_node=8, network=[
        {"name": "ib", "gpus": 512, "GBps": 50, "latency_us": 12}]), training, m)
    assert same.step_time_s == plain.step_time_s


def test_traffic_adds_up_for_a_known_mapping():
    """Bytes per GPU per step by group kind: tp sends half of each T x h gather/scatter (3
    per attention block), ep 7/8 of each rank's routed copies per dispatch/combine pass."""
    model = preset_model("mixtral-8x7b")
    training = TrainingSpec(seq_length=4096, global_batch_size=256)
    e = estimate(model, ClusterSpec(num_nodes=8, gpus_per_node=8), training,
                 Mapping(tp=2, pp=4, ep=8, etp=1))
    layers, num_mb = 32 // 4, 256 // 8
    te = 4096 / 2  # sequence-parallel shard
    ep = num_mb * layers * 4 * te * 2 * 4096 * 2 * 7 / 8
    assert e.traffic_bytes["ep"] == pytest.approx(ep)
    assert e.traffic_bytes["tp"] >= num_mb * layers * 3 * 4096 * 4096 * 2 / 2
    assert e.traffic_bytes["pp"] == pytest.approx(num_mb * 2 * te * 4096 * 2)


@pytest.mark.slow
def test_gb200_domains_keep_expert_parallelism_on_nvlink():
    """256 GB200 (64 nodes of 4) in 64-GPU NVLink domains: DeepSeek-V3's best plan keeps its
    EP group inside a domain and is predicted faster than on the same GPUs in 4-GPU domains."""
    model = preset_model("deepseek-v3")
    training = TrainingSpec(seq_length=4096, global_batch_size=512)
    best = {}
    for domain in (4, 64):
        cluster = ClusterSpec(num_nodes=64, gpus_per_node=4, gpu="gb200",
                              nvlink_domain_size=domain)
        res = plan(model, cluster, training, top_k=1)
        assert res.search.status == "OPTIMAL"
        best[domain] = res.candidates[0]
    m = best[64].mapping
    lay = build_layout(256, 4, m, 64, (256,))
    assert m.ep > 4 and not lay.crosses_domain("ep")
    assert best[64].estimate.step_time_s < best[4].estimate.step_time_s


@pytest.mark.slow
def test_an_oversubscribed_spine_carries_less_traffic():
    """64 H100 nodes in two 32-node leaves under a spine: with a 2:1 spine the chosen plan's
    groups that cross the spine send fewer bytes than with a 1:1 spine."""
    model = preset_model("mixtral-8x7b")
    training = TrainingSpec(seq_length=4096, global_batch_size=256)
    spine_bytes = {}
    for over in (1.0, 2.0):
        cluster = ClusterSpec(num_nodes=64, gpus_per_node=8, network=[
            SPINE[0], SPINE[1] | {"oversubscription": over}])
        res = plan(model, cluster, training, top_k=1)
        c = res.candidates[0]
        hw = hardware(cluster)
        lay = build_layout(512, 8, c.mapping, hw.gpus_per_domain, hw.tier_units)
        spine_bytes[over] = sum(v for kind, v in c.estimate.traffic_bytes.items()
                                if lay.tier(kind) == 2)
    assert spine_bytes[2.0] < spine_bytes[1.0]


_SMALL_MOE = ModelSpec(num_layers=8, hidden_size=1024, num_attention_heads=16,
                       num_query_groups=4, ffn_hidden_size=2048, vocab_size=32000,
                       num_experts=16, moe_ffn_hidden_size=1024, moe_router_topk=2)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes=st.sampled_from([4, 8]), gpn=st.sampled_from([4, 8]),
       intra=st.floats(50, 900), leaf=st.floats(10, 100), over=st.floats(1, 4),
       which=st.sampled_from(["intra", "leaf", "spine", "oversubscription"]),
       factor=st.floats(1.1, 4))
def test_more_bandwidth_never_slows_the_best_plan(nodes, gpn, intra, leaf, over, which, factor):
    training = TrainingSpec(seq_length=2048, global_batch_size=32)

    def best(intra, leaf, spine, over) -> float:
        cluster = ClusterSpec(num_nodes=nodes, gpus_per_node=gpn, intra_node_GBps=intra,
                              network=[{"name": "leaf", "gpus": nodes * gpn // 2, "GBps": leaf},
                                       {"name": "spine", "gpus": nodes * gpn, "GBps": spine,
                                        "oversubscription": over}])
        res = plan(_SMALL_MOE, cluster, training, top_k=1, time_limit_s=300)
        assert res.search.status == "OPTIMAL"
        return res.candidates[0].estimate.step_time_s

    args = dict(intra=intra, leaf=leaf, spine=leaf, over=over)
    before = best(**args)
    if which == "oversubscription":
        args["over"] = max(1.0, over / factor)
    else:
        args[which] *= factor
    assert best(**args) <= before * (1 + 1e-12)
