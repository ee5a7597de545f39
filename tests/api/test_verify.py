"""Verify the top-k (POST /v1/plans/{id}/verify, GET /v1/verifications/{id}): candidates run
one after the other through the run backends; measured ranking, Spearman, errors."""

from __future__ import annotations

import itertools
import sys
import textwrap
import time
from datetime import datetime

import pytest
from conftest import TINY, fake_plan_answer, store_plan
from fastapi.testclient import TestClient

from api.app import create_app
from api.backends.local import LocalBackend
from api.verify import ranks, spearman

# A rank stand-in whose step time depends on the candidate (fake_rank.py's is constant):
# candidate k takes MEASURED_S[k] per step, so the measured ranking is known in advance.
MEASURED_S = {0: 0.03, 1: 0.01, 2: 0.02}
RANK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from executor.run_files import (PLAN_FILE, ProgressLine, RunMetrics, append_progress,
                                    median_step_time, write_metrics)
    out, steps, candidate = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    t = {measured}[candidate]
    plan = json.loads((out / PLAN_FILE).read_text())
    for i in range(steps):
        time.sleep(t)
        append_progress(out, ProgressLine(step=i + 1, loss=5.0 - i, time_s=t))
    write_metrics(out, RunMetrics(
        loss=[5.0 - i for i in range(steps)], steps=list(range(1, steps + 1)),
        step_times_s=[t] * steps, step_time_s=median_step_time([t] * steps),
        tokens_per_s=1.0, model_flops_per_step=0.0, tflops_per_gpu=0.0, mfu=0.0,
        aux_loss=[0.0] * steps, grad_norm=[1.0] * steps, num_dropped=[0] * steps,
        expert_load_imbalance=[None] * steps, comm_bytes={{}}, world_size=2, backend="gloo",
        device="cpu", precision="fp32", mapping=plan["candidates"][candidate]["mapping"]))
""").format(measured=MEASURED_S)
THREE = [{"tp": 1, "pp": 1, "ep": 2}, {"tp": 2, "pp": 1, "ep": 2},
         {"tp": 1, "pp": 1, "ep": 1, "micro_batch_size": 2}]


@pytest.fixture
def plan3(db_url: str) -> dict:
    answer = fake_plan_answer(THREE, TINY)
    store_plan(db_url, answer)
    return answer


@pytest.fixture
def client(settings, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    backend = LocalBackend(command=lambda job: [sys.executable, str(script), str(job.out_dir),
                                                str(job.steps), str(job.candidate)])
    app = create_app(settings.model_copy(update={"run_poll_s": 0.05}),
                     backends={"local": backend})
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        yield c


def wait_done(client, vid: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = client.get(f"/v1/verifications/{vid}").json()
        if v["status"] in ("succeeded", "failed", "cancelled"):
            return v
        time.sleep(0.05)
    raise AssertionError(f"verification {vid} stuck: {v}")


def test_ranks_and_spearman():
    assert ranks([0.3, 0.1, 0.3]) == [2.5, 1.0, 2.5]
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None  # fewer than two measured
    assert spearman([1, 2], [5, 5]) is None  # no spread: undefined


def test_verify_three_candidates_one_after_the_other(client, plan3):
    r = client.post(f"/v1/plans/{plan3['id']}/verify",
                    json={"candidates": [0, 1, 2], "steps": 3, "backend": "local"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "queued" and set(body) >= {"id", "status"}
    v = wait_done(client, body["id"])
    assert v["status"] == "succeeded", v
    cands = v["candidates"]
    assert [c["candidate"] for c in cands] == [0, 1, 2]
    predicted = [c["estimate"]["step_time_s"] for c in plan3["candidates"]]
    for c in cands:
        assert c["status"] == "succeeded" and c["run_id"]
        assert c["measured_step_time_s"] == pytest.approx(MEASURED_S[c["candidate"]])
        assert c["predicted_step_time_s"] == pytest.approx(predicted[c["candidate"]])
    assert [c["measured_rank"] for c in cands] == [3, 1, 2]
    assert [c["predicted_rank"] for c in cands] == [1, 2, 3]  # the plan is sorted best first
    assert v["spearman"] == pytest.approx(spearman(predicted, [0.03, 0.01, 0.02]))
    # One after the other: each run started after the one before it finished.
    runs = [client.get(f"/v1/runs/{c['run_id']}").json() for c in cands]
    for before, after in itertools.pairwise(runs):
        assert datetime.fromisoformat(after["started_at"]) >= datetime.fromisoformat(
            before["finished_at"])
        assert after["created_at"] >= before["finished_at"]
    assert all(run["steps"] == 3 for run in runs)


def test_verify_request_errors_name_the_field(client, plan3):
    url = f"/v1/plans/{plan3['id']}/verify"
    r = client.post(url, json={"candidates": [0, 7], "steps": 3})
    assert r.status_code == 422 and "candidates" in r.text and "7" in r.text
    r = client.post(url, json={"candidates": [1, 1], "steps": 3})
    assert r.status_code == 422 and "twice" in r.text
    r = client.post(url, json={"candidates": [0], "steps": 1})
    assert r.status_code == 422 and "steps" in r.text
    r = client.post(url, json={"backend": "slurm-nope"})
    assert r.status_code == 422 and "backend" in r.text
    assert client.post("/v1/plans/nope/verify", json={}).status_code == 404
    assert client.get("/v1/verifications/nope").status_code == 404


def test_verify_defaults_to_the_first_three_and_can_be_cancelled(client, plan3):
    r = client.post(f"/v1/plans/{plan3['id']}/verify", json={"steps": 200})
    assert r.status_code == 202
    vid = r.json()["id"]
    assert [c["candidate"] for c in r.json()["candidates"]] == [0, 1, 2]
    deadline = time.monotonic() + 20
    while client.get(f"/v1/verifications/{vid}").json()["status"] != "running":
        assert time.monotonic() < deadline, "never started"
        time.sleep(0.05)
    v = client.delete(f"/v1/verifications/{vid}").json()
    assert v["status"] == "cancelled"
    assert [c["status"] for c in v["candidates"]][1:] == ["cancelled", "cancelled"]
    first = client.get(f"/v1/runs/{v['candidates'][0]['run_id']}").json()
    assert first["status"] == "cancelled"
    time.sleep(0.3)  # the verifier starts nothing more
    v = client.get(f"/v1/verifications/{vid}").json()
    assert v["status"] == "cancelled" and v["candidates"][1]["run_id"] is None
