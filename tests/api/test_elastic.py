"""Elastic runs through the service with fake nodes (no torch): one process group per node, a
node killed with SIGKILL, the re-plan for the nodes left (the real planner), the resumed
attempt, no mapping fitting, fewer than min_nodes, a server restart during recovery, cancel,
growing back when nodes return, the foreground twin (`foldplan run --on-failure replan`).
The same with real torchrun ranks is tests/api/test_elastic_torchrun.py (slow)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY, fake_plan_answer, store_plan
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.backends.local import LocalBackend
from api.db import Database, RunRow, utcnow
from executor.run_files import COMPLETE_MARKER, checkpoint_dir

STEP_S = 0.25
# One node of a fake job. Node 0 trains: a progress line per step whose loss tells which
# attempt wrote it (+0.001 per node), a COMPLETE checkpoint marker every save_every steps, a
# resumed attempt starts after the latest one, metrics.json at the end. The other nodes live
# until node 0 is done.
FAKE_NODE = '''
import sys, time
from pathlib import Path
from executor.run_files import (COMPLETE_MARKER, PROGRESS_FILE, ProgressLine, RunMetrics,
    append_progress, checkpoint_dir, latest_checkpoint, write_metrics)
out, steps, every, resume, node, nodes, port, step_s = sys.argv[1:9]
out, steps, every, node, nodes = Path(out), int(steps), int(every), int(node), int(nodes)
step_s = float(step_s)
done = out / f"done.{port}"
if node:
    while not done.exists():
        time.sleep(0.05)
    sys.exit(0)
start = (latest_checkpoint(out) or 0) if resume == "1" else 0
if resume != "1":
    (out / PROGRESS_FILE).unlink(missing_ok=True)
run = list(range(start + 1, steps + 1))
losses = [10.0 - 0.1 * s + 0.001 * nodes for s in run]
for s, loss in zip(run, losses):
    time.sleep(step_s)
    append_progress(out, ProgressLine(step=s, loss=loss, time_s=step_s, aux_loss=0.01,
                                      grad_norm=1.0, num_dropped=0))
    if every and s % every == 0:
        checkpoint_dir(out, s).mkdir(parents=True, exist_ok=True)
        (checkpoint_dir(out, s) / COMPLETE_MARKER).write_text("{}")
n = len(run)
write_metrics(out, RunMetrics(loss=losses, steps=run, step_times_s=[step_s] * n,
    step_time_s=step_s, tokens_per_s=1.0, model_flops_per_step=0.0, tflops_per_gpu=0.0,
    mfu=0.0, aux_loss=[0.01] * n, grad_norm=[1.0] * n, num_dropped=[0] * n,
    expert_load_imbalance=[None] * n, comm_bytes={}, world_size=2 * nodes, backend="gloo",
    device="cpu", precision="fp32", mapping={}))
done.touch()
'''
GPUS2 = {**TINY["cluster"], "num_nodes": 2}


def loss_of(step: int, num_nodes: int) -> float:
    return 10.0 - 0.1 * step + 0.001 * num_nodes


@pytest.fixture
def fake_nodes(tmp_path: Path) -> LocalBackend:
    script = tmp_path / "fake_node.py"
    script.write_text(FAKE_NODE)

    def node_command(job, node: int, port: int) -> list[str]:
        return [sys.executable, str(script), str(job.out_dir), str(job.steps), str(job.save_every),
                "1" if job.resume else "0", str(node), str(job.num_nodes), str(port), str(STEP_S)]
    return LocalBackend(node_command=node_command)


def two_node_plan(db_url: str, gpu: object = "cpu") -> dict:
    request = {**TINY, "cluster": {**GPUS2, "gpu": gpu}}
    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 4}], request)
    store_plan(db_url, plan)
    return plan


def client_of(settings, backend: LocalBackend) -> TestClient:
    settings = settings.model_copy(update={"run_poll_s": 0.05, "plan_time_limit_s": 20})
    return TestClient(create_app(settings, backends={"local": backend}),
                      client=("127.0.0.1", 50000))


def wait_for(pred, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_done(c: TestClient, run_id: str, timeout: float = 60.0) -> dict:
    return wait_for(lambda: (r := c.get(f"/v1/runs/{run_id}").json())["status"] in
                    ("succeeded", "failed", "cancelled") and r, timeout, "the run to end")


def group_alive(pgid: int) -> bool:
    """Whether a live process (not a zombie waiting for its reaper) is in group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def start_and_kill(c: TestClient, plan: dict, body: dict, node: int, after_step: int) -> dict:
    """Start an elastic run, SIGKILL node `node`'s process group once `after_step` steps are
    in; return the run as it was before the kill."""
    run = c.post(f"/v1/plans/{plan['id']}/runs", json=body)
    assert run.status_code == 202, run.text
    run_id = run.json()["id"]
    running = wait_for(lambda: (r := c.get(f"/v1/runs/{run_id}").json())["job"]
                       and len((r["metrics"] or {}).get("steps", [])) >= after_step and r,
                       what=f"{after_step} steps")
    os.killpg(running["job"]["nodes"][node]["pgid"], signal.SIGKILL)
    return running


def test_lost_node_replans_and_resumes_from_the_checkpoint(settings, db_url, fake_nodes):
    plan = two_node_plan(db_url)
    with client_of(settings, fake_nodes) as c:
        before = start_and_kill(c, plan, {"steps": 10, "save_every": 2, "on_failure": "replan"},
                                node=1, after_step=3)
        nodes = before["job"]["nodes"]
        assert [n["node"] for n in nodes] == [0, 1] and all(n["pgid"] > 0 for n in nodes)
        assert before["on_failure"] == "replan" and before["save_every"] == 2
        done = wait_done(c, before["id"])
        assert done["status"] == "succeeded", done
        first, second = done["attempts"]
        assert first["status"] == "failed" and first["lost_nodes"] == [1]
        assert "node 1 lost" in first["error"] and first["plan_id"] == plan["id"]
        assert first["num_nodes"] == 2 and first["start_step"] == 1 and first["end_step"] >= 3
        assert second["status"] == "succeeded" and second["num_nodes"] == 1
        assert second["plan_id"] != plan["id"] and second["end_step"] == 10
        resumed_from = second["start_step"] - 1
        assert resumed_from >= 2 and resumed_from % 2 == 0  # the latest checkpoint at the kill
        assert second["recovery_s"] > 0 and first["recovery_s"] is None
        m = done["metrics"]
        assert m["steps"] == list(range(1, 11))  # every step once
        assert m["loss"] == pytest.approx([loss_of(s, 2 if s <= resumed_from else 1)
                                           for s in range(1, 11)])
        assert len(m["aux_loss"]) == 10
        new_plan = c.get(f"/v1/plans/{second['plan_id']}").json()
        assert new_plan["cluster"]["num_nodes"] == 1
        assert new_plan["training"] == plan["training"]
        assert second["mapping"] == new_plan["candidates"][second["candidate"]]["mapping"]
        assert len(done["job"]["nodes"]) == 1
        assert c.get(f"/plans/{second['plan_id']}").status_code == 200
    assert not any(group_alive(n["pgid"]) for n in nodes + done["job"]["nodes"])


def test_node_lost_before_the_first_checkpoint_restarts_from_step_one(settings, db_url,
                                                                     fake_nodes):
    """Node 0 (hosting the rendezvous and rank 0) dies at step 2 of 5, no checkpoint yet."""
    plan = two_node_plan(db_url)
    with client_of(settings, fake_nodes) as c:
        before = start_and_kill(c, plan, {"steps": 5, "on_failure": "replan"}, node=0,
                                after_step=2)
        done = wait_done(c, before["id"])
        assert done["status"] == "succeeded", done
        first, second = done["attempts"]
        assert first["lost_nodes"] == [0] and second["start_step"] == 1
        assert done["metrics"]["steps"] == [1, 2, 3, 4, 5]
        assert done["metrics"]["loss"] == pytest.approx([loss_of(s, 1) for s in range(1, 6)])


@pytest.mark.parametrize("case", ["no mapping fits", "min_nodes"])
def test_lost_node_without_a_way_on_fails_with_reasons(settings, db_url, fake_nodes, case):
    # 2 nodes of 2 ranks fit in 0.025 GiB per rank, 1 node does not (tiny-moe, no reserve)
    gpu = {"name": "tiny-memory", "peak_tflops": 0.05, "memory_gib": 0.025, "hbm_GBps": 10.0,
           "memory_reserve_gib": 0.0} if case == "no mapping fits" else "cpu"
    plan = two_node_plan(db_url, gpu)
    body = {"steps": 20, "save_every": 2, "on_failure": "replan",
            "min_nodes": 2 if case == "min_nodes" else 1}
    with client_of(settings, fake_nodes) as c:
        before = start_and_kill(c, plan, body, node=1, after_step=2)
        done = wait_done(c, before["id"])
        assert done["status"] == "failed"
        assert "node 1 lost" in done["error"]
        if case == "min_nodes":
            assert "1 node left, fewer than min_nodes=2" in done["error"]
            assert len(done["attempts"]) == 1
        else:
            assert "no mapping fits (search INFEASIBLE)" in done["error"]
            assert "no mapping fits in memory" in done["error"]  # the planner's reason
            assert [a["status"] for a in done["attempts"]] == ["failed", "failed"]
        assert done["metrics"]["partial"] is True and done["metrics"]["steps"][:2] == [1, 2]
        time.sleep(0.5)
    assert not any(group_alive(n["pgid"]) for n in before["job"]["nodes"])


@pytest.mark.parametrize("phase", ["replanning", "starting"])
def test_server_restart_during_recovery_finishes_it(settings, db_url, fake_nodes, phase):
    """The server stopped between two attempts: the next one re-plans (or starts the attempt
    of the plan it finds) and trains to the end from the checkpoint."""
    plan = two_node_plan(db_url)
    run_id = "e" * 32
    out = Path(settings.run_dir).resolve() / run_id
    out.mkdir(parents=True)
    lines = [f'{{"step": {s}, "loss": {loss_of(s, 2)}, "time_s": 0.25}}' for s in (1, 2, 3)]
    (out / "progress.jsonl").write_text("\n".join(lines) + "\n")
    checkpoint_dir(out, 2).mkdir(parents=True)
    (checkpoint_dir(out, 2) / COMPLETE_MARKER).write_text("{}")
    one_node = None
    if phase == "starting":  # the re-plan was stored before the server stopped
        one_node = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
        store_plan(db_url, one_node)
    failed = {"plan_id": plan["id"], "candidate": 0, "mapping": plan["candidates"][0]["mapping"],
              "num_nodes": 2, "start_step": 1, "end_step": 3, "status": "failed",
              "error": "node 1 lost", "recovery_s": None, "lost_nodes": [1],
              "failed_at": utcnow().isoformat(), "first_progress_line": 0}
    pending = {"plan_id": one_node and one_node["id"], "num_nodes": 1, "status": phase,
               "first_progress_line": 3}
    db = Database(db_url)
    db.init()
    with db.session() as s:
        s.add(RunRow(id=run_id, plan_id=plan["id"], candidate=0, steps=6, backend="local",
                     status="running", created_at=utcnow(), started_at=utcnow(),
                     out_dir=str(out), options={"save_every": 2, "on_failure": "replan",
                                                "min_nodes": 1},
                     attempts=[failed, pending]))
    db.dispose()
    with client_of(settings, fake_nodes) as c:
        done = wait_done(c, run_id)
    assert done["status"] == "succeeded", done
    second = done["attempts"][1]
    assert second["status"] == "succeeded" and second["start_step"] == 3
    if one_node is not None:
        assert second["plan_id"] == one_node["id"]
    assert done["metrics"]["steps"] == [1, 2, 3, 4, 5, 6]
    assert done["metrics"]["loss"] == pytest.approx(
        [loss_of(s, 2) for s in (1, 2)] + [loss_of(s, 1) for s in (3, 4, 5, 6)])


def test_cancel_stops_every_node(settings, db_url, fake_nodes):
    plan = two_node_plan(db_url)
    with client_of(settings, fake_nodes) as c:
        run = c.post(f"/v1/plans/{plan['id']}/runs",
                     json={"steps": 50, "on_failure": "replan", "save_every": 5}).json()
        job = wait_for(lambda: c.get(f"/v1/runs/{run['id']}").json()["job"], what="start")
        assert len(job["nodes"]) == 2
        gone = c.delete(f"/v1/runs/{run['id']}").json()
        assert gone["status"] == "cancelled" and gone["attempts"][-1]["status"] == "cancelled"
        wait_for(lambda: not any(group_alive(n["pgid"]) for n in job["nodes"]), 15,
                 "every node to stop")
        time.sleep(0.3)  # no re-plan after a cancel: stopped nodes are not lost nodes
        again = c.get(f"/v1/runs/{run['id']}").json()
        assert again["status"] == "cancelled" and len(again["attempts"]) == 1


def test_cancel_after_a_replan_stops_the_new_attempt(settings, db_url, fake_nodes):
    plan = two_node_plan(db_url)
    with client_of(settings, fake_nodes) as c:
        before = start_and_kill(c, plan, {"steps": 60, "on_failure": "replan"}, node=1,
                                after_step=1)
        url = f"/v1/runs/{before['id']}"
        again = wait_for(lambda: len((r := c.get(url).json())["attempts"]) == 2 and r["job"]
                         and r, what="the second attempt")
        gone = c.delete(url).json()
        assert gone["status"] == "cancelled"
        assert [a["status"] for a in gone["attempts"]] == ["failed", "cancelled"]
        wait_for(lambda: not any(group_alive(n["pgid"]) for n in again["job"]["nodes"]), 15,
                 "the second attempt to stop")
        time.sleep(0.3)
        assert len(c.get(url).json()["attempts"]) == 2


def test_run_grows_back_at_the_next_checkpoint_when_nodes_return(settings, db_url, tmp_path,
                                                                 fake_nodes):
    """Stretch of issue 13: 2 nodes, one lost (1 node offered), then 2 offered again: the run
    stops after its next checkpoint and re-plans up to max_nodes=2."""
    offered = tmp_path / "nodes"
    offered.write_text("2")
    fake_nodes.nodes_file = offered
    plan = two_node_plan(db_url)
    with client_of(settings, fake_nodes) as c:
        offered.write_text("1")
        before = start_and_kill(c, plan, {"steps": 24, "save_every": 2, "on_failure": "replan",
                                          "max_nodes": 2}, node=1, after_step=3)
        url = f"/v1/runs/{before['id']}"
        wait_for(lambda: len((r := c.get(url).json())["attempts"]) == 2 and r["job"]
                 and (r["attempts"][1]["end_step"] or 0) >= r["attempts"][1]["start_step"] + 1,
                 what="steps on one node")
        offered.write_text("2")
        done = wait_done(c, before["id"])
    assert done["status"] == "succeeded", done
    assert done["max_nodes"] == 2
    lost, small, grown = done["attempts"]
    assert lost["lost_nodes"] == [1] and lost["end_step"] >= 3
    assert [a["status"] for a in done["attempts"]] == ["failed", "stopped", "succeeded"]
    assert [a["num_nodes"] for a in done["attempts"]] == [2, 1, 2]
    assert small["stopped_at"] and grown["recovery_s"] > 0
    assert (grown["start_step"] - 1) % 2 == 0 and grown["start_step"] > small["start_step"]
    assert grown["plan_id"] not in (plan["id"], small["plan_id"])
    assert done["metrics"]["steps"] == list(range(1, 25))
    assert done["metrics"]["loss"][-1] == pytest.approx(loss_of(24, 2))


def test_a_grow_that_cannot_start_goes_on_with_the_nodes_it_has(settings, db_url, tmp_path,
                                                               fake_nodes):
    offered = tmp_path / "nodes"
    offered.write_text("1")
    fake_nodes.nodes_file = offered
    refuse_two = []  # set once the run is going: 2-node jobs cannot start any more
    fake_nodes.unavailable = lambda job: ("2 nodes are gone for good" if refuse_two
                                          and job.num_nodes > 1 else None)
    plan = two_node_plan(db_url)
    with client_of(settings, fake_nodes) as c:
        before = start_and_kill(c, plan, {"steps": 16, "save_every": 2, "on_failure": "replan",
                                          "max_nodes": 2}, node=1, after_step=2)
        url = f"/v1/runs/{before['id']}"
        wait_for(lambda: len((r := c.get(url).json())["attempts"]) == 2 and r["job"],
                 what="the second attempt")
        refuse_two.append(True)
        offered.write_text("2")
        done = wait_done(c, before["id"])
    assert done["status"] == "succeeded", done
    assert [a["status"] for a in done["attempts"]] == ["failed", "stopped", "succeeded"]
    assert [a["num_nodes"] for a in done["attempts"]] == [2, 1, 1]
    last = done["attempts"][2]
    assert "growing to 2 nodes failed" in last["error"] and "gone for good" in last["error"]
    assert last["plan_id"] == done["attempts"][1]["plan_id"] and done["max_nodes"] is None
    assert done["metrics"]["steps"] == list(range(1, 17))


def test_replan_is_refused_where_the_backend_cannot_see_lost_nodes(settings, db_url):
    plan = two_node_plan(db_url)
    slurmish = LocalBackend()
    slurmish.reports_lost_nodes = False
    with client_of(settings, slurmish) as c:
        url = f"/v1/plans/{plan['id']}/runs"
        r = c.post(url, json={"steps": 2, "on_failure": "replan"})
        assert r.status_code == 422 and "on_failure" in r.json()["message"]
        r = c.post(url, json={"steps": 2, "min_nodes": 3})
        assert r.status_code == 422 and "min_nodes=3 but the plan's cluster has 2" in r.text
        r = c.post(url, json={"steps": 2, "on_failure": "retry"})
        assert r.status_code == 422 and "on_failure" in r.text
        r = c.post(url, json={"steps": 2, "max_nodes": 4})
        assert r.status_code == 422 and "max_nodes=4 needs on_failure='replan'" in r.text


def test_foreground_run_replans_like_the_service(tmp_path, db_url, fake_nodes):
    """`foldplan run --on-failure replan` drives the same run manager in the foreground."""
    from api.elastic_foreground import RUN_DB, run_elastic

    plan = two_node_plan(db_url)
    out = tmp_path / "fg"
    result: dict = {}
    fg = threading.Thread(target=lambda: result.update(zip(("metrics", "attempts"), run_elastic(
        plan, 0, 8, out, save_every=2, poll_s=0.05, echo=False, backend=fake_nodes))))
    fg.start()

    def job():
        """The run's job handle, once 3 steps are in (from the run's own database)."""
        if not (out / RUN_DB).exists() or len(progress_steps(out)) < 3:
            return None
        db = Database(f"sqlite:///{out / RUN_DB}")
        with db.session() as s:
            handle = s.scalars(select(RunRow.job)).first()
        db.dispose()
        return handle
    nodes = wait_for(job, what="3 steps")["nodes"]
    os.killpg(nodes[1]["pgid"], signal.SIGKILL)
    fg.join(60)
    assert not fg.is_alive()
    first, second = result["attempts"]
    assert first["lost_nodes"] == [1] and second["num_nodes"] == 1
    assert second["status"] == "succeeded" and second["start_step"] >= 3
    assert result["metrics"]["steps"] == list(range(1, 9))
    assert (out / "attempts.json").exists()


def progress_steps(out: Path) -> list[str]:
    try:
        return (out / "progress.jsonl").read_text().splitlines()
    except OSError:
        return []


@pytest.mark.parametrize("argv,match", [
    (["--resume"], "--resume and --on-failure replan: give one"),
    (["--min-nodes", "3"], "--min-nodes 3: the plan's cluster has 2 nodes"),
])
def test_foreground_refusals(tmp_path, db_url, capsys, argv, match):
    from api.cli import main

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(two_node_plan(db_url)))
    code = main(["run", "--plan", str(plan_file), "--steps", "2", "--out", str(tmp_path / "o"),
                 "--on-failure", "replan", *argv])
    assert code == 2 and match in capsys.readouterr().err


def test_metrics_keep_one_entry_per_step_across_attempts():
    from api.run_progress import latest_per_step, merged_metrics, partial_metrics
    from executor.run_files import ProgressLine

    def line(step, loss):
        return ProgressLine(step=step, loss=loss, time_s=1.0, aux_loss=0.1 * step)
    # attempt 1 trained 1..3, checkpoint after 2; attempt 2 trained 3..4 again from there
    progress = [line(1, 5.0), line(2, 4.0), line(3, 3.9), line(3, 3.0), line(4, 2.0)]
    assert [(p.step, p.loss) for p in latest_per_step(progress)] == [
        (1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0)]
    partial = partial_metrics(progress)
    assert partial["steps"] == [1, 2, 3, 4] and partial["loss"] == [5.0, 4.0, 3.0, 2.0]
    final = {"steps": [3, 4], "loss": [3.0, 2.0], "aux_loss": [0.3, 0.4],
             "grad_norm": [1.0, 1.0], "step_time_s": 1.0}
    merged = merged_metrics(final, progress)
    assert merged["steps"] == [1, 2, 3, 4] and merged["loss"] == [5.0, 4.0, 3.0, 2.0]
    assert merged["aux_loss"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert merged["grad_norm"] == [None, None, 1.0, 1.0]  # those lines did not carry it
    assert merged["step_time_s"] == 1.0
    assert merged_metrics(final, []) == final
