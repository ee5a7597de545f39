"""The service's run inputs (`init_hf`, `data` of POST /v1/plans/{id}/runs): names inside
FOLDPLAN_MODELS_DIR / FOLDPLAN_DATA_DIR only, the checkpoint checked against the plan, and the
resolved paths that reach the ranks' command line."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from _hf_models import save_model

from api.backends import RunJob
from api.run_inputs import RunInputs, resolve_run_inputs
from api.service import RequestError
from api.settings import Settings
from executor.data import write_indexed_dataset
from executor.hf_checkpoint import HFCheckpoint


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    models, data = root / "models", root / "data"
    save_model("qwen3_moe", models / "org" / "tiny-qwen3")
    save_model("mixtral", models / "mixtral")
    (data / "web").mkdir(parents=True)
    write_indexed_dataset(data / "web" / "part0", [np.arange(50), np.arange(30)])
    (root / "outside").mkdir()
    (models / "escape").symlink_to(root / "outside")
    spec = HFCheckpoint(models / "org" / "tiny-qwen3").model_spec()
    plan = {"model": spec.model_dump(), "cluster": {"num_nodes": 1, "gpus_per_node": 1, "gpu": "cpu"},
            "training": {"seq_length": 16, "global_batch_size": 2, "precision": "fp32"},
            "candidates": [{"mapping": {}}]}
    return Settings(models_dir=models, data_dir=data), plan


@pytest.mark.parametrize("field,name,message", [
    ("init_hf", "/etc", "must be a relative name inside FOLDPLAN_MODELS_DIR"),
    ("init_hf", "org/../../x", "no '..'"),
    ("init_hf", "escape", "resolves outside FOLDPLAN_MODELS_DIR"),
    ("init_hf", "org", "no Hugging Face model there"),
    ("init_hf", "mixtral", "does not describe the plan's model"),
    ("data", "../data/web/part0", "no '..'"),
    ("data", "web/part9", "no .bin and .idx file"),
])
def test_bad_names_are_refused_at_their_field(server, field, name, message):
    settings, plan = server
    with pytest.raises(RequestError) as info:
        resolve_run_inputs(settings, plan, 0, **{"init_hf": None, "data": None, field: name})
    assert info.value.loc == (field,) and message in info.value.msg


def test_unset_folders_refuse_the_fields(server):
    _, plan = server
    with pytest.raises(RequestError, match="no FOLDPLAN_DATA_DIR set"):
        resolve_run_inputs(Settings(), plan, 0, None, "web/part0")


def test_good_names_reach_the_rank_command_line(server, tmp_path):
    settings, plan = server
    inputs = resolve_run_inputs(settings, plan, 0, "org/tiny-qwen3", "web/part0")
    opts = inputs.options()
    assert opts["init_hf"] == "org/tiny-qwen3" and opts["data"] == "web/part0"
    init_hf, data = RunInputs.of_options(opts)
    assert init_hf == str(settings.models_dir.resolve() / "org" / "tiny-qwen3")
    job = RunJob.from_plan("r1", plan, 0, 2, tmp_path).model_copy(update=dict(init_hf=init_hf, data=data))
    argv = job.rank_argv()
    assert argv[argv.index("--init-hf") + 1] == init_hf
    assert argv[argv.index("--data") + 1] == str(settings.data_dir.resolve() / "web" / "part0")


def test_run_endpoint_answers_422_at_the_field_and_starts_with_the_paths(server, tmp_path):
    """Through the HTTP API: bad names are 422 located at body.init_hf / body.data; a good run
    is accepted, answers its names, and its job's rank command line carries the paths."""
    import sys

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.backends.local import LocalBackend
    from api.db import Database, insert_plan
    from api.schemas import PlanAnswer
    from api.service import cost_model_constants, foldplan_version, now_iso
    from cost_model.estimate import estimate
    from cost_model.specs import ClusterSpec, Mapping, ModelSpec, TrainingSpec
    from planner.result import Candidate, SearchInfo

    settings, plan = server
    settings = settings.model_copy(update=dict(db=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                               run_dir=tmp_path / "runs", run_poll_s=0.05))
    model, cluster = ModelSpec(**plan["model"]), ClusterSpec(**plan["cluster"])
    training, mapping = TrainingSpec(**plan["training"]), Mapping(dp=1, edp=1)
    answer = PlanAnswer(id="p1", foldplan_version=foldplan_version(), created_at=now_iso(),
                        model=model, cluster=cluster, training=training, top_k=1,
                        candidates=[Candidate(mapping=mapping, estimate=estimate(model, cluster, training, mapping),
                                              megatron_args=[], folded=False)],
                        search=SearchInfo(status="FEASIBLE", wall_time_s=0.01)).model_dump(mode="json")
    db = Database(settings.db)
    db.init()
    with db.session() as s:
        insert_plan(s, answer, {"test": True}, cost_model_constants())
    db.dispose()
    started = []

    def command(job):
        started.append(job.rank_argv())
        return [sys.executable, "-c", "pass"]

    app = create_app(settings, backends={"local": LocalBackend(command=command)})
    with TestClient(app, client=("127.0.0.1", 50000)) as c:
        for body, loc in [({"init_hf": "/etc"}, "init_hf"), ({"init_hf": "mixtral"}, "init_hf"),
                          ({"data": "web/../../x"}, "data")]:
            r = c.post("/v1/plans/p1/runs", json={"steps": 1, **body})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", loc], r.text
        r = c.post("/v1/plans/p1/runs", json={"steps": 1, "init_hf": "org/tiny-qwen3", "data": "web/part0"})
        assert r.status_code == 202, r.text
        assert (r.json()["init_hf"], r.json()["data"]) == ("org/tiny-qwen3", "web/part0")
        for _ in range(200):
            if started:
                break
            __import__("time").sleep(0.05)
    argv = started[0]
    assert argv[argv.index("--init-hf") + 1] == str(settings.models_dir.resolve() / "org" / "tiny-qwen3")
    assert argv[argv.index("--data") + 1] == str(settings.data_dir.resolve() / "web" / "part0")
