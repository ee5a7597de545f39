"""A finished verification as the cluster's profile correction: `Profile.step_time_scale`
(cost_model/profile_model.py), applied by `cost_model.estimate.to_estimate`, written by GET
/v1/verifications/{id}/profile (api/verify.py `correction_profile`)."""

from __future__ import annotations

import statistics

import pytest
from conftest import TINY, fake_plan_answer, store_plan
from pydantic import ValidationError
from test_browser import browser  # noqa: F401 - the shared Chromium fixture
# The verification fixtures: runs of rank.py where candidate k takes MEASURED_S[k] per step.
from test_verify import MEASURED_S, THREE, client, plan3, wait_done  # noqa: F401, F811

from api.db import Database, VerificationRow, utcnow
from cost_model.estimate import estimate
from cost_model.presets import preset_model
from cost_model.profile_model import Profile, step_time_scale
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec
from planner.search import plan

MODEL = preset_model("tiny-moe")
TRAINING = TrainingSpec(**TINY["training"])


def cpu_cluster(profile: dict | None = None) -> ClusterSpec:
    return ClusterSpec(**TINY["cluster"], profile=profile)


def test_step_time_scale_is_checked_and_defaults_to_none():
    assert step_time_scale(None) == 1.0 and step_time_scale(Profile()) == 1.0
    assert Profile().step_time_scale is None  # `foldplan profile` measures no correction
    assert step_time_scale(Profile(step_time_scale=2.5)) == 2.5
    for bad in (0.0, -1.0, 1e4, float("nan")):
        with pytest.raises(ValidationError, match="profile.step_time_scale"):
            Profile(step_time_scale=bad)
    with pytest.raises(ValidationError):
        Profile(step_time_scale="2")  # a number, not a string


def test_the_scale_multiplies_step_time_and_breakdown_only():
    m = Mapping(tp=1, pp=1, ep=2)
    plain = estimate(MODEL, cpu_cluster(), TRAINING, m)
    scaled = estimate(MODEL, cpu_cluster({"step_time_scale": 2.5}), TRAINING, m)
    assert scaled.step_time_s == pytest.approx(2.5 * plain.step_time_s, rel=1e-12)
    assert sum(scaled.breakdown.values()) == pytest.approx(scaled.step_time_s, rel=1e-12)
    for k, v in plain.breakdown.items():
        assert scaled.breakdown[k] == pytest.approx(2.5 * v, rel=1e-12, abs=0.0)
    assert scaled.mfu == pytest.approx(plain.mfu / 2.5, rel=1e-12)
    assert scaled.tokens_per_s == pytest.approx(plain.tokens_per_s / 2.5, rel=1e-12)
    assert scaled.memory == plain.memory  # memory is not a time: untouched


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_a_uniform_scale_keeps_the_planners_ranking(scale):
    """The search runs on unscaled times and its bounds stay valid; the candidates come back
    in the same order with every step time times the scale."""
    plain = plan(MODEL, cpu_cluster(), TRAINING, top_k=4, time_limit_s=30)
    scaled = plan(MODEL, cpu_cluster({"step_time_scale": scale}), TRAINING, top_k=4,
                  time_limit_s=30)
    assert len(plain.candidates) >= 2
    assert [c.mapping for c in scaled.candidates] == [c.mapping for c in plain.candidates]
    assert scaled.search.status == plain.search.status
    for a, b in zip(plain.candidates, scaled.candidates, strict=True):
        assert b.estimate.step_time_s == pytest.approx(scale * a.estimate.step_time_s, rel=1e-12)


@pytest.mark.timeout(120)
def test_verification_profile_corrects_the_next_estimate(client, plan3):
    """Verify three candidates, fetch the profile, estimate again with it: the candidate whose
    ratio is the median now predicts exactly what it measured; the ranking is unchanged."""
    r = client.post(f"/v1/plans/{plan3['id']}/verify",
                    json={"candidates": [0, 1, 2], "steps": 2, "backend": "local"})
    assert r.status_code == 202, r.text
    vid = r.json()["id"]
    v = wait_done(client, vid)
    assert v["status"] == "succeeded", v
    predicted = [c["estimate"]["step_time_s"] for c in plan3["candidates"]]
    ratios = {k: MEASURED_S[k] / predicted[k] for k in range(3)}
    median = statistics.median(ratios.values())

    got = client.get(f"/v1/verifications/{vid}/profile")
    assert got.status_code == 200, got.text
    profile = got.json()
    assert profile["step_time_scale"] == pytest.approx(median, rel=1e-9)
    src = profile["step_time_scale_source"]
    assert src["verification_id"] == vid and src["plan_id"] == plan3["id"]
    assert {int(k): x for k, x in src["ratios"].items()} == pytest.approx(ratios, rel=1e-9)
    assert src["previous_step_time_scale"] is None

    cluster = {**TINY["cluster"], "profile": profile}
    again = []
    for cand in plan3["candidates"]:
        e = client.post("/v1/estimate", json={**TINY, "cluster": cluster,
                                              "mapping": cand["mapping"]})
        assert e.status_code == 200, e.text
        again.append(e.json()["step_time_s"])
    assert again == pytest.approx([median * p for p in predicted], rel=1e-9)
    k_median = min(ratios, key=lambda k: abs(ratios[k] - median))
    assert again[k_median] == pytest.approx(MEASURED_S[k_median], rel=1e-9)
    assert sorted(range(3), key=again.__getitem__) == sorted(range(3), key=predicted.__getitem__)


def _store_verification(db_url: str, plan_id: str, status: str, base_profile: dict | None,
                        predicted: float, measured: float | None) -> str:
    """A verification row as the verifier leaves it (one candidate)."""
    row = VerificationRow(
        id=f"v-{status}", plan_id=plan_id, status=status,
        request={"candidates": [0], "steps": 2, "backend": "local"},
        result={"candidates": [{"candidate": 0, "run_id": None, "status": status,
                                "predicted_step_time_s": predicted,
                                "measured_step_time_s": measured, "error": None,
                                "predicted_rank": 1, "measured_rank": 1}],
                "spearman": None, "base_profile": base_profile, "machine": "test",
                "measured_over_predicted": None if measured is None else measured / predicted},
        created_at=utcnow())
    db = Database(db_url)
    with db.session() as s:
        s.add(row)
        s.commit()
    db.dispose()
    return row.id


def test_a_correction_builds_on_the_profile_the_prediction_used(client, plan3, db_url):
    """A base profile with its own scale and numbers: the scales multiply, the rest is kept."""
    base = {"kernel_overhead_us": 7.0, "step_time_scale": 2.0, "notes": "cpu host",
            "site": "kept as given"}
    vid = _store_verification(db_url, plan3["id"], "succeeded", base, 0.2, 0.3)
    profile = client.get(f"/v1/verifications/{vid}/profile").json()
    assert profile["step_time_scale"] == pytest.approx(3.0)
    assert profile["step_time_scale_source"]["previous_step_time_scale"] == 2.0
    assert profile["kernel_overhead_us"] == 7.0 and profile["site"] == "kept as given"
    assert Profile.model_validate(profile).step_time_scale == pytest.approx(3.0)


def test_no_profile_before_success(client, plan3, db_url):
    vid = _store_verification(db_url, plan3["id"], "running", None, 0.2, None)
    r = client.get(f"/v1/verifications/{vid}/profile")
    assert r.status_code == 409 and "running" in r.json()["message"]
    assert client.get("/v1/verifications/nope/profile").status_code == 404
    far = _store_verification(db_url, plan3["id"], "succeeded", None, 1e-6, 5.0)  # 5e6 x
    r = client.get(f"/v1/verifications/{far}/profile")
    assert r.status_code == 409 and "profile.step_time_scale" in r.json()["message"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_plan_page_offers_the_profile_correction(browser, tmp_path, db_url):  # noqa: F811
    """Headless Chromium: a succeeded verification on the plan page offers its profile as a
    download; the downloaded file is a profile with the verification's scale."""
    import json

    from conftest import free_port, start_server

    answer = fake_plan_answer(THREE, TINY)
    store_plan(db_url, answer)
    vid = _store_verification(db_url, answer["id"], "succeeded", None, 0.2, 0.5)
    port = free_port()
    proc = start_server(db_url, port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        ctx = browser.new_context(accept_downloads=True)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{base}/plans/{answer['id']}")
        link = page.locator("#verify-profile-link")
        link.wait_for()
        assert link.get_attribute("href") == f"/v1/verifications/{vid}/profile"
        assert "step_time_scale = 2.50" in page.locator("#verify-profile").inner_text()
        with page.expect_download() as dl:
            link.click()
        profile = json.loads(open(dl.value.path()).read())
        assert Profile.model_validate(profile).step_time_scale == pytest.approx(2.5)
        assert not errors, errors
        ctx.close()
    finally:
        proc.terminate()
        proc.wait(10)
