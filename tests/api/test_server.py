"""A real `foldplan serve` process: persistence across kill -9, and a real run end to end."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
from conftest import (
    MIXTRAL_REQUEST,
    fake_plan_answer,
    free_port,
    planner_ready,
    start_server,
    store_plan,
)
from test_cli import TINY

pytestmark = pytest.mark.slow


def test_plans_and_runs_survive_kill_9(tmp_path, db_url):
    tiny = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    store_plan(db_url, tiny)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(db_url, port, tmp_path)
    try:
        created = None
        if planner_ready():
            r = httpx.post(f"{base}/v1/plans", json={**MIXTRAL_REQUEST, "top_k": 2}, timeout=120)
            assert r.status_code == 201, r.text
            created = r.json()
        run = httpx.post(f"{base}/v1/plans/{tiny['id']}/runs", json={"steps": 2}, timeout=10)
        assert run.status_code == 202, run.text  # loopback client, no token configured
        run_id = run.json()["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = httpx.get(f"{base}/v1/runs/{run_id}").json()
            if status["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.5)
        assert status["status"] == "succeeded", (status.get("error"), status.get("log_tail"))
        assert len(status["metrics"]["loss"]) == 2 and status["metrics"]["step_time_s"] > 0
        predicted = tiny["candidates"][0]["estimate"]["step_time_s"]
        assert status["predicted"]["step_time_s"] == predicted
        assert (tmp_path / "runs" / run_id / "metrics.json").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    port2 = free_port()
    proc2 = start_server(db_url, port2, tmp_path)
    try:
        base2 = f"http://127.0.0.1:{port2}"
        if created is not None:
            assert httpx.get(f"{base2}/v1/plans/{created['id']}").json() == created
        assert httpx.get(f"{base2}/v1/plans/{tiny['id']}").json() == tiny
        again = httpx.get(f"{base2}/v1/runs/{run_id}").json()
        assert again["status"] == "succeeded" and again["metrics"] == status["metrics"]
        assert httpx.get(f"{base2}/v1/plans").json()["total"] == (2 if created else 1)
    finally:
        proc2.terminate()
        proc2.wait(10)


def test_serve_prints_urls_and_honours_token(tmp_path, db_url):
    store_plan(db_url, fake_plan := fake_plan_answer())
    port = free_port()
    proc = start_server(db_url, port, tmp_path, env={"FOLDPLAN_API_TOKEN": "tok"})
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/plans/{fake_plan['id']}/runs",
                       json={"steps": 1})
        assert r.status_code == 401  # even from loopback once a token is set
    finally:
        proc.terminate()
        proc.wait(10)
    log = (tmp_path / f"serve-{port}.log").read_text()
    assert f"http://127.0.0.1:{port}/docs" in log and f"http://127.0.0.1:{port}/" in log
