"""Fixtures for the API tests: a throw-away SQLite app, a stored plan that does not need the
planner (candidates built from real cost-model estimates), subprocess helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.db import Database, insert_plan
from api.schemas import PlanAnswer
from api.service import cost_model_constants, foldplan_version, now_iso
from api.settings import Settings
from cost_model.estimate import estimate
from cost_model.presets import preset_model
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec
from planner.result import Candidate, SearchInfo

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MIXTRAL_REQUEST = {
    "model": {"preset": "mixtral-8x22b"},
    "cluster": {"num_nodes": 16, "gpus_per_node": 8, "gpu": "h100"},
    "training": {"seq_length": 4096, "global_batch_size": 256},
}
TINY = {"model": {"preset": "tiny-moe"},
        "cluster": {"num_nodes": 1, "gpus_per_node": 2, "gpu": "cpu"},
        "training": {"seq_length": 64, "global_batch_size": 4, "precision": "fp32"}}
FAKE_RANK = Path(__file__).parent / "fake_rank.py"
MIXTRAL_MAPPINGS = [
    {"tp": 2, "pp": 8, "ep": 8, "etp": 1},
    {"tp": 4, "pp": 4, "ep": 8, "etp": 1, "recompute": "selective"},
    {"tp": 2, "pp": 4, "ep": 8, "etp": 2, "recompute": "full"},
]


def planner_ready() -> bool:
    """True once planner.search.plan is implemented (it raised NotImplementedError before)."""
    from planner.search import plan

    try:
        plan(preset_model("tiny-moe"), ClusterSpec(num_nodes=1, gpus_per_node=2, gpu="cpu"),
             TrainingSpec(seq_length=64, global_batch_size=4), top_k=1, time_limit_s=5)
    except NotImplementedError:
        return False
    except Exception:  # noqa: BLE001 - implemented but unhappy with this input: still "landed"
        return True
    return True


needs_planner = pytest.mark.skipif(
    not planner_ready(), reason="planner.search.plan raises NotImplementedError (not landed yet)"
)


def fake_plan_answer(mappings: list[dict] = MIXTRAL_MAPPINGS, request: dict = MIXTRAL_REQUEST,
                     plan_id: str | None = None) -> dict:
    """A plan answer shaped exactly like the planner's, from real estimates."""
    model = preset_model(request["model"]["preset"])
    cluster = ClusterSpec(**request["cluster"])
    training = TrainingSpec(**request["training"])
    cands = []
    for m in mappings:
        est = estimate(model, cluster, training, Mapping(**m))
        full = Mapping(**m).model_copy(update={
            "dp": cluster.world_size // (m["tp"] * m["pp"]),
            "edp": cluster.world_size // (m["ep"] * m.get("etp", 1) * m["pp"]),
        })
        args = [f"--tensor-model-parallel-size {full.tp}",
                f"--pipeline-model-parallel-size {full.pp}",
                f"--expert-model-parallel-size {full.ep}",
                f"--expert-tensor-parallel-size {full.etp}",
                f"--context-parallel-size {full.cp}", f"--micro-batch-size {full.micro_batch_size}"]
        cands.append(Candidate(mapping=full, estimate=est, megatron_args=args,
                               folded=full.etp != full.tp))
    cands.sort(key=lambda c: c.estimate.step_time_s)
    answer = PlanAnswer(
        id=plan_id or uuid.uuid4().hex, foldplan_version=foldplan_version(), created_at=now_iso(),
        model=model, cluster=cluster, training=training, top_k=len(cands), candidates=cands,
        search=SearchInfo(status="FEASIBLE", wall_time_s=0.01),
    )
    return answer.model_dump(mode="json")


def fake_backend(mode: str = "ok"):
    """The local backend launching fake_rank.py (see there for `mode`) instead of torchrun."""
    from api.backends.local import LocalBackend

    def command(job):
        return [sys.executable, str(FAKE_RANK), str(job.out_dir), str(job.steps), mode,
                str(job.candidate)]
    return LocalBackend(command=command)


def store_plan(db_url: str, answer: dict) -> None:
    db = Database(db_url)
    db.init()
    with db.session() as s:
        insert_plan(s, answer, {"fake": True}, cost_model_constants())
    db.dispose()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'foldplan.db'}"


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(db=db_url, run_dir=tmp_path / "runs", api_token=None)


@pytest.fixture
def client(settings: Settings):
    """A loopback client (run endpoints are open to loopback when no token is set)."""
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as c:
        yield c


@pytest.fixture
def stored_plan(db_url: str) -> dict:
    answer = fake_plan_answer()
    store_plan(db_url, answer)
    return answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(db_url: str, port: int, tmp_path: Path,
                 env: dict | None = None) -> subprocess.Popen:
    """`foldplan serve` in a subprocess, waited for until /healthz answers."""
    log = open(tmp_path / f"serve-{port}.log", "ab")
    proc = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "api.cli", "serve", "--host", "127.0.0.1",
         "--port", str(port), "--db", db_url],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "FOLDPLAN_RUN_DIR": str(tmp_path / "runs"), **(env or {})},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / f"serve-{port}.log").read_text())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start: " + (tmp_path / f"serve-{port}.log").read_text())
