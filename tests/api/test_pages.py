"""Page view data and page routes without a browser: candidate rows, headroom, launch scripts,
run page data and downloads, HTML 404 pages, the favicon, the layout at 16,384 GPUs."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import numpy as np
import pytest
from conftest import TINY, fake_plan_answer, store_plan

from api.db import Database, RunRow, utcnow
from api.layout_view import cell_sets, layout_grid
from api.pages_view import (
    HEADROOM_WARN_FRACTION,
    headroom,
    mapping_rows,
    prediction_caveat,
)
from api.run_view import PER_STEP_COLUMNS, mapping_marks, metrics_csv, per_step
from api.schemas import PlanAnswer
from cost_model.estimate import MemoryEstimate
from cost_model.specs import ClusterSpec, Mapping
from planner.export import arg_lines, sbatch_script, torchrun_script


def test_rows_show_every_field_that_differs():
    a = Mapping(tp=2, pp=4, decoder_first_pipeline_num_layers=13, recompute="full",
                recompute_num_layers=2)
    b = Mapping(tp=2, pp=4, recompute="full")
    rows = {r["field"]: r for r in mapping_rows([a, b])}
    # fields that are hidden by default show up once they differ, and are marked
    assert rows["decoder_first_pipeline_num_layers"]["values"] == ["13", "—"]
    assert rows["recompute_num_layers"]["differs"] and rows["recompute_num_layers"]["values"] == [
        "2", "—"]
    assert not rows["tp"]["differs"] and not rows["recompute"]["differs"]
    assert "dispatcher" not in rows  # equal and default: left out
    c = Mapping(tp=2, pp=4, vpp=2, dispatcher="allgather")
    rows = {r["field"]: r for r in mapping_rows([c, c])}
    assert rows["dispatcher"]["values"] == ["allgather", "allgather"]  # not the default: shown
    assert rows["vpp"]["values"] == ["2", "2"]


def test_headroom_warning_band():
    def mem(peak, cap=80.0):
        return MemoryEstimate(peak_gib=peak, weights_gib=0, gradients_gib=0, optimizer_gib=0,
                              activations_gib=0, buffers_gib=0, capacity_gib=cap, worst_stage=0,
                              per_stage_gib=[peak])
    assert headroom(mem(78.4))["warn"]  # 98% of the GPU: the solid green bar
    edge = 80.0 * (1 - HEADROOM_WARN_FRACTION)
    assert not headroom(mem(edge))["warn"] and headroom(mem(edge + 0.01))["warn"]
    assert headroom(mem(60.0)) == {"gib": 20.0, "fraction": 0.25, "warn": False,
                                   "percent": "25.0%"}
    assert headroom(mem(72.03))["percent"] == "9.9%"  # flagged: never shown as "10%"


def test_launch_scripts_pass_arguments_on_and_have_placeholders(tmp_path):
    args = ["--tensor-model-parallel-size", "2", "--recompute-modules", "core_attn", "moe_act",
            "--bf16", "--moe-layer-freq", "([0]*3+[1]*58)"]
    assert arg_lines(args) == ["--tensor-model-parallel-size 2",
                               "--recompute-modules core_attn moe_act", "--bf16",
                               "--moe-layer-freq '([0]*3+[1]*58)'"]
    for script in (torchrun_script(args, 2, 8), sbatch_script(args, 2, 8)):
        assert script.rstrip().endswith('"$@"')
        for name in ("DATA_PATH", "TOKENIZER_MODEL", "CHECKPOINT_DIR"):
            assert f"${{{name}:-}}" in script
        assert "    --tensor-model-parallel-size 2 \\\n" in script  # flag and value on one line
        path = tmp_path / "s.sh"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    # what the script hands Megatron-LM: its own arguments first, then the caller's
    fake = tmp_path / "megatron"
    fake.mkdir()
    (fake / "pretrain_gpt.py").write_text("")
    stub = tmp_path / "torchrun"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    path.write_text(torchrun_script(args, 2, 8))
    out = subprocess.run(
        ["bash", str(path), "--lr", "3e-4"], check=False, capture_output=True, text=True,
        env={"PATH": f"{tmp_path}:/usr/bin:/bin", "MEGATRON_LM": str(fake),
             "MASTER_ADDR": "h0", "NODE_RANK": "0", "DATA_PATH": "/d/x_text_document"})
    words = out.stdout.split("\n")
    assert out.returncode == 0, out.stderr
    assert words[words.index("--data-path") + 1] == "/d/x_text_document"
    assert "--mock-data" not in words and words[-3:-1] == ["--lr", "3e-4"]


def test_cpu_prediction_caveat_names_the_shared_cores(monkeypatch):
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=4, gpu="cpu")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    note = prediction_caveat(cluster, {"machine": "the plan's cluster: 1 x 4 cpu"})
    assert "4 ranks" in note and "2 cores" in note and "2.0x" in note
    assert prediction_caveat(cluster, {"machine": "this server's run machines, profiled in "
                                       "p.json"}) is None
    assert prediction_caveat(cluster, {"machine": "x"}, backend="slurm") is None
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert prediction_caveat(cluster, {"machine": "the plan's cluster"}) is None


def test_per_step_columns_and_csv():
    metrics = {"loss": [3.0, 2.0], "steps": [5, 6], "step_times_s": [2.0, 1.0],
               "step_time_s": 1.5, "aux_loss": [0.1, 0.2], "mfu": 0.3}
    predicted = {"model_flops_per_step": 8e15, "num_gpus": 8, "peak_flops_per_gpu": 1e15}
    cols = per_step(metrics, 4096, predicted)
    assert tuple(cols) == PER_STEP_COLUMNS
    assert cols["step"] == [5, 6] and cols["tokens_per_s"] == [2048, 4096]
    assert cols["mfu"] == [0.5, 1.0]  # 8e15 / (t * 8 * 1e15)
    assert cols["grad_norm"] == [None, None]  # not recorded: null, not dropped
    assert per_step(metrics, 4096, {})["mfu"] == [0.3 * 1.5 / 2.0, 0.3 * 1.5]
    lines = metrics_csv(cols).splitlines()
    assert lines[0] == ",".join(PER_STEP_COLUMNS)
    assert lines[1] == "5,3.0,0.1,,2.0,2048.0,0.5,,"


def test_marks_where_the_mapping_changed():
    a = {"candidate": 0, "mapping": {"tp": 2}, "num_nodes": 4, "start_step": 1}
    same = {**a, "start_step": 9}  # a retry on the same mapping: no mark
    b = {"candidate": 1, "mapping": {"tp": 4}, "num_nodes": 3, "start_step": 20}
    assert mapping_marks([a, same, b]) == [{"step": 20, "label": "candidate 1, 3 nodes"}]
    assert mapping_marks(None) == []


def test_cell_sets_are_the_nodes_groups_tie_together():
    assert cell_sets(np.array([[0, 8], [1, 9], [16, 24]]), 8, 4).tolist() == [0, 0, 2, 2]
    assert cell_sets(np.array([[0, 8], [8, 16], [24, 25]]), 8, 4).tolist() == [0, 0, 0, 3]


def test_layout_at_16384_gpus_is_drawn_per_node():
    request = {"model": {"preset": "mixtral-8x22b"},
               "cluster": {"num_nodes": 2048, "gpus_per_node": 8, "gpu": "h100"},
               "training": {"seq_length": 4096, "global_batch_size": 4096}}
    plan = PlanAnswer.model_validate(fake_plan_answer([{"tp": 2, "pp": 8, "ep": 8}], request))
    view = layout_grid(plan, 0, node=2047)
    assert view["mode"] == "nodes" and view["num_cells"] == 2048
    assert view["sets"]["tp"]["cells_per_set"] == 1  # tp inside each node
    assert view["sets"]["pp"] == {**view["sets"]["pp"], "num_sets": 256, "cells_per_set": 8}
    assert len(view["sets"]["dp"]["set"]) == 2048
    assert [r["rank"] for r in view["zoom"]["rows"]] == list(range(16376, 16384))
    small = layout_grid(PlanAnswer.model_validate(fake_plan_answer()), 0)
    assert small["mode"] == "gpus" and len(small["cells"]["tp"]) == 128


@pytest.fixture
def run_id(db_url, stored_plan) -> str:
    rid = uuid.uuid4().hex
    db = Database(db_url)
    with db.session() as s:
        s.add(RunRow(id=rid, plan_id=stored_plan["id"], candidate=0, steps=2, backend="local",
                     status="succeeded", created_at=utcnow(),
                     predicted=stored_plan["candidates"][0]["estimate"],
                     metrics={"loss": [2.0, 1.0], "steps": [1, 2], "step_times_s": [1.0, 0.5],
                              "step_time_s": 0.5}))
    db.dispose()
    return rid


def test_run_page_downloads_and_html_404s(client, stored_plan, run_id):
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200 and run_id in page.text
    csv = client.get(f"/runs/{run_id}/metrics.csv")
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.headers["content-disposition"] == (
        f'attachment; filename="run-{run_id}-metrics.csv"')
    assert csv.text.splitlines()[2].startswith("2,1.0,,,0.5,")
    js = client.get(f"/runs/{run_id}/metrics.json").json()
    assert js["metrics"]["loss"] == [2.0, 1.0] and js["per_step"]["step"] == [1, 2]
    for url in ("/plans/nope", "/runs/nope"):
        r = client.get(url)
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
        assert "<h1" in r.text and "nope" in r.text
    assert client.get("/runs/nope/metrics.csv").status_code == 404
    assert client.get("/v1/plans/nope").headers["content-type"] == "application/json"
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"


def test_plan_page_offers_only_backends_that_can_run_it(client, db_url):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU host: the local backend's limits are its GPUs, not CPU ranks")
    tiny = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    store_plan(db_url, tiny)
    html = client.get(f"/plans/{tiny['id']}").text
    assert '<option value="local" selected>local</option>' in html  # 2 CPU ranks fit here
    big = fake_plan_answer()  # 128 ranks: over the local backend's CPU limit
    store_plan(db_url, big)
    html = client.get(f"/plans/{big['id']}").text
    assert '<option value="local" disabled' in html
    assert "backend=&#39;local&#39;" in html  # the backend's own reason, beside the form
