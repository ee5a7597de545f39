"""The CLI for people: the plan table (candidates side by side, numbered as in the API, every
differing mapping field starred, headroom), exit code 3 for an infeasible plan, and the
summary `foldplan run` ends with."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import TINY, fake_plan_answer

from api.cli import EXIT_BAD_INPUT, EXIT_INFEASIBLE, main
from api.cli_tables import run_summary

TINY_PLAN = {**TINY, "cluster": {"num_nodes": 1, "gpus_per_node": 4, "gpu": "cpu"},
             "training": {**TINY["training"], "global_batch_size": 8}, "top_k": 4,
             "time_limit_s": 30}
TOO_BIG = {"model": {"preset": "mixtral-8x22b"},
           "cluster": {"num_nodes": 1, "gpus_per_node": 2, "gpu": "h100"},
           "training": {"seq_length": 4096, "global_batch_size": 8}, "time_limit_s": 30}


def _plan(tmp_path: Path, body: dict, *extra: str, capsys) -> tuple[int, str, str]:
    path = tmp_path / "req.json"
    path.write_text(json.dumps(body))
    code = main(["plan", "--json", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_table_numbers_as_the_api_and_stars_differences(tmp_path, capsys):
    code, out, _ = _plan(tmp_path, TINY_PLAN, "--format", "table", capsys=capsys)
    assert code == 0
    header = next(line for line in out.splitlines() if "#0" in line)
    assert header.split("┃")[2].strip() == "#0" and "#3" in header  # 0-based, as candidates[i]
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    starred = [k for k in lines if k.endswith(" *")]
    assert starred, out  # the candidates differ somewhere, and the table says where
    for k in starred:  # a starred row really differs
        values = [v.strip() for v in lines[k].split("│")[2:-1]]
        assert len(set(values)) > 1, lines[k]
    assert "headroom" in lines and "* differs between candidates" in out


def test_infeasible_plan_exits_3_and_still_prints_the_json(tmp_path, capsys):
    code, out, err = _plan(tmp_path, TOO_BIG, capsys=capsys)
    assert code == EXIT_INFEASIBLE == 3 and EXIT_BAD_INPUT == 2
    answer = json.loads(out)
    assert answer["search"]["status"] == "INFEASIBLE" and answer["search"]["reasons"]
    assert "INFEASIBLE" in err
    code, out, _ = _plan(tmp_path, TOO_BIG, "--format", "table", capsys=capsys)
    assert code == 3 and "INFEASIBLE" in out and "reason:" in out


def test_run_summary_fits_one_screen(monkeypatch):
    plan = fake_plan_answer([{"tp": 1, "pp": 1, "ep": 2}], {
        **TINY, "cluster": {"num_nodes": 1, "gpus_per_node": 4, "gpu": "cpu"}})
    pred = plan["candidates"][0]["estimate"]
    metrics = {"step_time_s": pred["step_time_s"] * 3.1, "tokens_per_s": 1000.0, "mfu": 0.05,
               "loss": [5.6, 5.4, 5.1], "world_size": 4, "device": "cpu", "backend": "gloo"}
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    text = run_summary(plan, 0, metrics, Path("/runs/try1"))
    lines = text.splitlines()
    assert len(lines) <= 12 and max(len(line) for line in lines[:-2]) < 120
    assert "measured/predicted 3.10x" in text
    assert "tokens/s" in text and "MFU" in text and "5.6000 -> 5.1000" in text
    assert "share them" in text  # why a CPU run is slower than its prediction
    assert "/runs/try1/metrics.json" in text
