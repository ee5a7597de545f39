"""Runs: state transitions with real processes (a fake rank script), progress, cancel, the
concurrent-run limit and its FIFO queue, reattach after a server restart, auth rules."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import TINY, fake_backend, fake_plan_answer, store_plan
from fastapi.testclient import TestClient

from api.app import create_app
from api.db import Database, RunRow, utcnow
from api.settings import Settings


@pytest.fixture
def tiny_plan(db_url: str) -> dict:
    answer = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}, {"tp": 2, "pp": 1, "ep": 2}], TINY)
    store_plan(db_url, answer)
    return answer


def make_client(settings, mode="ok", host="127.0.0.1", **overrides):
    settings = settings.model_copy(update={"run_poll_s": 0.05, **overrides})
    return TestClient(create_app(settings, backends={"local": fake_backend(mode)}),
                      client=(host, 50000))


def wait_status(client, run_id, statuses, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} stuck in {run['status']}: {run}")


def wait_for(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def release(settings, run_id):
    """Let a "hold" run finish (also before it started: then it finishes at once)."""
    folder = Path(settings.run_dir).resolve() / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "release").touch()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_run_goes_queued_running_succeeded_with_progress(settings, tiny_plan):
    with make_client(settings, "hold") as c:
        r = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"candidate": 1, "steps": 3})
        assert r.status_code == 202
        run = r.json()
        assert run["status"] == "queued" and run["candidate"] == 1 and run["backend"] == "local"
        predicted = run["predicted"]
        assert predicted["step_time_s"] == tiny_plan["candidates"][1]["estimate"]["step_time_s"]
        assert "plan's cluster" in predicted["machine"]
        running = wait_for(lambda: (x := c.get(f"/v1/runs/{run['id']}").json())["metrics"]
                           and "step 1/3" in (x["log_tail"] or "") and x, what="progress")
        assert running["status"] == "running" and running["job"]["pid"] > 0
        assert running["metrics"]["partial"] is True and running["metrics"]["loss"] == [5.5]
        assert running["started_at"] is not None
        assert "step 1/3 loss 5.5000" in running["log_tail"]  # the log tail is live too
        release(settings, run["id"])
        done = wait_status(c, run["id"], {"succeeded"})
        m = done["metrics"]
        assert m["loss"] == pytest.approx([5.5, 5.4, 5.3]) and m["steps"] == [1, 2, 3]
        assert "partial" not in m
        tokens = TINY["training"]["global_batch_size"] * TINY["training"]["seq_length"]
        assert m["tokens_per_s"] == pytest.approx(tokens / 0.5)
        # measured MFU uses the prediction's FLOPs and peak: ratio of the step times
        assert m["mfu"] == pytest.approx(predicted["mfu"] * predicted["step_time_s"] / 0.5)
        assert "fake rank 0 starting 3 steps" in done["log_tail"]
        assert c.get(f"/v1/plans/{tiny_plan['id']}/runs").json()[0]["id"] == run["id"]
        assert not alive(done["job"]["pid"])


def test_failed_run_reports_the_error_and_log(settings, tiny_plan):
    with make_client(settings, "fail") as c:
        run = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"steps": 1}).json()
        done = wait_status(c, run["id"], {"failed"})
        assert "exited with code 3" in done["error"]
        assert "CUDA out of memory (fake)" in done["log_tail"]
        assert done["metrics"] is None and done["finished_at"] is not None


def test_cancel_queued_and_running(settings, tiny_plan):
    with make_client(settings, "hold") as c:
        url = f"/v1/plans/{tiny_plan['id']}/runs"
        first, second = c.post(url, json={"steps": 2}).json(), c.post(url, json={"steps": 2}).json()
        running = wait_for(lambda: c.get(f"/v1/runs/{first['id']}").json()["job"], what="start")
        assert c.get(f"/v1/runs/{second['id']}").json()["status"] == "queued"  # limit 1
        assert c.delete(f"/v1/runs/{second['id']}").json()["status"] == "cancelled"
        assert c.delete(f"/v1/runs/{first['id']}").json()["status"] == "cancelled"
        wait_for(lambda: not alive(running["pid"]), what="the cancelled job to stop")
        time.sleep(0.3)  # a few scheduler passes: nothing changes any more
        assert c.get(f"/v1/runs/{first['id']}").json()["status"] == "cancelled"
        again = c.get(f"/v1/runs/{second['id']}").json()
        assert again["status"] == "cancelled" and again["job"] is None  # never started
        assert c.delete(f"/v1/runs/{first['id']}").json()["status"] == "cancelled"  # idempotent
        assert c.delete("/v1/runs/nope").status_code == 404


def test_concurrency_limit_starts_queued_runs_in_order(settings, tiny_plan):
    with make_client(settings, "hold", max_concurrent_runs=2) as c:
        url = f"/v1/plans/{tiny_plan['id']}/runs"
        ids = [c.post(url, json={"steps": 1}).json()["id"] for _ in range(4)]

        def statuses():
            return [c.get(f"/v1/runs/{i}").json()["status"] for i in ids]

        wait_for(lambda: statuses() == ["running", "running", "queued", "queued"], what="2 running")
        time.sleep(0.3)
        assert statuses() == ["running", "running", "queued", "queued"]
        release(settings, ids[1])  # the second finishes first: the oldest queued run starts
        wait_for(lambda: statuses() == ["running", "succeeded", "running", "queued"],
                 what="third to start")
        for i in ids:
            release(settings, i)
        wait_for(lambda: statuses() == ["succeeded"] * 4, what="all done")


def test_restart_reattaches_to_a_running_job(settings, tiny_plan):
    with make_client(settings, "hold") as c:
        run = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"steps": 2}).json()
        job = wait_for(lambda: c.get(f"/v1/runs/{run['id']}").json()["job"], what="start")
    assert alive(job["pid"])  # stopping the server does not stop the job
    with make_client(settings, "hold") as c2:
        again = c2.get(f"/v1/runs/{run['id']}").json()
        assert again["status"] == "running" and again["job"] == job
        release(settings, run["id"])
        done = wait_status(c2, run["id"], {"succeeded"})
        assert done["metrics"]["loss"] == pytest.approx([5.5, 5.4])


def test_restart_finishes_runs_that_ended_while_the_server_was_down(settings, tiny_plan):
    with make_client(settings, "hold") as c:
        url = f"/v1/plans/{tiny_plan['id']}/runs"
        ok = c.post(url, json={"steps": 1}).json()
        wait_for(lambda: c.get(f"/v1/runs/{ok['id']}").json()["job"], what="start")
    release(settings, ok["id"])  # finishes while no server is watching
    wait_for(lambda: (Path(settings.run_dir).resolve() / ok["id"] / "metrics.json").exists(),
             what="metrics")
    with make_client(settings, "hold", max_concurrent_runs=2) as c2:
        killed = c2.post(url, json={"steps": 1}).json()
        job = wait_for(lambda: c2.get(f"/v1/runs/{killed['id']}").json()["metrics"]
                       and c2.get(f"/v1/runs/{killed['id']}").json()["job"], what="first step")
    os.killpg(job["pid"], 9)  # dies while no server is watching
    wait_for(lambda: not alive(job["pid"]), what="kill")
    with make_client(settings, "hold") as c3:
        assert wait_status(c3, ok["id"], {"succeeded", "failed"})["status"] == "succeeded"
        lost = wait_status(c3, killed["id"], {"succeeded", "failed"})
        assert lost["status"] == "failed" and "without writing metrics.json" in lost["error"]
        assert lost["metrics"]["partial"] is True  # the step it did finish is kept


def test_running_row_without_a_job_is_marked_lost(settings, tiny_plan, db_url):
    db = Database(db_url)
    db.init()
    with db.session() as s:
        s.add(RunRow(id="l" * 32, plan_id=tiny_plan["id"], candidate=0, steps=1, backend="local",
                     status="running", created_at=utcnow(), started_at=utcnow()))
    db.dispose()
    with make_client(settings) as c:
        lost = wait_status(c, "l" * 32, {"failed"})
        assert lost["error"].startswith("lost:")


def test_run_request_validation(settings, tiny_plan, stored_plan):
    with make_client(settings) as c:
        url = f"/v1/plans/{tiny_plan['id']}/runs"
        for body, field, why in [
            ({"steps": 0}, "steps", ""), ({"steps": 10_000_001}, "steps", ""),
            ({"steps": 1, "candidate": 7}, "candidate", "the plan has 2 candidates"),
            ({"steps": 1, "backend": "k8s"}, "backend", ""),
            ({"steps": 1, "backend": "slurm"}, "backend", "not configured on this server"),
        ]:
            r = c.post(url, json=body)
            assert r.status_code == 422 and field in r.json()["message"], (body, r.text)
            assert why in r.text
        assert c.post("/v1/plans/nope/runs", json={"steps": 1}).status_code == 404
        # 128 GPUs on a host without GPUs: refused with the reason, nothing stored
        r = c.post(f"/v1/plans/{stored_plan['id']}/runs", json={"steps": 1})
        assert r.status_code == 422 and "128 ranks" in r.text and "backend" in r.json()["message"]
        assert c.get(f"/v1/plans/{stored_plan['id']}/runs").json() == []


def test_local_run_that_would_not_fit_in_host_memory_is_refused(settings, db_url):
    """Mixtral-8x7B on one 8-GPU node, run here on CPU ranks: far beyond this host's RAM."""
    request = {"model": {"preset": "mixtral-8x7b"},
               "cluster": {"num_nodes": 1, "gpus_per_node": 8, "gpu": "h100"},
               "training": {"seq_length": 4096, "global_batch_size": 32}}
    plan = fake_plan_answer([{"tp": 2, "pp": 4, "ep": 2}], request)
    store_plan(db_url, plan)
    with make_client(settings) as c:
        r = c.post(f"/v1/plans/{plan['id']}/runs", json={"steps": 1})
        assert r.status_code == 422, r.text
        assert "GiB per rank" in r.text and "available" in r.text and "backend" in r.json()["message"]


def test_without_token_only_loopback_may_start_runs(settings, tiny_plan):
    with make_client(settings, host="10.1.2.3") as c:
        r = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"steps": 1})
        assert r.status_code == 403 and "loopback" in r.json()["message"]
        assert c.get("/v1/plans").status_code == 200  # reads stay open


def test_token_is_required_when_configured(tmp_path, db_url, tiny_plan):
    settings = Settings(db=db_url, run_dir=tmp_path / "runs", api_token="s3cret")
    with make_client(settings, "hold", host="10.1.2.3") as c:
        url = f"/v1/plans/{tiny_plan['id']}/runs"
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


def test_missing_executor_fails_the_run_not_the_server(settings, tiny_plan, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_executor(name, *args, **kwargs):
        if name.startswith("executor"):
            raise ImportError("No module named 'executor.config'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executor)
    with TestClient(create_app(settings.model_copy(update={"run_poll_s": 0.05})),
                    client=("127.0.0.1", 1)) as c:
        run = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"steps": 1}).json()
        done = wait_status(c, run["id"], {"failed"})
        assert "executor is not available" in done["error"]


def test_cancel_stops_every_process_of_the_run(settings, tiny_plan):
    with make_client(settings, "child") as c:
        run = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"steps": 1}).json()
        child_file = Path(settings.run_dir).resolve() / run["id"] / "child_pid"
        wait_for(child_file.exists, what="the child process")
        job = c.get(f"/v1/runs/{run['id']}").json()["job"]
        child = int(child_file.read_text())
        assert alive(job["pid"]) and alive(child)
        assert c.delete(f"/v1/runs/{run['id']}").json()["status"] == "cancelled"
        wait_for(lambda: not alive(job["pid"]) and not alive(child), timeout=10,
                 what="leader and child to stop")
        assert wait_status(c, run["id"], {"cancelled"})["status"] == "cancelled"


def test_prediction_for_the_profiled_run_machine(settings, tiny_plan, tmp_path):
    """With FOLDPLAN_RUN_PROFILE the run's prediction is for the profiled machine."""
    profile = {"backend": "gloo", "machine": {"cuda_devices": []}, "gemm_tflops": {"fp32": 0.001, "bf16": 0.001}, "hbm_GBps": 1.0,
               "intra_node_GBps": 1.0, "intra_node_latency_us": 50.0, "kernel_overhead_us": 20.0}
    path = tmp_path / "profile.json"
    path.write_text(__import__("json").dumps(profile))
    with make_client(settings, run_profile=path) as c:
        run = c.post(f"/v1/plans/{tiny_plan['id']}/runs", json={"steps": 1}).json()
        assert str(path) in run["predicted"]["machine"]
        plan_time = tiny_plan["candidates"][0]["estimate"]["step_time_s"]
        assert run["predicted"]["step_time_s"] > 10 * plan_time  # the profiled (slow) machine
        assert wait_status(c, run["id"], {"succeeded"})["status"] == "succeeded"


def test_diverged_run_answers_null_for_non_finite_numbers(settings, tiny_plan, db_url):
    db = Database(db_url)
    db.init()
    with db.session() as s:
        s.add(RunRow(id="n" * 32, plan_id=tiny_plan["id"], candidate=0, steps=2, backend="local",
                     status="failed", created_at=utcnow(), error="diverged",
                     metrics={"loss": [5.5, float("nan")], "step_time_s": float("inf")}))
    db.dispose()
    with make_client(settings) as c:
        r = c.get("/v1/runs/" + "n" * 32)
        assert r.status_code == 200
        assert r.json()["metrics"] == {"loss": [5.5, None], "step_time_s": None}
        assert c.get(f"/v1/plans/{tiny_plan['id']}/runs").status_code == 200


def test_bad_run_profile_refuses_to_start(settings, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"gemm_tflops": 5}')
    for path, why in [(bad, "gemm_tflops must be an object"), (tmp_path / "nope.json", "No such file")]:
        with pytest.raises(ValueError, match=why) as err:
            create_app(settings.model_copy(update={"run_profile": path}))
        assert "run_profile=" in str(err.value)


def test_progress_is_read_incrementally_and_whole_lines_only(tmp_path):
    from api.run_progress import ProgressReader

    reader = ProgressReader()
    f = tmp_path / "progress.jsonl"
    assert reader.read("r", tmp_path) == ([], False)  # no file yet
    f.write_text('{"step": 1, "loss": 5.0, "time_s": 1.0}\n{"step": 2, "lo')
    steps, new = reader.read("r", tmp_path)
    assert new and [x.step for x in steps] == [1]  # the half-written line waits
    assert reader.read("r", tmp_path)[1] is False
    with open(f, "a") as out:
        out.write('ss": 4.0, "time_s": 1.0}\nnot json\n{"step": 3, "loss": 3.0, "time_s": 1.0}\n')
    steps, new = reader.read("r", tmp_path)
    assert new and [x.step for x in steps] == [1, 2, 3]  # a garbled line is skipped


def test_partial_metrics_of_a_long_run_stay_bounded():
    from api.run_progress import PARTIAL_POINTS, partial_metrics
    from executor.run_files import ProgressLine

    progress = [ProgressLine(step=i + 1, loss=10.0 - i * 1e-4, time_s=3.0 if i == 0 else 0.5)
                for i in range(25_000)]
    m = partial_metrics(progress)
    assert len(m["loss"]) == len(m["steps"]) == PARTIAL_POINTS
    assert m["steps"][0] == 1 and m["steps"][-1] == 25_000  # first and latest kept
    assert m["steps"] == sorted(m["steps"]) and m["step_time_s"] == 0.5
    short = partial_metrics(progress[:3])
    assert short["steps"] == [1, 2, 3] and short["step_time_s"] == 0.5


def test_list_runs_filtered_by_status(settings, tiny_plan):
    with make_client(settings, "hold") as c:
        url = f"/v1/plans/{tiny_plan['id']}/runs"
        first, second = c.post(url, json={"steps": 1}).json(), c.post(url, json={"steps": 1}).json()
        c.delete(f"/v1/runs/{first['id']}")
        active = c.get(url, params=[("status", "queued"), ("status", "running")]).json()
        assert [r["id"] for r in active] == [second["id"]]
        assert [r["id"] for r in c.get(url, params={"status": "cancelled"}).json()] == [first["id"]]
        assert len(c.get(url).json()) == 2
        bad = c.get(url, params={"status": "done"})
        assert bad.status_code == 422 and "status" in bad.json()["message"]
        c.delete(f"/v1/runs/{second['id']}")


def test_queued_run_the_backend_cannot_take_fails_with_the_reason(settings, stored_plan, db_url):
    """A queued row left by another server (128 GPUs on this GPU-less host) is not started."""
    db = Database(db_url)
    db.init()
    with db.session() as s:
        s.add(RunRow(id="q" * 32, plan_id=stored_plan["id"], candidate=0, steps=1,
                     backend="local", status="queued", created_at=utcnow()))
    db.dispose()
    with make_client(settings) as c:
        failed = wait_status(c, "q" * 32, {"failed", "running", "succeeded"})
        assert failed["status"] == "failed" and "128 ranks" in failed["error"]
        assert failed["job"] is None
