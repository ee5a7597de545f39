"""Elastic run with real ranks (slow): tiny-moe on 2 nodes x 2 CPU ranks (gloo) from the
service, one node's process group killed with SIGKILL after a checkpoint (or after the first
step, before any checkpoint); the run re-plans to 1 node, resumes (or restarts) and trains
every step, and the losses after the switch equal, bit for bit, those of `foldplan run
--resume` (executor.launch.run_plan) of the same checkpoint on the new mapping (or of a fresh
`foldplan run`). Prints the recovery time (kill to the next trained step).

    timeout 900 .venv/bin/python -m pytest -q -s tests/api/test_elastic_torchrun.py
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import TINY, fake_plan_answer, store_plan
from fastapi.testclient import TestClient
from test_elastic import group_alive, wait_done, wait_for

from api.app import create_app
from api.backends.local import LocalBackend
from executor.launch import run_plan
from executor.run_files import PROGRESS_FILE, checkpoint_dir

STEPS, SAVE_EVERY = 10, 2


def progress_lines(out: Path) -> list[dict]:
    try:
        text = (out / PROGRESS_FILE).read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kill_after", ["checkpoint", "first step"])
def test_node_killed_replans_to_one_node_and_matches_foldplan_run(
        settings, db_url, tmp_path, monkeypatch, kill_after):
    """After a checkpoint: resumed from it; after the first step, before any checkpoint: the
    new plan trains from step 1 (compared with a fresh `foldplan run` of the new mapping)."""
    monkeypatch.setenv("FOLDPLAN_DIST_TIMEOUT_S", "60")
    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 4}],
                            {**TINY, "cluster": {**TINY["cluster"], "num_nodes": 2}})
    store_plan(db_url, plan)
    settings = settings.model_copy(update={"run_poll_s": 0.2, "plan_time_limit_s": 30})
    body = {"steps": STEPS, "on_failure": "replan"}
    if kill_after == "checkpoint":
        body["save_every"] = SAVE_EVERY
    with TestClient(create_app(settings, backends={"local": LocalBackend()}),
                    client=("127.0.0.1", 50000)) as c:
        run = c.post(f"/v1/plans/{plan['id']}/runs", json=body).json()
        out = Path(settings.run_dir).resolve() / run["id"]
        if kill_after == "checkpoint":
            wait_for(lambda: (checkpoint_dir(out, SAVE_EVERY) / "COMPLETE").exists(), 300,
                     "the first checkpoint")
        else:
            wait_for(lambda: progress_lines(out), 300, "the first step")
        nodes = c.get(f"/v1/runs/{run['id']}").json()["job"]["nodes"]
        assert len(nodes) == 2
        t_kill = time.monotonic()
        os.killpg(nodes[1]["pgid"], signal.SIGKILL)
        # the new attempt's job is started once the old one is gone: lines after that are its
        wait_for(lambda: len(c.get(f"/v1/runs/{run['id']}").json()["attempts"]) == 2
                 and c.get(f"/v1/runs/{run['id']}").json()["job"], 300, "the new attempt")
        seen = len(progress_lines(out))
        wait_for(lambda: len(progress_lines(out)) > seen, 300, "the next trained step")
        recovery_s = time.monotonic() - t_kill
        done = wait_done(c, run["id"], 300)
    assert done["status"] == "succeeded", (done["error"], done["log_tail"])
    first, second = done["attempts"]
    assert first["lost_nodes"] == [1] and first["status"] == "failed"
    assert second["num_nodes"] == 1 and second["status"] == "succeeded"
    resumed_from = second["start_step"] - 1
    if kill_after == "checkpoint":
        assert resumed_from >= SAVE_EVERY and resumed_from % SAVE_EVERY == 0
    else:
        assert resumed_from == 0
    assert done["metrics"]["steps"] == list(range(1, STEPS + 1))
    assert not any(group_alive(n["pgid"]) for n in nodes + done["job"]["nodes"])
    print(f"\nrecovery ({kill_after}): kill -> next trained step {recovery_s:.1f} s (test "
          f"clock), service's recovery_s {second['recovery_s']:.1f} s; resumed from step "
          f"{resumed_from} on {second['mapping']}")

    # `foldplan run` (--resume of the same checkpoint) on the new plan's candidate
    new_plan = _plan(settings, second["plan_id"])
    ref = tmp_path / "ref"
    (ref / "checkpoints").mkdir(parents=True)
    if resumed_from:
        (ref / "checkpoints" / checkpoint_dir(out, resumed_from).name).symlink_to(
            checkpoint_dir(out, resumed_from))
    expected = run_plan(new_plan, second["candidate"], STEPS, ref, echo=False,
                        resume=bool(resumed_from))
    assert expected["steps"] == list(range(resumed_from + 1, STEPS + 1))
    assert done["metrics"]["loss"][resumed_from:] == expected["loss"]  # bit-exact on CPU


def _plan(settings, plan_id: str) -> dict:
    from api.db import Database, get_plan

    db = Database(settings.db)
    with db.session() as s:
        answer = get_plan(s, plan_id).answer
    db.dispose()
    return answer
