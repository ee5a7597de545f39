"""The run files both sides share (executor/run_files.py): what the executor writes reads back
unchanged, malformed files and lines are refused naming the problem, one rank command line, and
the service's views of them (partial metrics, measured MFU, page key tuples)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import TINY, fake_plan_answer
from pydantic import ValidationError

from executor.run_files import (
    METRICS_FILE,
    PROGRESS_FILE,
    ProgressLine,
    RunFileError,
    RunMetrics,
    append_progress,
    median_step_time,
    parse_progress_line,
    rank_argv,
    read_metrics,
    write_metrics,
)

MAPPING = {"tp": 1, "cp": 1, "pp": 1, "vpp": 1, "ep": 2, "etp": 1, "dp": 2, "edp": 1}


def executor_metrics(**changes) -> RunMetrics:
    """Metrics shaped as executor/train.py writes them for 3 steps on 2 CPU ranks."""
    fields = dict(
        loss=[5.61, 5.42, float("nan")], steps=[1, 2, 3], step_times_s=[2.5, 0.41, 0.39],
        step_time_s=0.4, tokens_per_s=640.0, model_flops_per_step=1.2e9, tflops_per_gpu=0.0015,
        mfu=0.012, aux_loss=[0.011, 0.010, 0.010], grad_norm=[3.2, 2.9, 2.7],
        num_dropped=[0, 0, 0], expert_load_imbalance=[1.9, 1.7, None],
        comm_bytes={"ep.all_to_all": 65536.0, "dp_cp.reduce_scatter": 1.5e6}, world_size=2,
        backend="gloo", device="cpu", precision="fp32", peak_memory_gib=None, mapping=MAPPING)
    return RunMetrics(**{**fields, **changes})


def test_metrics_round_trip_what_the_executor_writes(tmp_path):
    written = executor_metrics()
    path = write_metrics(tmp_path, written)
    assert path == tmp_path / METRICS_FILE and not (tmp_path / (METRICS_FILE + ".tmp")).exists()
    back = read_metrics(tmp_path)
    assert math.isnan(back.loss[2])  # a diverged step stays NaN (JSON's NaN token)
    assert back.model_dump(exclude={"loss"}) == written.model_dump(exclude={"loss"})
    assert back.loss[:2] == written.loss[:2] and back.mapping == MAPPING
    # the file is plain JSON for other readers too, and the contract names are in it
    raw = json.loads(path.read_text())
    assert {"loss", "steps", "step_time_s", "tokens_per_s", "aux_loss"} <= set(raw)
    assert raw["mapping"]["dp"] == 2 and raw["expert_load_imbalance"][2] is None


def test_metrics_are_frozen():
    m = executor_metrics()
    with pytest.raises(ValidationError, match="frozen"):
        m.step_time_s = 1.0


@pytest.mark.parametrize("change,why", [
    (lambda d: d.pop("step_time_s"), "step_time_s: Field required"),
    (lambda d: d.update(loss="5.5"), "loss: Input should be a valid list"),
    (lambda d: d.update(steps=[1, 2]), "steps has 2 entries but loss has 3"),
    (lambda d: d.update(backend="mpi"), "backend: Input should be 'gloo' or 'nccl'"),
    (lambda d: d.update(step_time_s=0), "step_time_s: Input should be greater than 0"),
    (lambda d: d.update(lossses=[1.0]), "lossses: Extra inputs are not permitted"),
    (lambda d: d.update(mapping=None), "mapping: Input should be a valid dictionary"),
])
def test_malformed_metrics_file_is_refused_naming_the_field(tmp_path, change, why):
    data = executor_metrics(loss=[5.6, 5.4, 5.3]).model_dump(mode="json")
    change(data)
    (tmp_path / METRICS_FILE).write_text(json.dumps(data))
    with pytest.raises(RunFileError, match="not the metrics the executor writes") as err:
        read_metrics(tmp_path)
    assert why in str(err.value) and str(tmp_path / METRICS_FILE) in str(err.value)


def test_unreadable_metrics_file_says_why(tmp_path):
    with pytest.raises(RunFileError, match="cannot be read"):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"loss": [5.5')
    with pytest.raises(RunFileError, match=r"metrics\.json: not JSON"):
        read_metrics(tmp_path)


def test_progress_lines_round_trip(tmp_path):
    lines = [ProgressLine(step=1, loss=5.5, time_s=2.0, expert_load_imbalance=1.8),
             ProgressLine(step=2, loss=float("inf"), time_s=0.5)]
    for line in lines:
        append_progress(tmp_path, line)
    text = (tmp_path / PROGRESS_FILE).read_text().splitlines()
    assert len(text) == 2
    back = [parse_progress_line(t) for t in text]
    assert back[0] == lines[0] and back[1].loss == math.inf
    assert back[1].expert_load_imbalance is None


@pytest.mark.parametrize("line,why", [
    ('{"step": 1, "loss": 5.0', "not JSON"),
    ('{"step": 1, "time_s": 0.5}', "loss: Field required"),
    ('{"step": 0, "loss": 5.0, "time_s": 0.5}', "step: Input should be greater than or equal to 1"),
    ('{"step": 1, "loss": "high", "time_s": 0.5}', "loss: Input should be a valid number"),
    ('[1, 5.0, 0.5]', "Input should be a valid dictionary"),
])
def test_malformed_progress_line_is_refused_with_the_reason(line, why):
    with pytest.raises(RunFileError, match=r"progress\.jsonl line") as err:
        parse_progress_line(line)
    assert why in str(err.value)


def test_median_step_time_skips_the_warm_up_step():
    assert median_step_time([3.0, 0.5, 0.7, 0.6]) == 0.6
    assert median_step_time([3.0]) == 3.0
    with pytest.raises(ValueError, match="no step times"):
        median_step_time([])


def test_rank_command_line_is_what_the_rank_parses(tmp_path):
    pytest.importorskip("torch")
    from executor.train import parse_args

    argv = rank_argv(tmp_path, 2, 10, seed=7, data="/d/corpus", save_every=5, resume=True)
    assert argv[:2] == ["-m", "executor.train"]
    args = parse_args(argv[2:])
    assert (args.plan, args.candidate, args.steps, args.out) == (
        str(tmp_path / "plan.json"), 2, 10, str(tmp_path))
    assert (args.seed, args.data, args.save_every, args.resume) == (7, "/d/corpus", 5, True)
    plain = parse_args(rank_argv(tmp_path, 0, 1)[2:])
    assert (plain.data, plain.save_every, plain.resume) == (None, 0, False)


def test_foldplan_run_and_the_backends_start_ranks_alike(tmp_path, monkeypatch):
    """executor.launch.run_plan (foldplan run) and a backend's RunJob use one rank command."""
    pytest.importorskip("torch")
    import executor.launch as launch
    from api.backends import RunJob

    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    seen: list[list[str]] = []

    def no_start(cmd, **kwargs):
        seen.append(cmd)
        raise OSError("not starting ranks in this test")

    monkeypatch.setattr(launch.subprocess, "Popen", no_start)
    with pytest.raises(OSError, match="not starting"):
        launch.run_plan(plan, 0, 3, tmp_path, echo=False)
    job = RunJob.from_plan("r1", plan, 0, 3, tmp_path)
    assert job.world_size == 2 and seen[0][:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert seen[0][-len(job.rank_argv()):] == job.rank_argv()
    assert json.loads((tmp_path / "plan.json").read_text()) == plan


def test_partial_metrics_use_the_executor_step_time_rule():
    from api.run_progress import partial_metrics

    lines = [ProgressLine(step=i + 1, loss=5.0 - i, time_s=t)
             for i, t in enumerate([3.0, 0.5, 0.7, 0.6])]
    m = partial_metrics(lines)
    assert m["step_time_s"] == median_step_time([3.0, 0.5, 0.7, 0.6]) == 0.6
    assert m["steps"] == [1, 2, 3, 4] and m["partial"] is True


def test_measured_mfu_counts_the_prediction_flops_and_peak():
    from api.prediction import machine_prediction
    from api.run_progress import with_rates

    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    predicted = machine_prediction(plan, 0, None)
    assert predicted["num_gpus"] == 2 and predicted["peak_flops_per_gpu"] > 0
    m = with_rates({"step_time_s": 0.5}, 256.0, predicted)
    assert m["tokens_per_s"] == 512.0
    assert m["mfu"] == pytest.approx(predicted["mfu"] * predicted["step_time_s"] / 0.5, rel=1e-12)
    old = {k: v for k, v in predicted.items() if k not in ("num_gpus", "peak_flops_per_gpu")}
    assert with_rates({"step_time_s": 0.5, "mfu": 0.2}, 256.0, old)["mfu"] == 0.2  # kept


def test_page_keys_come_from_the_cost_model():
    from api.pages_view import BREAKDOWN_COLORS, layout_grid
    from api.schemas import PlanAnswer
    from cost_model.estimate import BREAKDOWN_KEYS
    from cost_model.layout import GROUP_KINDS

    assert set(BREAKDOWN_COLORS) == set(BREAKDOWN_KEYS)  # every component has a colour
    plan = PlanAnswer.model_validate(fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY))
    assert tuple(k["kind"] for k in layout_grid(plan, 0)["kinds"]) == GROUP_KINDS


def test_run_job_is_built_from_the_plan(tmp_path):
    from api.backends import RunJob

    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], TINY)
    job = RunJob.from_plan("abc", plan, 0, 5, tmp_path / "x" / ".." / "run")
    assert job.out_dir == (tmp_path / "run").resolve() and job.plan_file.name == "plan.json"
    assert (job.num_nodes, job.gpus_per_node, job.world_size, job.steps) == (1, 2, 2, 5)
    peak = plan["candidates"][0]["estimate"]["memory"]["peak_gib"]
    assert job.peak_gib_per_rank == peak > 0
    with pytest.raises(ValidationError, match="frozen"):
        job.steps = 6
    assert job.rank_argv() == rank_argv(job.out_dir, 0, 5)
    assert isinstance(job.out_dir, Path)
