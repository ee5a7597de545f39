"""HTTP API through the app (TestClient, throw-away SQLite): contract names, errors, storage."""

from __future__ import annotations

import json

import pytest
from conftest import MIXTRAL_MAPPINGS, MIXTRAL_REQUEST

EST = {**MIXTRAL_REQUEST, "mapping": MIXTRAL_MAPPINGS[0]}


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_estimate_single_has_contract_fields(client):
    r = client.post("/v1/estimate", json=EST)
    assert r.status_code == 200
    e = r.json()
    for key in ("step_time_s", "mfu", "model_flops_per_step", "tflops_per_gpu", "tokens_per_s",
                "fits_memory", "memory", "breakdown"):
        assert key in e, key
    assert 0 < e["mfu"] < 1 and e["step_time_s"] > 0 and e["memory"]["peak_gib"] > 0
    assert {"compute", "tp_comm", "ep_comm", "dp_comm", "pp_comm", "bubble"} <= set(e["breakdown"])


def test_estimate_batch_keeps_order_and_answers_errors_in_place(client):
    batch = [MIXTRAL_MAPPINGS[0], {"tp": 2, "pp": 8, "ep": 3}, MIXTRAL_MAPPINGS[1]]
    r = client.post("/v1/estimate", json={**MIXTRAL_REQUEST, "mappings": batch})
    assert r.status_code == 200
    out = r.json()
    assert len(out) == 3
    assert "ep=3 does not divide num_experts=8" in out[1]["error"]
    single = client.post("/v1/estimate", json={**MIXTRAL_REQUEST, "mapping": batch[2]}).json()
    assert out[2] == single and "error" not in out[0]


def test_estimate_invalid_mapping_is_422_with_reasons(client):
    r = client.post("/v1/estimate", json={**MIXTRAL_REQUEST, "mapping": {"ep": 3}})
    assert r.status_code == 422
    body = r.json()
    assert any("ep=3" in reason for reason in body["reasons"])
    assert body["detail"][0]["loc"][:2] == ["body", "mapping"]
    assert ["body", "mapping", "ep"] in [d["loc"] for d in body["detail"]]


def test_estimate_needs_exactly_one_of_mapping_and_mappings(client):
    r = client.post("/v1/estimate", json=MIXTRAL_REQUEST)
    assert r.status_code == 422 and "exactly one" in r.json()["message"]
    r = client.post("/v1/estimate", json={**EST, "mappings": [MIXTRAL_MAPPINGS[0]]})
    assert r.status_code == 422


def test_estimate_accepts_spec_and_hf_config(client):
    spec = client.get("/v1/presets").json()["models"]["mixtral-8x22b"]["spec"]
    a = client.post("/v1/estimate", json={**EST, "model": spec}).json()
    b = client.post("/v1/estimate", json=EST).json()
    assert a["step_time_s"] == pytest.approx(b["step_time_s"])
    hf = {"model_type": "mixtral", "num_hidden_layers": 56, "hidden_size": 6144,
          "num_attention_heads": 48, "num_key_value_heads": 8, "intermediate_size": 16384,
          "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2}
    c = client.post("/v1/estimate", json={**EST, "model": {"hf_config": hf}})
    assert c.status_code == 200
    assert c.json()["step_time_s"] == pytest.approx(b["step_time_s"], rel=1e-6)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"cluster": {"num_nodes": 0, "gpus_per_node": 8}}, "cluster.num_nodes"),
        ({"cluster": {"num_nodes": -4, "gpus_per_node": 8}}, "cluster.num_nodes"),
        ({"cluster": {"num_nodes": "many", "gpus_per_node": 8}}, "cluster.num_nodes"),
        ({"cluster": {"num_nodes": 125_000_000, "gpus_per_node": 8}}, "cluster.num_nodes"),
        ({"cluster": {"num_nodes": 1024, "gpus_per_node": 1024}}, "cluster"),
        ({"cluster": {"num_nodes": 1, "gpus_per_node": 8, "gpu": "tpu9"}}, "cluster.gpu"),
        ({"training": {"seq_length": 0, "global_batch_size": 8}}, "training.seq_length"),
        ({"training": {"seq_length": 4096, "global_batch_size": 8, "precision": "fp4"}},
         "training.precision"),
        ({"model": {"preset": "gpt-17"}}, "model.preset"),
        ({"model": {"hf_config": {"model_type": "bert"}}}, "model.hf_config"),
        ({"model": {"num_layers": 0}}, "model.num_layers"),
        ({"model": {"preset": 5}}, "model.preset: Input should be a valid string"),
        ({"model": "mixtral"}, "model: Input should be a valid dictionary"),
        ({"mapping": {"tp": 0}}, "mapping.tp"),
        ({"mapping": {"recompute": "sometimes"}}, "mapping.recompute"),
        ({"mapping": {"tq": 2}}, "mapping.tq"),
    ],
)
def test_bad_input_is_422_naming_the_field(client, patch, field):
    r = client.post("/v1/estimate", json={**EST, **patch})
    assert r.status_code == 422, r.text
    assert field in r.json()["message"], r.json()["message"]


def test_non_json_and_wrong_shapes_are_4xx(client):
    json_ct = {"content-type": "application/json"}
    r = client.post("/v1/estimate", content=b"{not json", headers=json_ct)
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]
    r = client.post("/v1/estimate", json=[1, 2, 3])
    assert r.status_code == 422
    r = client.post("/v1/layout", content=b"[" * 100_000, headers=json_ct)
    assert 400 <= r.status_code < 500


def test_huge_body_is_413(client):
    big = json.dumps({**EST, "pad": "x" * (2 << 20)})
    r = client.post("/v1/estimate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["message"]

    def chunks():  # no content-length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    r = client.post("/v1/estimate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_layout_groups_and_crossing(client):
    r = client.post("/v1/layout", json={"world_size": 16, "gpus_per_node": 8,
                                        "mapping": {"tp": 2, "pp": 2, "ep": 4}})
    assert r.status_code == 200
    body = r.json()
    assert set(body["groups"]) == {"tp", "cp", "dp", "pp", "ep", "etp", "edp"}
    assert body["groups"]["tp"][0] == [0, 1]
    assert body["groups"]["ep"][0] == [0, 1, 2, 3]
    assert body["groups"]["pp"][0] == [0, 8]
    assert body["crosses_node"] == {"tp": False, "cp": False, "dp": False, "pp": True,
                                    "ep": False, "etp": False, "edp": False}


def test_layout_inconsistent_mapping_is_422(client):
    r = client.post("/v1/layout", json={"world_size": 16, "gpus_per_node": 8,
                                        "mapping": {"tp": 3}})
    assert r.status_code == 422 and "mapping" in r.json()["message"]
    r = client.post("/v1/layout", json={"world_size": 10**9, "gpus_per_node": 8, "mapping": {}})
    assert r.status_code == 422 and "world_size" in r.json()["message"]


def test_presets_lists_models_with_sources_and_gpus(client):
    p = client.get("/v1/presets").json()
    m = p["models"]["mixtral-8x22b"]
    assert m["spec"]["num_experts"] == 8 and m["spec"]["hidden_size"] == 6144
    assert "Mixtral" in m["source"]
    assert {"h100", "h200", "a100-80gb", "b200", "cpu"} <= set(p["gpus"])
    assert p["gpus"]["h100"]["intra_node_GBps"] == 450


def test_stored_plan_roundtrip_list_and_provenance(client, stored_plan):
    pid = stored_plan["id"]
    r = client.get(f"/v1/plans/{pid}")
    assert r.status_code == 200 and r.json() == stored_plan
    listing = client.get("/v1/plans", params={"limit": 1, "offset": 0}).json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == pid
    assert client.get("/v1/plans", params={"limit": 1, "offset": 1}).json()["items"] == []
    assert client.get("/v1/plans", params={"limit": 0}).status_code == 422
    prov = client.get(f"/v1/plans/{pid}/provenance").json()
    assert prov["cost_model_constants"]["gpus.json"]["h100"]["peak_tflops"] > 0
    assert "gemm_efficiency_default" in prov["cost_model_constants"]["efficiency.json"]
    assert client.get("/v1/plans/nope").status_code == 404


def test_openapi_has_the_mixtral_example(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/plans"]["post"]
    examples = op["requestBody"]["content"]["application/json"]["examples"]
    value = examples["mixtral-8x22b"]["value"]
    assert value["model"] == {"preset": "mixtral-8x22b"}
    assert value["cluster"] == {"num_nodes": 16, "gpus_per_node": 8, "gpu": "h100"}
    assert "201" in op["responses"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()
    assert client.get("/static/swagger-ui-bundle.js").status_code == 200


def test_estimate_examples_from_openapi_work(client):
    spec = client.get("/openapi.json").json()
    examples = spec["paths"]["/v1/estimate"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]
    for ex in examples.values():
        assert client.post("/v1/estimate", json=ex["value"]).status_code == 200
    layout_ex = spec["paths"]["/v1/layout"]["post"]["requestBody"]["content"][
        "application/json"]["examples"]
    for ex in layout_ex.values():
        assert client.post("/v1/layout", json=ex["value"]).status_code == 200


def test_index_and_plan_pages(client, stored_plan):
    index = client.get("/")
    assert index.status_code == 200 and stored_plan["id"] in index.text
    page = client.get(f"/plans/{stored_plan['id']}")
    assert page.status_code == 200
    html = page.text
    assert 'id="time-chart"' in html and 'id="memory-chart"' in html
    assert "--tensor-model-parallel-size" in html
    assert "http://" not in html.replace("http://www.w3.org", "")  # nothing loaded from outside
    assert client.get("/plans/nope").status_code == 404


def test_overrunning_planner_is_cut_off_at_its_limit(tmp_path, monkeypatch):
    """A planner that ignores its limit: the request still answers (504) right after it."""
    import time

    from fastapi.testclient import TestClient

    import planner.search
    from api.app import create_app
    from api.settings import Settings

    monkeypatch.setattr(planner.search, "plan", lambda *a, **k: time.sleep(3))
    settings = Settings(db=f"sqlite:///{tmp_path / 'x.db'}", run_dir=tmp_path, plan_grace_s=0.2)
    with TestClient(create_app(settings)) as c:
        t0 = time.monotonic()
        r = c.post("/v1/plans", json={**MIXTRAL_REQUEST, "time_limit_s": 0.3})
        assert r.status_code == 504 and "time_limit_s=0.3" in r.json()["message"]
        assert time.monotonic() - t0 < 2.5  # the fake planner sleeps 3 s
        assert c.get("/v1/plans").json()["total"] == 0


def test_plan_from_an_older_version_is_returned_unchanged(client, db_url):
    from conftest import fake_plan_answer, store_plan

    old = fake_plan_answer()
    old["foldplan_version"] = "0.0.1"
    old["candidates"][0]["retired_field"] = {"x": 1}  # a shape this version does not know
    del old["candidates"][0]["folded"]
    store_plan(db_url, old)
    assert client.get(f"/v1/plans/{old['id']}").json() == old
    page = client.get(f"/plans/{old['id']}")
    assert page.status_code == 200 and "0.0.1" in page.text


def test_healthz_reports_an_unreachable_database(client, monkeypatch):
    from sqlalchemy import create_engine

    bad = create_engine("sqlite:////nonexistent/dir/x.db")
    monkeypatch.setattr(client.app.state.db, "engine", bad)
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
