"""A combination Megatron-LM refuses is a 422 naming the field and the rule: each typed error
is located at its field in its request section (mapping, model or training)."""

from __future__ import annotations

from conftest import MIXTRAL_REQUEST


def _detail(client, **changes) -> dict:
    body = {**MIXTRAL_REQUEST, "mapping": {"tp": 2, "ep": 8, "pp": 8}}
    for section, fields in changes.items():
        body[section] = {**body[section], **fields}
    r = client.post("/v1/estimate", json=body)
    assert r.status_code == 422, r.text
    return r.json()


def test_mapping_option_rule_is_located_at_its_field(client):
    out = _detail(client, mapping={"moe_a2a_overlap": True})
    assert [d["loc"] for d in out["detail"]] == [["body", "mapping", "moe_a2a_overlap"]]
    assert "moe_a2a_overlap=true with pp=8 needs vpp > 1" in out["detail"][0]["msg"]
    assert out["reasons"] == [out["detail"][0]["msg"]]
    assert "mapping.moe_a2a_overlap: moe_a2a_overlap=true" in out["message"]


def test_training_and_model_fields_are_located_in_their_sections(client):
    out = _detail(client, training={"fp8_recipe": "mxfp8"})
    assert out["detail"][0]["loc"] == ["body", "training", "fp8_recipe"]
    assert "fp8_recipe='mxfp8' needs precision='fp8'" in out["detail"][0]["msg"]
    out = _detail(client, model={"preset": "deepseek-v3"}, training={"runtime": "foldplan"})
    locs = [d["loc"] for d in out["detail"]]
    assert ["body", "model", "mtp_num_layers"] in locs
    assert any("mtp_num_layers=1: multi-token prediction is not supported by the executor" in r
               for r in out["reasons"])


def test_batch_answers_the_rule_in_place(client):
    body = {**MIXTRAL_REQUEST, "mappings": [
        {"tp": 2, "ep": 8, "pp": 8},
        {"tp": 2, "ep": 8, "pp": 8, "dispatcher": "allgather", "flex_backend": "hybridep"}]}
    r = client.post("/v1/estimate", json=body)
    assert r.status_code == 200
    ok, bad = r.json()
    assert "step_time_s" in ok
    assert "flex_backend='hybridep' needs dispatcher='flex' (got 'allgather')" in bad["error"]


def test_run_of_a_candidate_the_executor_cannot_run_is_422_naming_the_option(client, db_url):
    """A Megatron-only option (here the flex dispatcher) is a fine plan but no run of ours:
    the run request is refused before anything is queued."""
    from conftest import fake_plan_answer, store_plan

    answer = fake_plan_answer([dict(tp=2, ep=8, pp=8, dispatcher="flex")])
    store_plan(db_url, answer)
    r = client.post(f"/v1/plans/{answer['id']}/runs", json={"candidate": 0, "steps": 2})
    assert r.status_code == 422, r.text
    assert "candidate" in r.json()["message"] and "flex" in r.json()["message"]
    assert client.get(f"/v1/plans/{answer['id']}/runs").json() == []  # nothing stored
