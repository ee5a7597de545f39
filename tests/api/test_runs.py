"""Runs: auth rules, state transitions with a fake executor, cancel, recovery after restart."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings


def wait_status(client, run_id, statuses, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} stuck in {run['status']}")


class FakeExecutor:
    """Stands in for executor.launch.run_plan; can be held inside the call."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[tuple] = []

    def __call__(self, plan, candidate, steps, out_dir, seed=0):
        self.calls.append((plan["id"], candidate, steps, out_dir, seed))
        self.entered.set()
        self.release.wait(10)
        (out_dir / "train.log").write_text("step 1 loss 5.5\n")
        if self.fail:
            raise RuntimeError("rank 3 ran out of memory")
        return {"loss": [5.5, 5.1][:steps], "step_time_s": 0.25, "tokens_per_s": 1234.0}


def make_client(settings, fake, host="127.0.0.1"):
    return TestClient(create_app(settings, run_fn=fake), client=(host, 50000))


def test_run_goes_queued_running_succeeded(settings, stored_plan):
    fake = FakeExecutor()
    with make_client(settings, fake) as c:
        r = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"candidate": 1, "steps": 2})
        assert r.status_code == 202
        run = r.json()
        assert run["status"] == "queued" and run["candidate"] == 1
        assert run["predicted"] == stored_plan["candidates"][1]["estimate"]
        assert fake.entered.wait(5)
        assert c.get(f"/v1/runs/{run['id']}").json()["status"] == "running"
        fake.release.set()
        done = wait_status(c, run["id"], {"succeeded"})
        assert done["metrics"] == {"loss": [5.5, 5.1], "step_time_s": 0.25, "tokens_per_s": 1234.0}
        assert done["log_tail"].startswith("step 1")
        assert fake.calls[0][:3] == (stored_plan["id"], 1, 2)
        assert c.get(f"/v1/plans/{stored_plan['id']}/runs").json()[0]["id"] == run["id"]


def test_failed_run_reports_the_error(settings, stored_plan):
    fake = FakeExecutor(fail=True)
    fake.release.set()
    with make_client(settings, fake) as c:
        run = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1}).json()
        done = wait_status(c, run["id"], {"failed"})
        assert "out of memory" in done["error"] and done["metrics"] is None


def test_cancel_queued_and_running(settings, stored_plan):
    fake = FakeExecutor()
    with make_client(settings, fake) as c:
        first = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1}).json()
        second = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1}).json()
        assert fake.entered.wait(5)
        assert c.delete(f"/v1/runs/{second['id']}").json()["status"] == "cancelled"
        assert c.delete(f"/v1/runs/{first['id']}").json()["status"] == "cancelled"
        fake.release.set()
        time.sleep(0.3)
        assert c.get(f"/v1/runs/{first['id']}").json()["status"] == "cancelled"
        assert c.get(f"/v1/runs/{second['id']}").json()["status"] == "cancelled"
        assert len(fake.calls) == 1  # the queued one never started
        assert c.delete("/v1/runs/nope").status_code == 404


def test_run_request_validation(settings, stored_plan):
    fake = FakeExecutor()
    fake.release.set()
    with make_client(settings, fake) as c:
        url = f"/v1/plans/{stored_plan['id']}/runs"
        for body, field in [({"steps": 0}, "steps"), ({"steps": 10_000_001}, "steps"),
                            ({"steps": 1, "candidate": 7}, "candidate"),
                            ({"steps": 1, "backend": "k8s"}, "backend"),
                            ({"steps": 1, "backend": "slurm"}, "backend")]:
            r = c.post(url, json=body)
            assert r.status_code == 422 and field in r.json()["message"], (body, r.text)
        assert c.post("/v1/plans/nope/runs", json={"steps": 1}).status_code == 404


def test_without_token_only_loopback_may_start_runs(settings, stored_plan):
    fake = FakeExecutor()
    fake.release.set()
    with make_client(settings, fake, host="10.1.2.3") as c:
        r = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1})
        assert r.status_code == 403 and "loopback" in r.json()["message"]
        assert c.get("/v1/plans").status_code == 200  # reads stay open


def test_token_is_required_when_configured(tmp_path, db_url, stored_plan):
    settings = Settings(db=db_url, run_dir=tmp_path / "runs", api_token="s3cret")
    fake = FakeExecutor()
    fake.release.set()
    with make_client(settings, fake, host="10.1.2.3") as c:
        url = f"/v1/plans/{stored_plan['id']}/runs"
        assert c.post(url, json={"steps": 1}).status_code == 401
        r = c.post(url, json={"steps": 1}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post(url, json={"steps": 1}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 202
        run_id = r.json()["id"]
        assert c.delete(f"/v1/runs/{run_id}").status_code == 401
        assert c.get(f"/v1/runs/{run_id}").status_code == 200
        ok = c.delete(f"/v1/runs/{run_id}", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_restart_marks_unfinished_runs_failed(settings, stored_plan):
    fake = FakeExecutor()
    with make_client(settings, fake) as c:
        run = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1}).json()
        assert fake.entered.wait(5)
    # The first app is gone with its run 'running' (its worker still blocked, as if the
    # process had died); a new app over the same database:
    with make_client(settings, FakeExecutor()) as c2:
        again = c2.get(f"/v1/runs/{run['id']}").json()
        assert again["status"] == "failed" and "not reattached" in again["error"]
        fake.release.set()  # the stale worker finishing late must not overwrite that
        time.sleep(0.3)
        assert c2.get(f"/v1/runs/{run['id']}").json()["status"] == "failed"


def test_missing_executor_fails_the_run_not_the_server(settings, stored_plan, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_executor(name, *args, **kwargs):
        if name.startswith("executor"):
            raise ImportError("No module named 'executor.launch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executor)
    with TestClient(create_app(settings), client=("127.0.0.1", 1)) as c:
        run = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1}).json()
        done = wait_status(c, run["id"], {"failed"})
        assert "executor is not available" in done["error"]


class ProcessGroupExecutor:
    """Starts a parent with a child in their own process group (as torchrun and its ranks)
    and hands the parent to the runner via on_start, like executor.launch.run_plan."""

    def __init__(self):
        self.proc = None
        self.started = threading.Event()

    def __call__(self, plan, candidate, steps, out_dir, seed=0, on_start=None):
        import subprocess
        import sys

        code = ("import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                "time.sleep(120)")
        self.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        on_start(self.proc)
        self.started.set()
        self.proc.wait()
        raise RuntimeError("stopped")


def test_cancel_stops_every_process_of_the_run(settings, stored_plan):
    import os

    fake = ProcessGroupExecutor()
    with make_client(settings, fake) as c:
        run = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1}).json()
        assert fake.started.wait(10)
        pgid = fake.proc.pid
        time.sleep(0.5)  # let the child start
        os.killpg(pgid, 0)  # the group exists: parent and child alive
        assert c.delete(f"/v1/runs/{run['id']}").json()["status"] == "cancelled"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("processes of the cancelled run are still alive")
        assert wait_status(c, run["id"], {"cancelled"})["status"] == "cancelled"
