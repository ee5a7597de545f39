"""The cluster's NVLink domains and network tiers through the HTTP API."""

from __future__ import annotations

from conftest import MIXTRAL_MAPPINGS, MIXTRAL_REQUEST

GB200 = {"world_size": 256, "gpus_per_node": 4, "nvlink_domain_size": 64,
         "network": [{"name": "leaf", "gpus": 128, "GBps": 50},
                     {"name": "spine", "gpus": 256, "GBps": 50, "oversubscription": 2}]}


def test_layout_answers_domains_and_tiers(client):
    r = client.post("/v1/layout", json=GB200 | {"mapping": {"tp": 2, "ep": 32, "pp": 2}})
    assert r.status_code == 200, r.text
    a = r.json()
    assert a["crosses_node"]["ep"] and not a["crosses_domain"]["ep"]
    assert a["tiers"] == {"tp": "nvlink", "cp": "nvlink", "ep": "nvlink", "etp": "nvlink",
                          "edp": "leaf", "dp": "leaf", "pp": "spine"}
    # Without a network: one tier named "network" beyond each node.
    plain = client.post("/v1/layout", json={"world_size": 16, "gpus_per_node": 8,
                                            "mapping": {"tp": 2, "pp": 2, "ep": 4}}).json()
    assert plain["tiers"]["pp"] == "network" and plain["tiers"]["tp"] == "nvlink"
    assert plain["crosses_domain"] == plain["crosses_node"]


def test_bad_topology_is_422_naming_the_field(client):
    bad = GB200 | {"nvlink_domain_size": 48, "mapping": {}}
    r = client.post("/v1/layout", json=bad)
    assert r.status_code == 422 and "nvlink_domain_size=48" in r.json()["message"]
    cluster = dict(MIXTRAL_REQUEST["cluster"], inter_node_GBps=25,
                   network=[{"name": "ib", "gpus": 4096, "GBps": 50}])
    r = client.post("/v1/estimate", json={**MIXTRAL_REQUEST, "cluster": cluster,
                                          "mapping": MIXTRAL_MAPPINGS[0]})
    assert r.status_code == 422
    assert "network and inter_node_GBps are both given" in r.json()["message"]
    assert "cluster" in r.json()["message"]


def test_estimate_reports_traffic_and_prices_the_tiers(client):
    est = {**MIXTRAL_REQUEST, "mapping": MIXTRAL_MAPPINGS[0]}
    n = MIXTRAL_REQUEST["cluster"]["num_nodes"] * MIXTRAL_REQUEST["cluster"]["gpus_per_node"]
    base = client.post("/v1/estimate", json=est).json()
    assert base["traffic_bytes"] and all(v > 0 for v in base["traffic_bytes"].values())
    slow = dict(MIXTRAL_REQUEST["cluster"], network=[{"name": "ib", "gpus": n, "GBps": 5}])
    slower = client.post("/v1/estimate", json={**est, "cluster": slow}).json()
    assert slower["traffic_bytes"] == base["traffic_bytes"]  # same bytes, slower links
    assert slower["step_time_s"] > base["step_time_s"]
