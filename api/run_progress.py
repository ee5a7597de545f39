"""What the service makes of a run's folder: the log tail, the steps so far, the run's metrics.

The files and their models are executor/run_files.py's; this module only reads them through
`parse_progress_line` and `read_metrics` (in api/runner.py) and turns them into the `metrics`
object of a run record. Measured MFU is re-based on the prediction (`with_rates`), so measured
and predicted MFU compare like for like.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cost_model.flops import mfu
from executor.run_files import (
    LOG_FILE,
    PROGRESS_FILE,
    ProgressLine,
    RunFileError,
    median_step_time,
    parse_progress_line,
)

LOG_TAIL_CHARS = 4000
PARTIAL_POINTS = 2000
log = logging.getLogger("foldplan.runs")


def log_tail(out_dir: Path) -> str | None:
    """The last LOG_TAIL_CHARS of the run's train.log, if any."""
    path = out_dir / LOG_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 4 * LOG_TAIL_CHARS))
        text = f.read().decode(errors="replace")
    return text[-LOG_TAIL_CHARS:] or None


class ProgressReader:
    """Reads rank 0's progress.jsonl of each run incrementally (a long run's file is not
    re-read every pass); a half-written last line waits for the next pass, a malformed line is
    skipped (logged, not fatal)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, list[ProgressLine]]] = {}  # run id -> (offset, steps)

    def read(self, run_id: str, out_dir: Path) -> tuple[list[ProgressLine], bool]:
        """All steps so far and whether any arrived since the last call."""
        offset, steps = self._seen.get(run_id, (0, []))
        try:
            with open(out_dir / PROGRESS_FILE, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return steps, False
        end = chunk.rfind(b"\n") + 1  # only whole lines
        for line in chunk[:end].decode(errors="replace").splitlines():
            try:
                steps.append(parse_progress_line(line))
            except RunFileError as exc:
                log.warning("run %s: %s", run_id, exc)
        self._seen[run_id] = (offset + end, steps)
        return steps, end > 0

    def forget(self, run_id: str) -> None:
        self._seen.pop(run_id, None)


def latest_per_step(progress: list[ProgressLine]) -> list[ProgressLine]:
    """One line per step, in step order; a step trained again (an elastic run resumed from an
    earlier checkpoint) keeps its latest line. Example: steps [1, 2, 3, 2, 3, 4] -> the first
    1, the second 2 and 3, and 4."""
    by_step = {p.step: p for p in progress}
    return [by_step[k] for k in sorted(by_step)]


def partial_metrics(progress: list[ProgressLine]) -> dict[str, Any]:
    """Metrics of a run still going, from its progress lines (`latest_per_step`): at most
    PARTIAL_POINTS evenly spaced steps (always the first and the latest), so a long run's row
    stays small while it is rewritten every pass; the final metrics.json holds every step. The
    step time is the executor's rule (`median_step_time`) over the kept steps."""
    progress = latest_per_step(progress)
    n = len(progress)
    if n > PARTIAL_POINTS:
        idx = sorted({round(i * (n - 1) / (PARTIAL_POINTS - 1)) for i in range(PARTIAL_POINTS)})
        progress = [progress[i] for i in idx]
    times = [p.time_s for p in progress]
    return {
        "loss": [p.loss for p in progress],
        "aux_loss": [p.aux_loss for p in progress],
        "steps": [p.step for p in progress],
        "step_times_s": times,
        "step_time_s": median_step_time(times),
        "expert_load_imbalance": [p.expert_load_imbalance for p in progress],
        "partial": True,
    }


# per-step lists of metrics.json and the progress-line field each entry comes from
_PER_STEP = {"loss": "loss", "steps": "step", "step_times_s": "time_s", "aux_loss": "aux_loss",
             "grad_norm": "grad_norm", "num_dropped": "num_dropped",
             "expert_load_imbalance": "expert_load_imbalance"}


def merged_metrics(final: dict[str, Any], progress: list[ProgressLine]) -> dict[str, Any]:
    """The metrics of a run whose last invocation resumed from a checkpoint: its metrics.json
    (`final`, the steps that invocation ran) preceded, in every per-step list, by the earlier
    steps from the progress lines (`latest_per_step`), so every step appears once. Step time,
    tokens/s and MFU stay those of the last invocation (the mapping the run ended on); an entry
    a progress line does not carry is null."""
    first = min(final.get("steps") or [0], default=0)
    earlier = [p for p in latest_per_step(progress) if p.step < first]
    if not earlier:
        return final
    out = dict(final)
    for key, attr in _PER_STEP.items():
        if key in final:
            out[key] = [getattr(p, attr) for p in earlier] + list(final[key])
    return out


def with_rates(metrics: dict[str, Any], tokens_per_step: float,
               predicted: dict[str, Any] | None) -> dict[str, Any]:
    """Add tokens/s (when missing) and MFU from the measured step time. MFU counts the
    prediction's model FLOPs on the prediction's GPUs at their peak (`num_gpus` and
    `peak_flops_per_gpu` of `predicted`, see api/prediction.py), so it equals predicted MFU x
    predicted time / measured time. A prediction stored without those keys (older servers)
    leaves the executor's own MFU."""
    t = metrics.get("step_time_s")
    if not t:
        return metrics
    metrics.setdefault("tokens_per_s", tokens_per_step / t)
    p = predicted or {}
    if p.get("model_flops_per_step") and p.get("num_gpus") and p.get("peak_flops_per_gpu"):
        metrics["mfu"] = mfu(p["model_flops_per_step"], t, p["num_gpus"], p["peak_flops_per_gpu"])
    return metrics
