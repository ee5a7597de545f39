"""`foldplan` as a user runs it: subprocesses, JSON in, JSON out, one-line errors."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import (
    MIXTRAL_MAPPINGS,
    MIXTRAL_REQUEST,
    REPO,
    VENV_BIN,
    fake_plan_answer,
    needs_planner,
)

FOLDPLAN = [str(VENV_BIN / "python"), "-m", "api.cli"]
TINY = {"model": {"preset": "tiny-moe"},
        "cluster": {"num_nodes": 1, "gpus_per_node": 2, "gpu": "cpu"},
        "training": {"seq_length": 64, "global_batch_size": 4}}


def foldplan(*args: str, stdin: str | None = None, timeout: float = 120):
    return subprocess.run([*FOLDPLAN, *args], input=stdin, capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_console_script_is_installed():
    assert (VENV_BIN / "foldplan").exists(), "run `.venv/bin/pip install -e . --no-deps`"
    r = subprocess.run([str(VENV_BIN / "foldplan"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "estimate" in r.stdout


def test_estimate_from_stdin_and_file_match_http(tmp_path, client):
    body = {**MIXTRAL_REQUEST, "mapping": MIXTRAL_MAPPINGS[0]}
    r = foldplan("estimate", stdin=json.dumps(body))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == client.post("/v1/estimate", json=body).json()
    f = tmp_path / "req.json"
    f.write_text(json.dumps({**MIXTRAL_REQUEST, "mappings": [MIXTRAL_MAPPINGS[0], {"ep": 3}]}))
    r = foldplan("estimate", "--json", str(f))
    batch = json.loads(r.stdout)
    assert batch[0]["step_time_s"] == out["step_time_s"] and "ep=3" in batch[1]["error"]


def test_estimate_table(tmp_path):
    r = foldplan("estimate", "--format", "table",
                 stdin=json.dumps({**MIXTRAL_REQUEST, "mapping": MIXTRAL_MAPPINGS[0]}))
    assert r.returncode == 0 and "step_time_s" in r.stdout and "ep_comm" in r.stdout


@pytest.mark.parametrize(("stdin", "needle"), [
    ("{not json", "not valid JSON"),
    (json.dumps({**MIXTRAL_REQUEST, "mapping": {"tp": 0}}), "mapping.tp"),
    (json.dumps({**MIXTRAL_REQUEST, "cluster": {"num_nodes": 10**9, "gpus_per_node": 8},
                 "mapping": {}}), "cluster.num_nodes"),
    (json.dumps({**MIXTRAL_REQUEST, "model": {"preset": "nope"}, "mapping": {}}), "model.preset"),
    (json.dumps({**MIXTRAL_REQUEST, "mapping": {"ep": 3}}), "ep=3 does not divide"),
])
def test_estimate_bad_input_one_line_no_traceback(stdin, needle):
    r = foldplan("estimate", stdin=stdin)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


def test_missing_input_file():
    r = foldplan("layout", "--json", "/nonexistent/req.json")
    assert r.returncode == 2 and "/nonexistent/req.json" in r.stderr and "Traceback" not in r.stderr


def test_layout_and_presets():
    r = foldplan("layout", stdin=json.dumps({"world_size": 16, "gpus_per_node": 8,
                                              "mapping": {"tp": 2, "pp": 2, "ep": 4}}))
    assert r.returncode == 0
    assert json.loads(r.stdout)["groups"]["ep"][0] == [0, 1, 2, 3]
    r = foldplan("layout", "--format", "table", stdin=json.dumps(
        {"world_size": 16, "gpus_per_node": 8, "mapping": {"tp": 2, "pp": 2}}))
    assert r.returncode == 0 and "crosses node" in r.stdout
    r = foldplan("presets")
    assert json.loads(r.stdout)["models"]["qwen2-57b-a14b"]["spec"]["num_experts"] == 64
    assert "mixtral-8x22b" in foldplan("presets", "--format", "table").stdout


@needs_planner
def test_plan_cli_matches_contract():
    r = foldplan("plan", stdin=json.dumps({**MIXTRAL_REQUEST, "top_k": 2, "time_limit_s": 60}))
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["model"]["num_layers"] == 56 and 1 <= len(p["candidates"]) <= 2
    assert p["search"]["status"] in ("OPTIMAL", "FEASIBLE")
    r = foldplan("plan", "--format", "table", stdin=json.dumps({**MIXTRAL_REQUEST, "top_k": 2}))
    assert r.returncode == 0 and "MFU" in r.stdout


def test_run_bad_arguments(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(fake_plan_answer()))
    r = foldplan("run", "--plan", str(plan), "--candidate", "9", "--steps", "1", "--out",
                 str(tmp_path / "o"))
    assert r.returncode == 2 and "--candidate 9" in r.stderr and "Traceback" not in r.stderr
    r = foldplan("run", "--plan", str(plan), "--steps", "0", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--steps" in r.stderr
    r = foldplan("run", "--plan", str(tmp_path / "missing.json"), "--steps", "1", "--out", "o")
    assert r.returncode == 2 and "missing.json" in r.stderr
    # the default plan is 128 GPUs: refused before any rank starts, with the reason
    r = foldplan("run", "--plan", str(plan), "--steps", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "128 ranks" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "train.log").exists()


@pytest.mark.slow
def test_run_tiny_plan_writes_metrics(tmp_path):
    """Real training through executor.launch.run_plan: 2 CPU ranks, 3 steps of tiny-moe."""
    pytest.importorskip("torch")
    pytest.importorskip("executor.launch")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)))
    out = tmp_path / "out"
    r = foldplan("run", "--plan", str(plan), "--candidate", "0", "--steps", "3", "--out",
                 str(out), "--seed", "1", "--save-every", "1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(r.stdout) == metrics
    assert len(metrics["loss"]) == 3 and metrics["step_time_s"] > 0 and metrics["tokens_per_s"] > 0
    # --resume continues from the last checkpoint up to --steps in total.
    r = foldplan("run", "--plan", str(plan), "--steps", "4", "--out", str(out), "--seed", "1",
                 "--resume", "--cuda-graphs", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # --cuda-graphs is accepted; without graph capture the run says so and goes on.
    assert "--cuda-graphs: CUDA graphs are not implemented" in r.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == [4] and len(resumed["loss"]) == 1


def test_profile_is_wired_to_the_executor():
    pytest.importorskip("executor.profile")
    r = foldplan("profile", "--help")
    assert r.returncode == 0 and "--out" in r.stdout and "foldplan profile" in r.stdout


def test_cluster_profile_changes_the_estimate():
    profile = {"foldplan_profile_version": 1, "gemm_tflops": {"fp32": 0.011},
               "hbm_GBps": 1.6, "kernel_overhead_us": 10.3, "intra_node_GBps": 0.78,
               "intra_node_latency_us": 150.0, "inter_node_GBps": 0.78,
               "inter_node_latency_us": 150.0}
    body = {**TINY, "training": {**TINY["training"], "precision": "fp32"},
            "mapping": {"ep": 2}}
    plain = json.loads(foldplan("estimate", stdin=json.dumps(body)).stdout)
    with_profile = {**body, "cluster": {**TINY["cluster"], "profile": profile}}
    r = foldplan("estimate", stdin=json.dumps(with_profile))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["step_time_s"] != plain["step_time_s"]
