"""View data of the run page (GET /runs/{id}) and its downloads: a run's metrics as per-step
columns, the same rows as CSV, the marks where an elastic run changed its mapping.

The per-step rates live here once: tokens/s of step i is the tokens of one step over that
step's time, MFU of step i is cost_model.flops.mfu at that step's time against the
prediction's FLOPs, GPUs and peak (as api/run_progress.with_rates counts the run's MFU; for a
prediction without them, the run's MFU scaled by its median step time over step i's). The
page's script (api/static/run_page.js) only draws what `run_data` answers.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from cost_model.flops import mfu
from cost_model.specs import ClusterSpec, Mapping, TrainingSpec

from .pages_view import mapping_rows, prediction_caveat

# The per-step columns of the run page, the CSV and the JSON download, in this order.
PER_STEP_COLUMNS = ("step", "loss", "aux_loss", "grad_norm", "step_time_s", "tokens_per_s",
                    "mfu", "num_dropped", "expert_load_imbalance")
# Lists of metrics copied as they are (one entry per entry of `loss`).
_LISTED = {"loss": "loss", "aux_loss": "aux_loss", "grad_norm": "grad_norm",
           "step_time_s": "step_times_s", "num_dropped": "num_dropped",
           "expert_load_imbalance": "expert_load_imbalance"}


def per_step(metrics: dict[str, Any] | None, tokens_per_step: float,
             predicted: dict[str, Any] | None) -> dict[str, list[Any]]:
    """The run's per-step columns (PER_STEP_COLUMNS), each as long as `loss`; a list the run
    did not record (a run still going has no grad_norm yet) is all null. Steps default to
    1..n when the run wrote none."""
    m = metrics or {}
    n = len(m.get("loss") or [])
    steps = m.get("steps") or []
    cols: dict[str, list[Any]] = {"step": list(steps) if len(steps) == n
                                  else list(range(1, n + 1))}
    for col, key in _LISTED.items():
        values = m.get(key) or []
        cols[col] = list(values) if len(values) == n else [None] * n
    p = predicted or {}
    can_mfu = bool(p.get("model_flops_per_step") and p.get("num_gpus")
                   and p.get("peak_flops_per_gpu"))
    cols["tokens_per_s"] = [tokens_per_step / t if t else None for t in cols["step_time_s"]]
    if can_mfu:
        cols["mfu"] = [mfu(p["model_flops_per_step"], t, p["num_gpus"], p["peak_flops_per_gpu"])
                       if t else None for t in cols["step_time_s"]]
    else:  # a prediction stored without them (older servers): scale the run's own MFU
        run_mfu, median = m.get("mfu"), m.get("step_time_s")
        cols["mfu"] = [run_mfu * median / t if t and run_mfu is not None and median else None
                       for t in cols["step_time_s"]]
    return {c: cols[c] for c in PER_STEP_COLUMNS}


def metrics_csv(columns: dict[str, list[Any]]) -> str:
    """The per-step columns as CSV: a header row of PER_STEP_COLUMNS, one row per step, empty
    cells where a value is missing."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(PER_STEP_COLUMNS)
    for i in range(len(columns["step"])):
        w.writerow(["" if columns[c][i] is None else columns[c][i] for c in PER_STEP_COLUMNS])
    return out.getvalue()


def mapping_marks(attempts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Where an elastic run went on with another mapping: `step` (the first step of the new
    attempt) and a `label`, for each attempt whose mapping or node count differs from the one
    before it."""
    marks = []
    for prev, cur in zip(attempts or [], (attempts or [])[1:], strict=False):
        if cur.get("mapping") != prev.get("mapping") or cur.get("num_nodes") != prev.get(
                "num_nodes"):
            marks.append({"step": cur.get("start_step"),
                          "label": f"candidate {cur.get('candidate')}, "
                                   f"{cur.get('num_nodes')} nodes"})
    return marks


def run_data(run: dict[str, Any], plan: dict[str, Any],
             attempts: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Everything the run page draws: the run answer, its per-step columns, the mapping it
    trains (as the candidates table shows it), collective bytes, memory, marks, and why the
    prediction may be off."""
    training = TrainingSpec.model_validate(plan["training"])
    cluster = ClusterSpec.model_validate(plan["cluster"])
    m = run.get("metrics") or {}
    predicted = run.get("predicted") or {}
    candidate = plan["candidates"][run["candidate"]] if run["candidate"] < len(
        plan["candidates"]) else None
    mapping = Mapping.model_validate(m["mapping"] if m.get("mapping") else
                                     (candidate or {}).get("mapping", {}))
    return {
        "run": run,
        "columns": per_step(m, training.tokens_per_step, predicted),
        "mapping": mapping_rows([mapping]),
        "comm_bytes": m.get("comm_bytes") or {},
        "peak_memory_gib": m.get("peak_memory_gib"),
        "predicted_peak_gib": (predicted.get("memory") or {}).get("peak_gib"),
        "marks": mapping_marks(attempts),
        "caveat": prediction_caveat(cluster, predicted, run.get("backend", "local")),
        "tokens_per_step": training.tokens_per_step,
    }
