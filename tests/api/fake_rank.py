"""Stands in for torchrun + executor.train in run tests: a real process (group) that writes
the files a run writes, without torch.

    python fake_rank.py OUT_DIR STEPS MODE
MODE: "ok" (write progress then metrics.json), "hold" (write one progress line, then wait
until OUT_DIR/release exists, then finish as "ok"), "fail" (print to stderr, exit 3),
"child" (start a child process in the same group, then hold).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

out, steps, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
(out / "pid").write_text(str(__import__("os").getpid()))
print(f"fake rank 0 starting {steps} steps ({mode})", flush=True)
if mode == "fail":
    print("rank 0 failed: CUDA out of memory (fake)", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (out / "child_pid").write_text(str(child.pid))
losses = [5.5 - 0.1 * i for i in range(steps)]
with open(out / "progress.jsonl", "a") as f:
    for i, loss in enumerate(losses):
        f.write(json.dumps({"step": i + 1, "loss": loss, "time_s": 0.5}) + "\n")
        f.flush()
        print(f"step {i + 1}/{steps} loss {loss:.4f}", flush=True)
        if i == 0 and mode in ("hold", "child"):
            while not (out / "release").exists():
                time.sleep(0.05)
metrics = {"loss": losses, "steps": list(range(1, steps + 1)), "step_times_s": [0.5] * steps,
           "step_time_s": 0.5}
(out / "metrics.json").write_text(json.dumps(metrics))
