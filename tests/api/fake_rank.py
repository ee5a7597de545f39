"""Stands in for torchrun + executor.train in run tests: a real process (group) that writes
the files a run writes, through the executor's own models (executor/run_files.py), without
torch.

    python fake_rank.py OUT_DIR STEPS MODE CANDIDATE
MODE: "ok" (write progress then metrics.json), "hold" (write one progress line, then wait
until OUT_DIR/release exists, then finish as "ok"), "fail" (print to stderr, exit 3),
"child" (start a child process in the same group, then hold). Every step takes 0.5 s.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from executor.run_files import (
    PLAN_FILE,
    ProgressLine,
    RunMetrics,
    append_progress,
    median_step_time,
    write_metrics,
)

STEP_TIME_S = 0.5

out, steps, mode, candidate = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(out / "pid").write_text(str(os.getpid()))
print(f"fake rank 0 starting {steps} steps ({mode})", flush=True)
if mode == "fail":
    print("rank 0 failed: CUDA out of memory (fake)", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / "child_pid").write_text(str(child.pid))
losses = [5.5 - 0.1 * i for i in range(steps)]
for i, loss in enumerate(losses):
    append_progress(out, ProgressLine(step=i + 1, loss=loss, time_s=STEP_TIME_S))
    print(f"step {i + 1}/{steps} loss {loss:.4f}", flush=True)
    if i == 0 and mode in ("hold", "child"):
        while not (out / "release").exists():
            time.sleep(0.05)
plan = json.loads((out / PLAN_FILE).read_text())
tokens_per_step = plan["training"]["global_batch_size"] * plan["training"]["seq_length"]
step_time = median_step_time([STEP_TIME_S] * steps)
write_metrics(out, RunMetrics(
    loss=losses, steps=list(range(1, steps + 1)), step_times_s=[STEP_TIME_S] * steps,
    step_time_s=step_time, tokens_per_s=tokens_per_step / step_time, model_flops_per_step=0.0,
    tflops_per_gpu=0.0, mfu=0.0, aux_loss=[0.0] * steps, grad_norm=[1.0] * steps,
    num_dropped=[0] * steps, expert_load_imbalance=[None] * steps, comm_bytes={},
    world_size=plan["cluster"]["num_nodes"] * plan["cluster"]["gpus_per_node"], backend="gloo",
    device="cpu", precision="fp32", mapping=plan["candidates"][candidate]["mapping"]))
