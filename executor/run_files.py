"""A run's folder and its ranks' command line: the one place the executor and the service share.

The executor writes these files through the models below; the service (api/runner.py) and
`foldplan run` (executor/launch.py) read them back only through `read_metrics` and
`parse_progress_line`. This module imports neither torch nor api, so a service without torch
(one that only submits to Slurm) can import it.

A run folder (`out_dir`) holds:
  plan.json       the plan answer the ranks read (`write_plan_file`, before the job starts)
  train.log       everything the job printed
  progress.jsonl  rank 0: one `ProgressLine` per finished step, appended while the run goes on
  metrics.json    rank 0: `RunMetrics`, written once at the end (atomically); its presence
                  after the job ends means the run succeeded
  checkpoints/step_<N>/  every rank's state after step N (executor/checkpoint.py); complete
                  once its COMPLETE marker exists (`latest_checkpoint` finds the newest)

Every rank runs `<launcher> rank_argv(...)`; the launcher is torchrun on one host
(executor/launch.py, the local backend) or one torchrun per node under srun (the slurm
backend). Per-step numbers may be NaN or infinite (a diverged run): the files keep them as
JSON's NaN / Infinity tokens, as Python's json module writes and reads them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


PLAN_FILE = "plan.json"
LOG_FILE = "train.log"
PROGRESS_FILE = "progress.jsonl"
METRICS_FILE = "metrics.json"


class RunFileError(ValueError):
    """A run file that cannot be read or does not have the shape below; the message names the
    file and every offending field."""


class _RunFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")


class ProgressLine(_RunFile):
    """One line of progress.jsonl: a step rank 0 has finished (the service follows these)."""

    step: int = Field(ge=1, description="Step number, 1-based, counted from the run's start "
                      "(a resumed run continues the numbering).")
    loss: float = Field(description="Language-model cross-entropy of the step, mean over the "
                        "tokens of the global batch.")
    time_s: float = Field(ge=0, description="Wall time of the step in seconds.")
    expert_load_imbalance: float | None = Field(
        default=None, description="Busiest expert's tokens over the mean (averaged over MoE "
        "layers and micro-batches); null for a model without MoE layers.")
    aux_loss: float | None = Field(default=None, description="Router losses of the step (as "
                                   "`RunMetrics.aux_loss`); null from writers that omit it.")
    grad_norm: float | None = Field(default=None, description="Global gradient norm before "
                                    "clipping (as `RunMetrics.grad_norm`).")
    num_dropped: int | None = Field(default=None, description="Dropped (token, expert) pairs "
                                    "(as `RunMetrics.num_dropped`).")


class RunMetrics(_RunFile):
    """metrics.json: rank 0's final numbers for the steps this invocation ran.

    `loss`, `steps`, `step_time_s`, `tokens_per_s` and `aux_loss` are the contract's `metrics`
    fields of a run object; the service adds nothing to them but a re-based `mfu`."""

    loss: list[float] = Field(description="Language-model cross-entropy per step, mean over "
                              "the tokens of the global batch.")
    steps: list[int] = Field(description="Step number (1-based) of each entry of the per-step "
                             "lists; a resumed run holds only the steps it ran.")
    step_times_s: list[float] = Field(description="Wall time of each step in seconds.")
    step_time_s: float = Field(gt=0, description="Median step time without the first (warm-up) "
                               "step; see `median_step_time`.")
    tokens_per_s: float = Field(ge=0, description="Global-batch tokens per step over "
                                "`step_time_s`.")
    model_flops_per_step: float = Field(ge=0, description="Megatron-LM's model FLOPs of one "
                                        "step (cost_model.flops.model_flops_per_step).")
    tflops_per_gpu: float = Field(ge=0, description="Model TFLOP/s per GPU at `step_time_s`.")
    mfu: float = Field(ge=0, description="Model FLOPs utilisation against the peak of the "
                       "plan's GPU at the run's precision (cost_model.flops.mfu).")
    aux_loss: list[float] = Field(description="Router losses (load balancing + z) per step, "
                                  "mean over micro-batches.")
    grad_norm: list[float] = Field(description="Global gradient norm per step, before clipping.")
    num_dropped: list[int] = Field(description="Dropped (token, expert) pairs per step over all "
                                   "ranks (capacity-factor runs; 0 when dropless).")
    expert_load_imbalance: list[float | None] = Field(
        description="Busiest expert's tokens over the mean per step (what "
        "training.moe_expert_load_imbalance assumes); null entries without MoE layers.")
    comm_bytes: dict[str, float] = Field(description="Bytes per rank per step of each "
                                         "collective, keyed '<group>.<op>', averaged over ranks "
                                         "and steps.")
    world_size: int = Field(ge=1, description="Number of ranks that trained.")
    backend: Literal["gloo", "nccl"] = Field(description="torch.distributed backend.")
    device: Literal["cpu", "cuda"] = Field(description="Device type the ranks ran on.")
    precision: Literal["fp32", "bf16"] = Field(description="Compute precision used (fp8 plans "
                                               "run in bf16; CPU ranks in fp32).")
    peak_memory_gib: float | None = Field(default=None, description="Rank 0's peak allocated "
                                          "GPU memory in GiB; null on CPU ranks.")
    mapping: dict[str, Any] = Field(description="The candidate's mapping as the executor ran "
                                    "it (cost_model.specs.Mapping as JSON; kept as plain JSON so "
                                    "a reader of another version still reads the file).")

    @model_validator(mode="after")
    def _per_step_lists_agree(self) -> RunMetrics:
        n = len(self.loss)
        for name in ("steps", "step_times_s", "aux_loss", "grad_norm", "num_dropped",
                     "expert_load_imbalance"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but loss has "
                                 f"{n}: every per-step list has one entry per step")
        return self


def median_step_time(times_s: list[float]) -> float:
    """The step time a run reports: the median without the first (warm-up) step, or the only
    step's time. Example: [3.0, 0.5, 0.7, 0.6] -> 0.6."""
    if not times_s:
        raise ValueError("no step times: a run reports a step time only after its first step")
    return statistics.median(times_s[1:] if len(times_s) > 1 else times_s)


def _why(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                     for e in exc.errors())


def read_metrics(out_dir: Path) -> RunMetrics:
    """The run's metrics.json; RunFileError naming the file and the problem otherwise."""
    path = Path(out_dir) / METRICS_FILE
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RunFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}: not JSON ({exc})") from None
    try:
        return RunMetrics.model_validate(data)
    except ValidationError as exc:
        raise RunFileError(f"{path}: not the metrics the executor writes: {_why(exc)}") from None


def write_metrics(out_dir: Path, metrics: RunMetrics) -> Path:
    """Write metrics.json atomically (a reader never sees half a file); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(metrics.model_dump_json(indent=2))
    return tmp.replace(out / METRICS_FILE)


def parse_progress_line(line: str) -> ProgressLine:
    """One progress.jsonl line; RunFileError saying what is wrong with it otherwise."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{PROGRESS_FILE} line {line[:80]!r}: not JSON ({exc})") from None
    try:
        return ProgressLine.model_validate(data)
    except ValidationError as exc:
        raise RunFileError(f"{PROGRESS_FILE} line {line[:80]!r}: {_why(exc)}") from None


def append_progress(out_dir: Path, line: ProgressLine) -> None:
    """Append one finished step to progress.jsonl (one whole line per write)."""
    with open(Path(out_dir) / PROGRESS_FILE, "a") as f:
        f.write(line.model_dump_json() + "\n")


def write_plan_file(out_dir: Path, plan: dict[str, Any]) -> Path:
    """Put the plan answer where the ranks read it (`--plan`); returns its path."""
    path = Path(out_dir) / PLAN_FILE
    path.write_text(json.dumps(plan))
    return path


CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """Folder of the checkpoint written after step `step` (1-based).
    Example: checkpoint_dir(Path("/r/1"), 20) -> /r/1/checkpoints/step_00000020."""
    return Path(out_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def latest_checkpoint(out_dir: Path) -> int | None:
    """Step of the newest checkpoint in the run folder that has its COMPLETE marker, or None.
    (A checkpoint whose writer died before the marker is ignored.)"""
    root = Path(out_dir) / CHECKPOINTS_DIR
    steps = [int(p.parent.name.split("_")[1]) for p in root.glob(f"step_*/{COMPLETE_MARKER}")]
    return max(steps) if steps else None


def rank_argv(out_dir: Path, candidate: int, steps: int, seed: int = 0, data: str | None = None,
              save_every: int = 0, resume: bool = False, init_hf: str | None = None,
              export_hf: str | None = None) -> list[str]:
    """What every rank runs after its launcher: `executor.train` on the run folder's plan.json.

    Options as executor/train.py `parse_args` reads them; the optional ones are written only
    when set. Example: rank_argv(Path("/r/1"), 0, 10) -> ['-m', 'executor.train', '--plan',
    '/r/1/plan.json', '--candidate', '0', '--steps', '10', '--out', '/r/1', '--seed', '0']."""
    out = Path(out_dir)
    argv = ["-m", "executor.train", "--plan", str(out / PLAN_FILE), "--candidate", str(candidate),
            "--steps", str(steps), "--out", str(out), "--seed", str(seed)]
    if data:
        argv += ["--data", str(data)]
    if save_every:
        argv += ["--save-every", str(save_every)]
    if resume:
        argv.append("--resume")
    if init_hf:
        argv += ["--init-hf", str(init_hf)]
    if export_hf:
        argv += ["--export-hf", str(export_hf)]
    return argv
