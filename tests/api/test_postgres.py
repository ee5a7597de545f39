"""The service on a real PostgreSQL server that this test starts (initdb + pg_ctl, free port).

Needs the PostgreSQL server binaries (Debian: `postgresql`; see install_system_deps.sh). As
root, the server runs as the `postgres` user via runuser, since PostgreSQL refuses root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import (MIXTRAL_REQUEST, TINY, fake_backend, fake_plan_answer, free_port, planner_ready,
                      store_plan)
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def pg_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are missing: "
                    "run tests/api/install_system_deps.sh")
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="foldplan-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    root.chmod(0o755)
    data, port = root / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"),
                    "-w", "-t", "60", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_service_on_postgres(pg_url, tmp_path):
    plan = fake_plan_answer()
    store_plan(pg_url, plan)  # runs the Alembic migrations on an empty server
    tiny = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    store_plan(pg_url, tiny)
    settings = Settings(db=pg_url, run_dir=tmp_path / "runs", run_poll_s=0.05)
    backends = {"local": fake_backend("ok")}

    with TestClient(create_app(settings, backends=backends), client=("127.0.0.1", 1)) as c:
        assert c.get("/healthz").json()["db"] == "postgresql"
        assert c.get(f"/v1/plans/{plan['id']}").json() == plan
        assert c.get("/v1/plans").json()["total"] == 2
        run = c.post(f"/v1/plans/{tiny['id']}/runs", json={"steps": 3})
        assert run.status_code == 202
        deadline = time.monotonic() + 10
        while (got := c.get(f"/v1/runs/{run.json()['id']}").json())["status"] != "succeeded":
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
        assert got["metrics"]["loss"] == pytest.approx([5.5, 5.4, 5.3])
        assert got["job"]["pid"] > 0
        if planner_ready():
            created = c.post("/v1/plans", json={**MIXTRAL_REQUEST, "top_k": 1})
            assert created.status_code == 201
            assert c.get(f"/v1/plans/{created.json()['id']}").json() == created.json()
    # A second app over the same database: migrations are a no-op, data is still there.
    with TestClient(create_app(settings, backends=backends)) as c2:
        assert c2.get(f"/v1/plans/{plan['id']}").json() == plan
