"""The slurm backend against a real one-node Slurm started by the test (tests/api/slurm_cluster.py),
plus the parts that need no Slurm: the batch script, missing tools, a failing squeue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, fake_plan_answer
from slurm_cluster import local_slurm
from test_cli import TINY

from api.backends import JobState, RunJob
from api.backends.slurm import SlurmBackend
from api.settings import Settings
from executor.run_files import read_metrics

ONE_NODE = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)  # 1 node x 2 CPU ranks

# Stands in for torchrun: argv[1] = out_dir, argv[2] = ok | fail | sleep.
FAKE_RANK = """\
import json, os, sys, time
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
(out / "pid").write_text(str(os.getpid()))
print("fake rank up:", "PYTHONPATH=" + os.environ.get("PYTHONPATH", ""),
      "GLOO_SOCKET_IFNAME=" + os.environ.get("GLOO_SOCKET_IFNAME", ""),
      "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), flush=True)
if mode == "fail":
    sys.exit(3)
if mode == "sleep":
    time.sleep(120)
from executor.run_files import ProgressLine, RunMetrics, append_progress, write_metrics
for step in (1, 2):
    append_progress(out, ProgressLine(step=step, loss=5.0 - step, time_s=0.1))
time.sleep(0.5)
plan = json.loads((out / "plan.json").read_text())
write_metrics(out, RunMetrics(
    loss=[4.0, 3.0], steps=[1, 2], step_times_s=[0.1, 0.1], step_time_s=0.1, tokens_per_s=2560.0,
    model_flops_per_step=0.0, tflops_per_gpu=0.0, mfu=0.0, aux_loss=[0.0, 0.0],
    grad_norm=[1.0, 1.0], num_dropped=[0, 0], expert_load_imbalance=[None, None], comm_bytes={},
    world_size=2, backend="gloo", device="cpu", precision="fp32",
    mapping=plan["candidates"][0]["mapping"]))
print("fake rank done", flush=True)
"""


@pytest.fixture(scope="module")
def slurm():
    """A running test Slurm; SLURM_CONF points the backend's sbatch/squeue at it."""
    with local_slurm() as env, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", env["SLURM_CONF"])
        yield env


def fake_backend(tmp_path: Path, mode: str, **settings) -> SlurmBackend:
    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    return SlurmBackend(
        Settings(run_dir=tmp_path, **settings),
        rank_command=lambda job: [sys.executable, str(script), str(job.out_dir), mode])


def new_run_dir(tmp_path: Path, plan: dict) -> Path:
    out = tmp_path / "run dir"  # a space: every path in the script must be quoted
    out.mkdir()
    (out / "plan.json").write_text(json.dumps(plan))
    return out


def job_of(run_id: str, plan: dict, out: Path, steps: int = 2) -> RunJob:
    return RunJob.from_plan(run_id, plan, 0, steps, out)


def wait_finished(backend: SlurmBackend, handle: dict, timeout: float) -> list[JobState]:
    """Every distinct state seen until "finished" (the last one)."""
    seen: list[JobState] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = backend.poll(handle)
        if not seen or seen[-1] != state:
            seen.append(state)
        if state.state == "finished":
            return seen
        time.sleep(0.2)
    raise AssertionError(f"slurm job {handle} not finished after {timeout} s: {seen}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


# --- no Slurm needed -----------------------------------------------------------------------


def test_job_script_options_and_quoting(tmp_path):
    settings = Settings(run_dir=tmp_path, slurm_partition="gpu", slurm_account="proj 1",
                        slurm_time_limit="01:00:00", slurm_python="/opt/py env/bin/python",
                        slurm_extra_args=["--gpus-per-node=8", "--qos=high"])
    out = tmp_path / "runs" / "a b%c"
    plan = {"cluster": {"num_nodes": 4, "gpus_per_node": 8, "gpu": "h100"},
            "candidates": [{}, {}, {"estimate": {"memory": {"peak_gib": 70.0}}}]}
    job = RunJob.from_plan("0123456789abcdef", plan, 2, 10, out)
    assert (job.num_nodes, job.gpus_per_node, job.world_size) == (4, 8, 32)
    assert job.peak_gib_per_rank == 70.0
    text = SlurmBackend(settings).job_script(job)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    sbatch = [ln.removeprefix("#SBATCH ") for ln in lines if ln.startswith("#SBATCH ")]
    assert sbatch == ["--job-name=foldplan-01234567", "--nodes=4", "--ntasks-per-node=1",
                      f"'--output={tmp_path}/runs/a b%%c/train.log'", "--open-mode=append",
                      f"'--chdir={out}'", "--partition=gpu", "'--account=proj 1'",
                      "--time=01:00:00", "--gpus-per-node=8", "--qos=high"]
    assert "GLOO_SOCKET_IFNAME" not in text  # four nodes: the ranks use the real network
    srun = lines[-1]
    assert srun.startswith("srun --kill-on-bad-exit=1 '/opt/py env/bin/python' -m "
                           "torch.distributed.run --nnodes=\"$SLURM_NNODES\" --nproc-per-node=8 "
                           "--rdzv-backend=c10d --rdzv-endpoint=\"$head:$port\"")
    assert f"--plan '{out}/plan.json' --candidate 2 --steps 10" in srun
    assert subprocess.run(["bash", "-n"], input=text, text=True, check=False).returncode == 0


def test_unavailable_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = SlurmBackend(Settings(run_dir=tmp_path)).unavailable(job_of("x", ONE_NODE, tmp_path))
    assert reason == "backend='slurm' is not configured on this server: sbatch not found on PATH"


def fake_tools(tmp_path: Path, monkeypatch, **scripts: str) -> None:
    """PATH = only these shell scripts (name -> body)."""
    for name, body in scripts.items():
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))


def test_poll_survives_a_failing_squeue(tmp_path, monkeypatch):
    fake_tools(tmp_path, monkeypatch, squeue="echo 'squeue: error: Unable to contact slurm "
               "controller (connect failure)' >&2; exit 1")
    state = SlurmBackend(Settings(run_dir=tmp_path)).poll({"job_id": "7"})
    assert state.state == "running" and "connect failure" in state.detail


def test_poll_job_unknown_everywhere(tmp_path, monkeypatch):
    invalid = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
    fake_tools(tmp_path, monkeypatch, squeue=invalid, scontrol=invalid,
               sacct="echo 'Slurm accounting storage is disabled' >&2; exit 1")
    state = SlurmBackend(Settings(run_dir=tmp_path)).poll({"job_id": "7"})
    assert state == JobState("finished",
                             "slurm job 7: no longer known to squeue, scontrol or sacct")


def test_poll_reads_sacct_when_scontrol_forgot(tmp_path, monkeypatch):
    invalid = "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
    fake_tools(tmp_path, monkeypatch, squeue=invalid, scontrol=invalid,
               sacct="echo 'TIMEOUT|0:0'")
    state = SlurmBackend(Settings(run_dir=tmp_path)).poll({"job_id": "7"})
    assert state == JobState("finished", "slurm job 7: TIMEOUT, exit code 0:0")


TOOLS_OK = {t: "exit 0" for t in ("sbatch", "squeue", "scontrol", "scancel")}


def test_unavailable_when_no_cluster_answers(tmp_path, monkeypatch):
    """Tools on PATH are not enough: sinfo must reach a controller."""
    fake_tools(tmp_path, monkeypatch, **TOOLS_OK, sinfo="echo 'sinfo: error: Unable to contact "
               "slurm controller (connect failure)' >&2; exit 1")
    reason = SlurmBackend(Settings(run_dir=tmp_path)).unavailable(job_of("x", ONE_NODE, tmp_path))
    assert reason == ("backend='slurm' is not configured on this server: no Slurm cluster "
                      "answers (sinfo exit 1: sinfo: error: Unable to contact slurm controller "
                      "(connect failure))")


def test_available_when_sinfo_lists_the_partition(tmp_path, monkeypatch):
    # sinfo prints "debug up" only for --partition=debug; it counts its calls in `calls`.
    fake_tools(tmp_path, monkeypatch, **TOOLS_OK, sinfo=f"echo x >> '{tmp_path}/calls'; "
               'case "$*" in *--partition=debug*) echo "debug up";; esac')
    job = job_of("x", ONE_NODE, tmp_path)
    backend = SlurmBackend(Settings(run_dir=tmp_path, slurm_partition="debug"))
    assert backend.unavailable(job) is None
    assert backend.unavailable(job) is None  # answered from the cache: sinfo ran once
    assert (tmp_path / "calls").read_text().count("x") == 1
    other = SlurmBackend(Settings(run_dir=tmp_path, slurm_partition="gpu"))
    assert other.unavailable(job) == ("backend='slurm' is not configured on this server: sinfo "
                                      "lists no partition named 'gpu' "
                                      "(FOLDPLAN_SLURM_PARTITION)")


# --- a real Slurm ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_job_succeeds(slurm, tmp_path):
    backend = fake_backend(tmp_path, "ok")
    out = new_run_dir(tmp_path, ONE_NODE)
    handle = backend.start(job_of("feedbeef0001", ONE_NODE, out))
    assert handle["job_id"].isdigit()
    first = backend.poll(handle)
    assert first.state in ("pending", "running"), first
    seen = wait_finished(backend, handle, 60)
    assert seen[-1] == JobState("finished", None), seen
    assert read_metrics(out).loss == [4.0, 3.0]
    assert len((out / "progress.jsonl").read_text().splitlines()) == 2
    log = (out / "train.log").read_text()
    assert "fake rank done" in log
    assert f"PYTHONPATH={REPO}" in log and "GLOO_SOCKET_IFNAME=lo" in log
    assert "OMP_NUM_THREADS=1" in log
    script = (out / "job.sbatch").read_text()
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=foldplan-feedbeef")


@pytest.mark.timeout(90)
def test_job_fails(slurm, tmp_path):
    backend = fake_backend(tmp_path, "fail")
    out = new_run_dir(tmp_path, ONE_NODE)
    handle = backend.start(job_of("feedbeef0002", ONE_NODE, out))
    final = wait_finished(backend, handle, 60)[-1]
    assert final == JobState("finished", f"slurm job {handle['job_id']}: FAILED, exit code 3:0")
    assert not (out / "metrics.json").exists()


@pytest.mark.timeout(90)
def test_cancel_stops_the_job(slurm, tmp_path):
    backend = fake_backend(tmp_path, "sleep")
    out = new_run_dir(tmp_path, ONE_NODE)
    handle = backend.start(job_of("feedbeef0003", ONE_NODE, out))
    deadline = time.monotonic() + 60
    while not (out / "pid").exists() or not (out / "pid").read_text():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    pid = int((out / "pid").read_text())
    assert alive(pid) and backend.poll(handle).state == "running"
    backend.cancel(handle)
    final = wait_finished(backend, handle, 20)[-1]
    assert final.detail is not None and "CANCELLED" in final.detail, final
    deadline = time.monotonic() + 10
    while alive(pid):
        assert time.monotonic() < deadline, f"rank process {pid} still alive after scancel"
        time.sleep(0.2)
    backend.cancel(handle)  # idempotent


def test_sbatch_refusal_is_an_error(slurm, tmp_path):
    backend = fake_backend(tmp_path, "ok", slurm_partition="nosuchpartition")
    out = new_run_dir(tmp_path, ONE_NODE)
    with pytest.raises(RuntimeError, match="(?i)sbatch failed.*invalid partition"):
        backend.start(job_of("feedbeef0004", ONE_NODE, out))


@pytest.mark.timeout(180)
def test_real_executor_two_cpu_ranks(slurm, tmp_path):
    """torchrun + executor.train through sbatch/srun: tiny-moe, 1 node x 2 CPU ranks, 2 steps."""
    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    out = new_run_dir(tmp_path, plan)
    backend = SlurmBackend(Settings(run_dir=tmp_path))
    handle = backend.start(job_of("feedbeef0005", plan, out))
    final = wait_finished(backend, handle, 150)[-1]
    log = (out / "train.log").read_text(errors="replace")
    assert final == JobState("finished", None), log[-3000:]
    metrics = read_metrics(out)  # what the real executor wrote reads back through the model
    assert len(metrics.loss) == 2 and metrics.world_size == 2
    assert "rendezvous localhost:" in log


@pytest.mark.timeout(90)
def test_service_runs_through_slurm(slurm, tmp_path, db_url):
    """POST a run with backend=slurm: queued -> running -> succeeded, the job id recorded;
    then a second one cancelled through DELETE ends CANCELLED in Slurm."""
    from conftest import store_plan
    from fastapi.testclient import TestClient

    from api.app import create_app

    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    store_plan(db_url, plan)
    settings = Settings(db=db_url, run_dir=tmp_path / "runs", run_poll_s=0.1)
    backends = {"slurm": fake_backend(tmp_path, "ok")}
    with TestClient(create_app(settings, backends=backends), client=("127.0.0.1", 1)) as c:
        url = f"/v1/plans/{plan['id']}/runs"
        run = c.post(url, json={"steps": 2, "backend": "slurm"}).json()
        assert run["status"] == "queued" and run["backend"] == "slurm"
        deadline = time.monotonic() + 60
        while (got := c.get(f"/v1/runs/{run['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, got
            time.sleep(0.2)
        assert got["status"] == "succeeded", got
        assert got["job"]["job_id"].isdigit() and got["metrics"]["loss"] == [4.0, 3.0]
        assert "fake rank done" in got["log_tail"]
        (tmp_path / "second").mkdir()
        sleeper = fake_backend(tmp_path / "second", "sleep")
        c.app.state.runner.backends["slurm"] = sleeper  # the next job sleeps until cancelled
        second = c.post(url, json={"steps": 2, "backend": "slurm"}).json()
        deadline = time.monotonic() + 60
        while not (job := c.get(f"/v1/runs/{second['id']}").json()["job"]):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert c.delete(f"/v1/runs/{second['id']}").json()["status"] == "cancelled"
        final = wait_finished(sleeper, job, 30)[-1]
        assert final.detail.startswith(f"slurm job {job['job_id']}: CANCELLED"), final
